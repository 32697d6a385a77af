//! Bounds-checked access to the frame and the per-protocol parsers.

pub mod eth;
pub mod ipv4;
pub mod ipv6;
pub mod l4;

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
    let words: [u32; 4] = [u32::from_ne_bytes(addr), 0, 0, 0];
    // SAFETY: [u32; 4] and [u8; 16] have the same size and every bit pattern is valid.
    unsafe { core::mem::transmute(words) }
}
