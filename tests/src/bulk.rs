//! Bulk transfers: a deterministic byte stream both ends can regenerate, and a digest to
//! compare what was sent with what arrived without keeping megabytes around.
//!
//! The protocol of [`crate::BulkServer`] (after its greeting line, see
//! [`crate::servers::reply_line`]) is one command line per connection:
//! - `upload <n>\n` followed by `n` bytes: the server answers `received <n> <digest>\n`
//!   (digest in hex) once it has read them all;
//! - `download <n> <seed>\n`: the server sends the first `n` bytes of the pattern of
//!   `seed` and closes its side.
//!
//! `<seed>` selects the [`Pattern`]; the client regenerates it to check every byte.

/// An endless pseudo-random byte stream (xorshift64*), the same for the same seed.
///
/// Pseudo-random rather than a counter, so a segment that arrives at the wrong offset, or
/// twice, changes the digest.
#[derive(Debug, Clone)]
pub struct Pattern {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Pattern {
    /// The stream for `seed` (any value).
    pub fn new(seed: u64) -> Pattern {
        let state = seed ^ 0x9e37_79b9_7f4a_7c15;
        Pattern {
            // xorshift stays at zero forever once there.
            state: if state == 0 { 1 } else { state },
            word: [0; 8],
            used: 8,
        }
    }

    /// Fills `buf` with the next bytes of the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.used == 8 {
                self.state ^= self.state >> 12;
                self.state ^= self.state << 25;
                self.state ^= self.state >> 27;
                self.word = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
                self.used = 0;
            }
            *b = self.word[self.used];
            self.used += 1;
        }
    }

    /// The next `n` bytes of the stream.
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.fill(&mut v);
        v
    }
}

/// FNV-1a (64 bit) over a byte stream fed in pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest(u64);

impl Default for Digest {
    fn default() -> Self {
        Digest(0xcbf2_9ce4_8422_2325)
    }
}

impl Digest {
    /// A digest of nothing yet.
    pub fn new() -> Digest {
        Digest::default()
    }

    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    /// The digest so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// The digest of the first `n` bytes of the pattern of `seed`.
pub fn pattern_digest(seed: u64, n: u64) -> u64 {
    let mut pattern = Pattern::new(seed);
    let mut digest = Digest::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = n;
    while left > 0 {
        let chunk = usize::try_from(left.min(buf.len() as u64)).unwrap_or(buf.len());
        pattern.fill(&mut buf[..chunk]);
        digest.update(&buf[..chunk]);
        left -= chunk as u64;
    }
    digest.value()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_reproducible_in_any_chunking() {
        let whole = Pattern::new(7).take(1000);
        let mut p = Pattern::new(7);
        let mut pieces = p.take(3);
        pieces.extend(p.take(500));
        pieces.extend(p.take(497));
        assert_eq!(whole, pieces);
        assert_ne!(whole, Pattern::new(8).take(1000));
        let mut d = Digest::new();
        d.update(&whole);
        assert_eq!(d.value(), pattern_digest(7, 1000));
    }
}
