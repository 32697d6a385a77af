//! Weighted Maglev lookup tables, computed in userspace and only indexed by the kernel.
//!
//! Every balancer node must compute the *same* table from the same set of backends, so
//! ECMP reshuffles and lost connection state do not move flows. Therefore:
//! - a backend's permutation derives only from its address bytes, through a fixed hash
//!   (FNV-1a/64 with two seeds, finished by the murmur3 `fmix64` avalanche step) — never
//!   a randomly keyed hasher;
//! - turn order and apportionment ties follow the sorted addresses, not the input order.
//!
//! The hash and the fill order are part of the contract between nodes: changing them
//! reshuffles every flow during a rolling upgrade.
//!
//! Weights follow the Maglev paper's quota variant: each backend owns a number of slots
//! proportional to its weight (exact apportionment, largest remainder), and backends take
//! turns claiming their next preferred free slot until their quota is reached.

use std::{cmp::Reverse, net::IpAddr};

/// Why a Maglev table could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaglevError {
    /// The table size is not a prime number, so permutations would not cover the table.
    #[error("Maglev table size {size} is not a prime number")]
    NotPrime {
        /// The rejected size.
        size: u32,
    },
    /// No backend has a weight above zero, so nobody could own a slot.
    #[error("no backend with a weight above 0")]
    NoBackends,
    /// The same address appears twice, which makes the result depend on input order.
    #[error("backend {address} is listed more than once")]
    DuplicateBackend {
        /// The repeated address.
        address: IpAddr,
    },
    /// More backends than a `u32` index can name.
    #[error("{count} backends do not fit in a table of u32 indices")]
    TooManyBackends {
        /// Number of backends given.
        count: usize,
    },
}

/// Returns whether `n` is a prime number (trial division; fine for table sizes).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let n = u64::from(n);
    let mut d = 3u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Builds the lookup table: entry i is the index (into `backends`) of the backend owning slot i.
pub fn build(backends: &[(IpAddr, u32)], size: u32) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::NotPrime { size });
    }
    if u32::try_from(backends.len()).is_err() {
        return Err(MaglevError::TooManyBackends {
            count: backends.len(),
        });
    }

    // Work in sorted-address order so the result does not depend on the caller's order.
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_unstable_by_key(|&i| backends[i].0);
    if let Some(pair) = order
        .windows(2)
        .find(|pair| backends[pair[0]].0 == backends[pair[1]].0)
    {
        return Err(MaglevError::DuplicateBackend {
            address: backends[pair[0]].0,
        });
    }
    order.retain(|&i| backends[i].1 > 0);
    if order.is_empty() {
        return Err(MaglevError::NoBackends);
    }

    let weights: Vec<u32> = order.iter().map(|&i| backends[i].1).collect();
    let mut remaining = apportion(&weights, size);

    let size64 = u64::from(size);
    let mut cursors: Vec<Cursor> = order
        .iter()
        .map(|&i| Cursor::new(backends[i].0, size64))
        .collect();
    // Ranks (positions in `order`) that still have quota, in address order.
    let mut active: Vec<usize> = (0..order.len()).filter(|&r| remaining[r] > 0).collect();

    const FREE: u32 = u32::MAX;
    let mut table = vec![FREE; size as usize];
    // Each round, every backend with quota left claims its next preferred free slot;
    // backends that reach their quota leave the rotation. The quotas sum to `size`, so
    // the loop ends exactly when every slot is owned, and a backend with quota left always
    // finds a free slot ahead in its permutation (slots it passed were already taken).
    // Cost: every backend visited in a round claims a slot, and cursors only move
    // forward, so there are no rescans of the table nor of exhausted backends.
    while !active.is_empty() {
        for &rank in &active {
            let cursor = &mut cursors[rank];
            let slot = loop {
                let slot = cursor.next_slot();
                if table[slot] == FREE {
                    break slot;
                }
            };
            // `order[rank]` indexes `backends`, whose length fits in u32 (checked above).
            table[slot] = order[rank] as u32;
            remaining[rank] -= 1;
        }
        active.retain(|&rank| remaining[rank] > 0);
    }
    Ok(table)
}

