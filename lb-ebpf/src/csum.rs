//! Internet checksums.

/// Checksum of a 20-byte IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header(hdr: &[u8; 20]) -> [u8; 2] {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u16::from_be_bytes([hdr[i], hdr[i + 1]]) as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Updates checksum `check` (as stored, big-endian bytes) for a 16-bit word that changed
/// from `old` to `new` (RFC 1624: HC' = ~(~HC + ~m + m')).
#[inline(always)]
pub fn replace16(check: [u8; 2], old: u16, new: u16) -> [u8; 2] {
    let mut sum = (!u16::from_be_bytes(check)) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Folds a 32-bit one's-complement sum into a checksum (big-endian bytes).
#[inline(always)]
pub fn fold(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Folds a 32-bit one's-complement sum of 16-bit words in memory order into the checksum
/// word, in the same order.
#[inline(always)]
pub fn fold_ne(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
