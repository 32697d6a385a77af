//! Ethernet and 802.1Q / 802.1ad tags.

use aya_ebpf::programs::XdpContext;
use lb_common::{DropReason, MAX_VLAN_DEPTH};
use network_types::eth::EthHdr;

use super::ptr_at;

/// EtherType of IPv4, as it appears on the wire.
pub const ETH_P_IP: u16 = 0x0800u16.to_be();
/// EtherType of IPv6, as it appears on the wire.
pub const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8u16.to_be();

/// Result of walking the link-layer header.
pub struct L2 {
    /// EtherType of the payload (network byte order).
    pub ether_type: u16,
    /// Offset of the L3 header: 14 plus 4 per VLAN tag.
    pub l3_off: usize,
    /// Number of VLAN tags walked.
    pub vlans: usize,
}

/// Walks Ethernet and up to `MAX_VLAN_DEPTH` VLAN tags.
///
/// A deeper stack reports the remaining tag's EtherType, which no caller handles, so such
/// frames are passed to the stack untouched.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<L2, DropReason> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_off = EthHdr::LEN;
    let mut vlans = 0;
    for _ in 0..MAX_VLAN_DEPTH {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        // A tag is TCI (2 bytes) then the inner EtherType (2 bytes).
        let tag: *const [u16; 2] = ptr_at(ctx, l3_off)?;
        ether_type = unsafe { (*tag)[1] };
        l3_off += 4;
        vlans += 1;
    }
    Ok(L2 {
        ether_type,
        l3_off,
        vlans,
    })
}
