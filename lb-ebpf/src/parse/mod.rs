//! Bounds-checked access to the frame and the per-protocol parsers.

pub mod eth;
pub mod ipv4;
pub mod ipv6;
pub mod l4;
pub mod quick;

use aya_ebpf::programs::XdpContext;
use lb_common::DropReason;

/// Pointer to a `T` at `offset` in the frame, or `Truncated` if the frame ends before it.
///
/// Every header access goes through here so the verifier always sees the check right next
/// to the access.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, DropReason> {
    // Volatile loads keep LLVM from proving one check redundant with another: the
    // verifier tracks each packet pointer separately and needs every check it sees.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.ctx).data) as usize,
            core::ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(DropReason::Truncated);
    }
    Ok((start + offset) as *mut T)
}

/// An IPv4 address in the 16-byte form map keys use (the first four bytes).
///
/// Built from words: writing four bytes into a zeroed byte array makes LLVM call a
/// byte-wise `memset` subprogram on the hot path.
#[inline(always)]
pub fn v4_in_16(addr: [u8; 4]) -> [u8; 16] {
    v4_word_in_16(u32::from_ne_bytes(addr))
}

/// `v4_in_16` for an address read as a word (memory order).
#[inline(always)]
pub fn v4_word_in_16(addr: u32) -> [u8; 16] {
    let words: [u32; 4] = [addr, 0, 0, 0];
    // SAFETY: [u32; 4] and [u8; 16] have the same size and every bit pattern is valid.
    unsafe { core::mem::transmute(words) }
}

/// Defines an unsafe function that reads a `$ty` from the frame with one load
/// instruction (`$insn`): see `load16` for why.
macro_rules! frame_load {
    ($(#[$attr:meta])* $name:ident -> $ty:ty, $insn:literal) => {
        $(#[$attr])*
        #[inline(always)]
        pub unsafe fn $name(p: *const u8) -> $ty {
            let v: $ty;
            unsafe {
                core::arch::asm!($insn, v = lateout(reg) v, p = in(reg) p,
                    options(readonly, nostack, preserves_flags));
            }
            v
        }
    };
}

frame_load!(
    /// The 16-bit word at `p`, as it lies in memory (network byte order is kept).
    ///
    /// Frames start at an even address (every driver's headroom is even) and each header
    /// sits at an even offset (Ethernet 14, VLAN tags 4, IPv4 options 4n, IPv6 extensions
    /// 8n), so 16-bit fields are 2-aligned and wider ones are not: the IPv4 addresses sit
    /// 2 bytes past a 4-byte boundary. LLVM lowers a read it cannot prove aligned into
    /// single-byte loads joined with shifts.
    /// One load instruction does the job: the kernel allows unaligned packet access on the
    /// architectures with efficient unaligned access (x86-64, arm64), where the JIT emits a
    /// plain load. Written in assembly so no Rust reference of the wrong alignment exists.
    ///
    /// # Safety
    /// `p` must point into the frame, with the two bytes checked against its end.
    load16 -> u16, "{v} = *(u16 *)({p} + 0)"
);

frame_load!(
    /// `load16` for a 32-bit word.
    ///
    /// # Safety
    /// As for `load16`, with four bytes.
    load32 -> u32, "{v} = *(u32 *)({p} + 0)"
);

frame_load!(
    /// `load16` for a 64-bit word.
    ///
    /// # Safety
    /// As for `load16`, with eight bytes.
    load64 -> u64, "{v} = *(u64 *)({p} + 0)"
);

/// Writes `v` to the frame at `p` with one store instruction (the other way round from
/// `load16`; LLVM splits an unaligned store into single bytes the same way).
///
/// # Safety
/// `p` must point into the frame, with the eight bytes checked against its end.
#[inline(always)]
pub unsafe fn store64(p: *mut u8, v: u64) {
    unsafe {
        core::arch::asm!("*(u64 *)({p} + 0) = {v}", p = in(reg) p, v = in(reg) v,
            options(nostack, preserves_flags));
    }
}