/// Splits `size` slots among `weights` (all > 0) exactly: floor(size·w/W) each, then one
/// more slot to the largest remainders, ties to the earlier (lower-address) backend.
fn apportion(weights: &[u32], size: u32) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let size64 = u64::from(size);
    let mut quotas = Vec::with_capacity(weights.len());
    let mut remainders = Vec::with_capacity(weights.len());
    for (rank, &weight) in weights.iter().enumerate() {
        let share = size64 * u64::from(weight);
        // share / total <= size, so it fits in u32.
        quotas.push((share / total) as u32);
        remainders.push((Reverse(share % total), rank));
    }
    let assigned: u64 = quotas.iter().map(|&q| u64::from(q)).sum();
    // The leftover is below the number of backends, since each floor loses less than one.
    let leftover = (size64 - assigned) as usize;
    remainders.sort_unstable();
    for &(_, rank) in remainders.iter().take(leftover) {
        quotas[rank] += 1;
    }
    quotas
}

/// A backend's walk through its Maglev permutation: slot j = (offset + j·skip) mod size.
struct Cursor {
    /// The next slot to try.
    position: u64,
    /// Step between preferences; in 1..size, so with a prime size every slot is visited.
    skip: u64,
    /// Table size.
    size: u64,
}

impl Cursor {
    fn new(address: IpAddr, size: u64) -> Self {
        let bytes: &[u8] = &match address {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        let offset = stable_hash(bytes, OFFSET_SEED) % size;
        // size >= 2 (it is prime), so size - 1 >= 1.
        let skip = stable_hash(bytes, SKIP_SEED) % (size - 1) + 1;
        Self {
            position: offset,
            skip,
            size,
        }
    }

    fn next_slot(&mut self) -> usize {
        let slot = self.position;
        self.position = (self.position + self.skip) % self.size;
        // slot < size <= u32::MAX, so it fits in usize on every supported target.
        slot as usize
    }
}

/// Seed for the permutation's start; the FNV-1a/64 offset basis.
const OFFSET_SEED: u64 = 0xcbf2_9ce4_8422_2325;
/// Seed for the permutation's step; an arbitrary different basis (digits of π).
const SKIP_SEED: u64 = 0x243f_6a88_85a3_08d3;

/// FNV-1a/64 from `seed`, finished with murmur3's `fmix64` so every output bit depends
/// on every input bit (plain FNV is weak in its low bits, which the modulo uses).
fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = seed;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^= hash >> 33;
    hash
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        net::{Ipv4Addr, Ipv6Addr},
        time::Instant,
    };

    use super::*;

    fn v4(last: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + last))
    }

    fn counts(table: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; n];
        for &entry in table {
            counts[entry as usize] += 1;
        }
        counts
    }

    /// Maps each slot to the address owning it, so tables from different inputs compare.
    fn owners(backends: &[(IpAddr, u32)], table: &[u32]) -> Vec<IpAddr> {
        table.iter().map(|&i| backends[i as usize].0).collect()
    }

    #[test]
    fn primes_are_recognised() {
        let primes: Vec<u32> = (0..50).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            primes,
            [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47]
        );
        for n in [251, 16381, 65537, 1_000_003, 4_294_967_291] {
            assert!(is_prime(n), "{n}");
        }
        for n in [16383, 65536, 1_000_001, 4_294_967_295, 65521 * 65521] {
            assert!(!is_prime(n), "{n}");
        }
    }

    #[test]
    fn equal_weights_share_the_table_evenly() {
        let backends = [(v4(1), 1), (v4(2), 1), (v4(3), 1)];
        let size = 65537;
        let table = build(&backends, size).expect("valid input");
        assert_eq!(table.len(), size as usize);
        let even = size as usize / 3;
        for count in counts(&table, 3) {
            assert!(count.abs_diff(even) <= 1, "{count} vs {even}");
        }
    }

    #[test]
    fn weights_are_apportioned_exactly() {
        // 1:2:1 over 16381 slots: 4095.25, 8190.5, 4095.25 -> floors 4095, 8190, 4095 and
        // the last slot goes to the largest remainder, the weight-2 backend.
        let backends = [(v4(7), 1), (v4(3), 2), (v4(5), 1)];
        let table = build(&backends, 16381).expect("valid input");
        assert_eq!(counts(&table, 3), [4095, 8191, 4095]);

        // Ties in the remainder go to the lower address: 7 slots, three equal weights.
        let table = build(&backends.map(|(a, _)| (a, 1)), 7).expect("valid input");
        // Sorted: .3 (index 1), .5 (index 2), .7 (index 0); .3 gets the extra slot.
        assert_eq!(counts(&table, 3), [2, 3, 2]);
    }

    #[test]
    fn zero_weight_backends_own_nothing() {
        let backends = [(v4(1), 0), (v4(2), 3), (v4(3), 0), (v4(4), 1)];
        let table = build(&backends, 251).expect("valid input");
        let counts = counts(&table, 4);
        assert_eq!(counts[0], 0);
        assert_eq!(counts[2], 0);
        assert_eq!(counts[1] + counts[3], 251);
        // 251 * 3/4 = 188.25, 251 * 1/4 = 62.75: the larger remainder gets the extra slot.
        assert_eq!((counts[1], counts[3]), (188, 63));
    }

    #[test]
    fn input_order_does_not_matter() {
        let backends: Vec<(IpAddr, u32)> = (1..=12).map(|i| (v4(i * 7), 1 + i % 3)).collect();
        let mut shuffled = backends.clone();
        shuffled.reverse();
        shuffled.swap(2, 9);
        shuffled.swap(0, 5);
        let a = build(&backends, 4099).expect("valid input");
        let b = build(&shuffled, 4099).expect("valid input");
        assert_ne!(a, b, "indices refer to each caller's own slice");
        assert_eq!(owners(&backends, &a), owners(&shuffled, &b));
    }

    #[test]
    fn tables_are_stable_across_versions() {
        // Pins the hash and the fill order: every balancer node must agree, also during a
        // rolling upgrade. If this changes, flows move; do it only on purpose.
        let backends = [(v4(1), 1), (v4(2), 1), (v4(3), 1)];
        let table = build(&backends, 13).expect("valid input");
        let hashes = (
            stable_hash(&[10, 0, 0, 1], OFFSET_SEED),
            stable_hash(&[10, 0, 0, 1], SKIP_SEED),
        );
        assert_eq!(hashes, GOLDEN_HASHES);
        assert_eq!(table, GOLDEN_TABLE);
    }

    /// FNV-1a/64 + fmix64 of 10.0.0.1 with both seeds, computed independently (Python).
    const GOLDEN_HASHES: (u64, u64) = (2_674_265_721_150_626_473, 3_412_446_908_458_396_650);
    /// 10.0.0.1..3 over 13 slots (quotas 5, 4, 4), computed independently (Python).
    const GOLDEN_TABLE: [u32; 13] = [0, 2, 1, 0, 1, 2, 1, 0, 0, 2, 1, 0, 2];

    fn changed_between_survivors(
        before: &[IpAddr],
        after: &[IpAddr],
        gone_or_new: IpAddr,
    ) -> usize {
        before
            .iter()
            .zip(after)
            .filter(|(b, a)| b != a && **b != gone_or_new && **a != gone_or_new)
            .count()
    }

    #[test]
    fn removing_a_backend_moves_little_else() {
        let size = 65537;
        let all: Vec<(IpAddr, u32)> = (1..=10).map(|i| (v4(i), 1)).collect();
        let removed = all[3].0;
        let rest: Vec<(IpAddr, u32)> = all.iter().copied().filter(|b| b.0 != removed).collect();
        let before = owners(&all, &build(&all, size).expect("valid input"));
        let after = owners(&rest, &build(&rest, size).expect("valid input"));

        assert!(after.iter().all(|&a| a != removed));
        let moved = changed_between_survivors(&before, &after, removed);
        let share = moved as f64 / f64::from(size);
        println!(
            "removing 1 of 10 moved {:.2} % of slots between survivors",
            share * 100.0
        );
        assert!(share < 0.05, "{:.2} %", share * 100.0);
    }

    #[test]
    fn adding_a_backend_moves_little_else() {
        let size = 65537;
        let old: Vec<(IpAddr, u32)> = (1..=10).map(|i| (v4(i), 1)).collect();
        let added = v4(42);
        let mut new = old.clone();
        new.push((added, 1));
        let before = owners(&old, &build(&old, size).expect("valid input"));
        let after = owners(&new, &build(&new, size).expect("valid input"));

        let gained = after.iter().filter(|&&a| a == added).count();
        assert!(gained.abs_diff(size as usize / 11) <= 1);
        let moved = changed_between_survivors(&before, &after, added);
        let share = moved as f64 / f64::from(size);
        println!(
            "adding an 11th backend moved {:.2} % of slots between the others",
            share * 100.0
        );
        assert!(share < 0.05, "{:.2} %", share * 100.0);
    }

    #[test]
    fn ipv6_backends_work() {
        let backends: Vec<(IpAddr, u32)> = (1..=4u16)
            .map(|i| {
                (
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i)),
                    1,
                )
            })
            .collect();
        let table = build(&backends, 1021).expect("valid input");
        for count in counts(&table, 4) {
            assert!(count.abs_diff(255) <= 1, "{count}");
        }
    }

    #[test]
    fn bad_input_is_rejected() {
        let one = [(v4(1), 1)];
        assert_eq!(
            build(&one, 16380),
            Err(MaglevError::NotPrime { size: 16380 })
        );
        assert_eq!(build(&one, 1), Err(MaglevError::NotPrime { size: 1 }));
        assert_eq!(build(&one, 0), Err(MaglevError::NotPrime { size: 0 }));
        assert_eq!(build(&[], 13), Err(MaglevError::NoBackends));
        assert_eq!(
            build(&[(v4(1), 0), (v4(2), 0)], 13),
            Err(MaglevError::NoBackends)
        );
        assert_eq!(
            build(&[(v4(1), 1), (v4(2), 1), (v4(1), 3)], 13),
            Err(MaglevError::DuplicateBackend { address: v4(1) })
        );
    }

    #[test]
    fn a_single_backend_owns_everything() {
        let table = build(&[(v4(9), 0), (v4(1), 5)], 2).expect("valid input");
        assert_eq!(table, [1, 1]);
    }

    #[test]
    fn large_tables_are_fast() {
        let backends: Vec<(IpAddr, u32)> = (1..=1000).map(|i| (v4(i), 1 + i % 7)).collect();
        let start = Instant::now();
        let table = build(&backends, 65537).expect("valid input");
        let elapsed = start.elapsed();
        println!("65537 slots, 1000 weighted backends: {elapsed:?}");
        let mut per_backend: HashMap<u32, usize> = HashMap::new();
        for &entry in &table {
            *per_backend.entry(entry).or_default() += 1;
        }
        assert_eq!(per_backend.len(), 1000);
        // Release takes a few milliseconds; the bound leaves room for debug builds.
        assert!(elapsed.as_secs_f64() < 2.0, "{elapsed:?}");

        // One heavy backend among many light ones: the heavy one fills most of the table
        // alone, which must not cost a pass over the exhausted backends per slot.
        let mut skewed: Vec<(IpAddr, u32)> = (1..=1000).map(|i| (v4(i), 1)).collect();
        skewed[500].1 = 65535;
        let start = Instant::now();
        let table = build(&skewed, 65537).expect("valid input");
        let elapsed = start.elapsed();
        println!("65537 slots, 1000 backends, one heavy: {elapsed:?}");
        assert!(table.iter().filter(|&&i| i == 500).count() > 64_000);
        assert!(elapsed.as_secs_f64() < 2.0, "{elapsed:?}");
    }
}
