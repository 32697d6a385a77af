//! The connection table (`L3LB_FLOWS`) from userspace, through a memory mapping.
//!
//! The table is an array of 64-byte values created with `BPF_F_MMAPABLE`: `buckets`
//! `FlowBucket`s (`FLOW_WAYS` tagged ways each, what the packet path reads), then a
//! `FlowRecord` per way (the flow's key and what `l3lb flows` shows). A flow lives in its
//! home bucket, in its overflow bucket when the home bucket was full (`flow_buckets_of`),
//! or nowhere, and a way whose tag is 0 is free. Reading it is plain loads (`l3lb status`
//! counts a table of a million entries in milliseconds, where walking a hash map's keys
//! took a system call per entry); writing places an entry the way the data plane does,
//! with `flow_place`.
//!
//! Only the part of the table in use is mapped, and only while it is used, so a reader's
//! resident memory does not grow with the table.
//!
//! Writes are not atomic against the data plane: an entry being replaced may be seen half
//! written by a packet of that flow. Userspace writes a table no program uses yet (a
//! migration, before the new program is attached) or one that tests and the benchmark
//! prepare.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    path::Path,
};

use aya::maps::{Map, MapData, MapError, MapType};
use lb_common::{
    FLOW_F_CONFIRMED, FLOW_WAYS, FlowBucket, FlowEntry, FlowKey, FlowRecord, FlowState, FlowWay,
    WideFlowBucket, flow_buckets_of, flow_place, flow_record_index, flow_table_buckets, flow_tag,
};
use thiserror::Error;

/// `BPF_F_MMAPABLE`, the creation flag the table needs.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Buckets mapped at a time by a walk over the table (256 KiB of ways, 1 MiB of records).
const WALK_BUCKETS: u32 = 4096;

/// Bytes of one value of the table (a bucket or a record).
const VALUE: usize = size_of::<FlowBucket>();

/// Errors of the connection-table accessor.
#[derive(Debug, Error)]
pub enum FlowTableError {
    /// The map is not a connection table of this build's layout.
    #[error(
        "{what} is not a connection table of this build: {found}; expected an array of \
         {VALUE}-byte values created with BPF_F_MMAPABLE, {} per bucket and a power of two \
         of buckets",
        1 + FLOW_WAYS
    )]
    Layout {
        /// The map (its name or pin).
        what: String,
        /// What it is instead.
        found: String,
    },
    /// The kernel's description of the map could not be read.
    #[error("{what}: {source}")]
    Map {
        /// What was done.
        what: String,
        /// The underlying error.
        source: MapError,
    },
    /// Duplicating the descriptor or mapping the table failed.
    #[error("{what}: {source}")]
    Io {
        /// What was done.
        what: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// A live entry of the table, with the bucket it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Located {
    /// Bucket index.
    pub bucket: u32,
    /// Way within the bucket.
    pub way: usize,
    /// The entry.
    pub entry: FlowEntry,
}

/// What [`FlowTable::insert_all`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placed {
    /// Entries written.
    pub written: usize,
    /// Live entries of other flows they displaced (their bucket was full).
    pub evicted: usize,
}

/// What carrying an earlier agent's map over kept of it (see `FlowTable::place_all`,
/// `Dataplane::migrate`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Carried {
    /// Entries read from the earlier map (for a connection table: distinct flows).
    pub offered: usize,
    /// Of those, entries the new map holds.
    pub kept: usize,
}

impl Carried {
    /// Entries that found no place.
    pub fn lost(&self) -> usize {
        self.offered.saturating_sub(self.kept)
    }
}

/// Access to one connection table (the map itself; the accessor holds a descriptor).
#[derive(Debug)]
pub struct FlowTable {
    fd: OwnedFd,
    buckets: u32,
    /// The hash seed the table is placed with (`flow_buckets_of`, `flow_tag`); walks do
    /// not need it.
    seed: u64,
    /// Whether walks check each way's tag against its record's key (see `verified`).
    verify: bool,
    page: usize,
    what: String,
}

/// A shared mapping of part of a map of 64-byte values, unmapped on drop.
struct Mapping {
    base: *mut libc::c_void,
    len: usize,
    /// Byte offset of `base` in the map.
    first: usize,
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map_values` mapped.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

impl Mapping {
    /// Pointer to value `index` of the map, which the mapping covers.
    fn value<T>(&self, index: u32) -> *mut T {
        let off = index as usize * VALUE;
        debug_assert!(off >= self.first && off + VALUE <= self.first + self.len);
        // SAFETY: in bounds of the mapping (debug-asserted; callers map the values they
        // touch), and page-aligned base plus a multiple of 64 keeps the values' alignment.
        unsafe { self.base.cast::<u8>().add(off - self.first).cast::<T>() }
    }
}

/// The buckets a read or write touches and their records, mapped.
struct View {
    ways: Mapping,
    records: Mapping,
    buckets: u32,
    /// The seed to check ways' tags with (see `FlowTable::verified`), if they are.
    verify: Option<u64>,
}

impl View {
    fn way(&self, bucket: u32, way: usize) -> *mut FlowWay {
        // SAFETY: way < FLOW_WAYS within a mapped bucket (see `Mapping::value`).
        unsafe { &raw mut (*self.ways.value::<FlowBucket>(bucket)).ways[way] }
    }

    fn record(&self, bucket: u32, way: usize) -> *mut FlowRecord {
        self.records
            .value(flow_record_index(self.buckets, bucket, way))
    }

    /// A copy of `bucket`'s ways (volatile: the data plane writes concurrently).
    fn bucket(&self, bucket: u32) -> FlowBucket {
        // SAFETY: see `Mapping::value`; any bit pattern is a valid FlowBucket.
        unsafe { std::ptr::read_volatile(self.ways.value(bucket)) }
    }

    /// The entry in way `way` of `bucket`, if it is live.
    fn read(&self, bucket: u32, way: usize) -> Option<FlowEntry> {
        // SAFETY: see `Mapping::value`; any bit pattern is a valid FlowWay / FlowRecord.
        let w = unsafe { std::ptr::read_volatile(self.way(bucket, way)) };
        if w.is_free() {
            return None;
        }
        let r = unsafe { std::ptr::read_volatile(self.record(bucket, way)) };
        // A way whose tag is not its record key's bound to its backend is the torn
        // remains of two concurrent writes (see `FlowWay::bind`): no flow, as the data
        // plane reads it, and not to be listed or carried over as one.
        if let Some(seed) = self.verify
            && !w.holds(flow_tag(&r.key.words64(), seed))
        {
            return None;
        }
        Some(FlowEntry {
            key: r.key,
            state: FlowState {
                backend: w.backend,
                service: r.service,
                created_ns: r.created_ns,
            },
            seen: w.seen,
            flags: if w.confirmed() { FLOW_F_CONFIRMED } else { 0 },
        })
    }

    /// Writes `entry` (tagged `tag`) into way `way` of `bucket`: the way is freed first
    /// and its tag written last, so a concurrent reader sees the old entry, no entry, or
    /// the new one.
    fn write(&self, bucket: u32, way: usize, entry: &FlowEntry, tag: u64) {
        use std::sync::atomic::{Ordering, fence};
        let w = self.way(bucket, way);
        let r = self.record(bucket, way);
        let record = FlowRecord {
            key: entry.key,
            service: entry.state.service,
            created_ns: entry.state.created_ns,
            ..FlowRecord::default()
        };
        // SAFETY: see `Mapping::value`; the mappings are writable when callers write.
        unsafe {
            std::ptr::write_volatile(&raw mut (*w).tag, 0);
            fence(Ordering::SeqCst);
            std::ptr::write_volatile(r, record);
            std::ptr::write_volatile(&raw mut (*w).backend, entry.state.backend);
            std::ptr::write_volatile(&raw mut (*w).seen, entry.seen);
            fence(Ordering::SeqCst);
            let confirmed = u64::from(entry.flags & FLOW_F_CONFIRMED);
            std::ptr::write_volatile(
                &raw mut (*w).tag,
                FlowWay::bind(tag, entry.state.backend) | confirmed,
            );
        }
    }
}

/// The kernel's description of an array map: (type, key size, value size, entries, flags).
fn describe(data: &MapData, what: &str) -> Result<(MapType, u32, u32, u32, u32), FlowTableError> {
    let info = data.info().map_err(|source| FlowTableError::Map {
        what: format!("reading the description of {what}"),
        source,
    })?;
    let map_type = info.map_type().map_err(|source| FlowTableError::Map {
        what: format!("reading the type of {what}"),
        source,
    })?;
    Ok((
        map_type,
        info.key_size(),
        info.value_size(),
        info.max_entries(),
        info.map_flags(),
    ))
}

/// The system's page size.
fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize
}

/// Maps bytes `start..end` of the map behind `fd` (rounded out to pages; read-only
/// unless `write`).
fn map_bytes(
    fd: &OwnedFd,
    page: usize,
    start: usize,
    end: usize,
    write: bool,
    what: &str,
) -> Result<Mapping, FlowTableError> {
    let first = start / page * page;
    let len = end.div_ceil(page) * page - first;
    let prot = if write {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a shared mapping of part of the map; the kernel checks the range against
    // the map's size and the protection against how it was created.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            first as libc::off_t,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(FlowTableError::Io {
            what: format!("mapping {what} into memory"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(Mapping { base, len, first })
}

/// A descriptor of its own for the map behind `data`.
fn own_fd(data: &MapData, what: &str) -> Result<OwnedFd, FlowTableError> {
    data.fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| FlowTableError::Io {
            what: format!("duplicating the descriptor of {what}"),
            source,
        })
}

impl FlowTable {
    /// The table behind `data`, checked to have this build's layout; `what` names it in
    /// errors.
    pub fn from_map_data(data: &MapData, what: &str) -> Result<Self, FlowTableError> {
        let (map_type, key, value, values, flags) = describe(data, what)?;
        let buckets = flow_table_buckets(values);
        let Some(buckets) = buckets.filter(|_| {
            map_type == MapType::Array
                && key == 4
                && value as usize == VALUE
                && flags & BPF_F_MMAPABLE != 0
        }) else {
            return Err(FlowTableError::Layout {
                what: what.to_string(),
                found: format!(
                    "{map_type:?} with {key}-byte keys, {value}-byte values, {values} entries, \
                     flags {flags:#x}"
                ),
            });
        };
        Ok(Self {
            fd: own_fd(data, what)?,
            buckets,
            seed: 0,
            verify: false,
            page: page_size(),
            what: what.to_string(),
        })
    }

    /// The same table, looked up and placed with hash seed `seed` (the program's
    /// `FLOW_SEED`; 0 until set, which only walks and tables of seed 0 may use).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The same table, its walks (`for_each`, `entries`, `count`, placements) checking each
    /// way's tag against its record's key with this table's seed, as lookups do: for a
    /// table known to hold this build's tags (its own, or one whose settings say so), so
    /// that the torn remains of concurrent writes are neither listed nor carried over.
    /// A table of another tag format is walked unchecked (its tags would all disagree).
    pub fn verified(mut self) -> Self {
        self.verify = true;
        self
    }

    /// The home and overflow buckets of `key` in this table.
    pub fn buckets_of(&self, key: &FlowKey) -> (u32, u32) {
        flow_buckets_of(key, self.buckets, self.seed)
    }

    /// The tag that identifies `key`'s entry in this table (`flow_tag`).
    pub fn tag_of(&self, key: &FlowKey) -> u64 {
        flow_tag(&key.words64(), self.seed)
    }

    /// The table of a loaded program's map (`Ebpf::map(L3LB_FLOWS)`).
    pub fn from_map(map: &Map, what: &str) -> Result<Self, FlowTableError> {
        match map {
            Map::Array(data) => Self::from_map_data(data, what),
            other => Err(FlowTableError::Layout {
                what: what.to_string(),
                found: format!("{:?}", MapKind(other)),
            }),
        }
    }

    /// The table pinned at `path`, with the hash seed its agent keeps beside it
    /// (`L3LB_SETTINGS` in the same directory; 0 without one).
    pub fn from_pin(path: &Path) -> Result<Self, FlowTableError> {
        let what = path.display().to_string();
        let data = MapData::from_pin(path).map_err(|source| FlowTableError::Map {
            what: format!("opening {what}"),
            source,
        })?;
        let table = Self::from_map_data(&data, &what)?;
        // The agent that pinned it keeps its hash seed in the settings array beside it.
        let dir = path.parent();
        let seed = dir
            .and_then(crate::handover::previous_flow_seed)
            .unwrap_or(0);
        let table = table.with_seed(seed);
        // Its agent's settings say whether it holds this build's tags, and a sample of its
        // entries whether they were made with that seed (an agent stopped between pinning
        // its settings and its table leaves them disagreeing: then every way would fail).
        if dir.and_then(crate::handover::previous_flow_tags) == Some(lb_common::FLOW_TAGS_BOUND)
            && table.tags_agree(64)?
        {
            Ok(table.verified())
        } else {
            Ok(table)
        }
    }

    /// Buckets in the table.
    pub fn buckets(&self) -> u32 {
        self.buckets
    }

    /// Entries the table holds when full: buckets × `FLOW_WAYS`.
    pub fn capacity(&self) -> u64 {
        u64::from(self.buckets) * FLOW_WAYS as u64
    }

    /// Maps buckets `first..first + count` and their records (read-only unless `write`).
    fn view(&self, first: u32, count: u32, write: bool) -> Result<View, FlowTableError> {
        let end = (u64::from(first) + u64::from(count)).min(u64::from(self.buckets)) as u32;
        let ways = map_bytes(
            &self.fd,
            self.page,
            first as usize * VALUE,
            end as usize * VALUE,
            write,
            &self.what,
        )?;
        let records = map_bytes(
            &self.fd,
            self.page,
            flow_record_index(self.buckets, first, 0) as usize * VALUE,
            flow_record_index(self.buckets, end, 0) as usize * VALUE,
            write,
            &self.what,
        )?;
        Ok(View {
            ways,
            records,
            buckets: self.buckets,
            verify: self.verify.then_some(self.seed),
        })
    }

    /// Calls `f` with every live entry, bucket by bucket. Entries the data plane writes
    /// meanwhile may or may not be seen.
    pub fn for_each(&self, mut f: impl FnMut(Located)) -> Result<(), FlowTableError> {
        let mut first = 0u32;
        while first < self.buckets {
            let count = WALK_BUCKETS.min(self.buckets - first);
            let v = self.view(first, count, false)?;
            for bucket in first..first + count {
                for way in 0..FLOW_WAYS {
                    if let Some(entry) = v.read(bucket, way) {
                        f(Located { bucket, way, entry });
                    }
                }
            }
            first += count;
        }
        Ok(())
    }

    /// Whether the first `sample` live entries (bucket order) carry the tags this table's
    /// seed and this build's `flow_tag` give their keys: false when a table is searched
    /// with another seed or tag format than it was written with (an agent that stopped
    /// between pinning its settings and its table), whose lookups would all miss. Most
    /// must agree, not all: a way torn by concurrent writes disagrees on its own, and one
    /// such must not make a takeover re-place the whole table.
    pub fn tags_agree(&self, sample: usize) -> Result<bool, FlowTableError> {
        let (mut agree, mut disagree) = (0usize, 0usize);
        self.sample_tags(sample, |ok| {
            if ok {
                agree += 1;
            } else {
                disagree += 1;
            }
        })?;
        Ok(agree >= disagree * 4)
    }

    /// Calls `f` with whether each of the first `sample` live ways holds its record's key.
    fn sample_tags(&self, sample: usize, mut f: impl FnMut(bool)) -> Result<(), FlowTableError> {
        let mut seen = 0usize;
        let mut first = 0u32;
        while first < self.buckets && seen < sample {
            let count = WALK_BUCKETS.min(self.buckets - first);
            let v = self.view(first, count, false)?;
            for bucket in first..first + count {
                for way in 0..FLOW_WAYS {
                    // SAFETY: see `Mapping::value`; any bit pattern is a valid FlowWay /
                    // FlowRecord.
                    let w = unsafe { std::ptr::read_volatile(v.way(bucket, way)) };
                    if w.is_free() {
                        continue;
                    }
                    let r = unsafe { std::ptr::read_volatile(v.record(bucket, way)) };
                    f(w.holds(self.tag_of(&r.key)));
                    seen += 1;
                    if seen >= sample {
                        return Ok(());
                    }
                }
            }
            first += count;
        }
        Ok(())
    }

    /// Every live entry.
    pub fn entries(&self) -> Result<Vec<FlowEntry>, FlowTableError> {
        let mut out = Vec::new();
        self.for_each(|l| out.push(l.entry))?;
        Ok(out)
    }

    /// Ways in use now (reads the ways only: a way torn by concurrent writes counts until
    /// it is replaced, as it takes a place).
    pub fn count(&self) -> Result<u64, FlowTableError> {
        let mut n = 0u64;
        let mut first = 0u32;
        while first < self.buckets {
            let count = WALK_BUCKETS.min(self.buckets - first);
            let end = first + count;
            let m = map_bytes(
                &self.fd,
                self.page,
                first as usize * VALUE,
                end as usize * VALUE,
                false,
                &self.what,
            )?;
            for bucket in first..end {
                // SAFETY: see `Mapping::value`; any bit pattern is a valid FlowBucket.
                let b: FlowBucket = unsafe { std::ptr::read_volatile(m.value(bucket)) };
                n += b.ways.iter().filter(|w| !w.is_free()).count() as u64;
            }
            first = end;
        }
        Ok(n)
    }

    /// The entry of `key`, if the table holds it (in either of its buckets).
    pub fn get(&self, key: &FlowKey) -> Result<Option<FlowEntry>, FlowTableError> {
        if key.family == 0 {
            return Ok(None);
        }
        let tag = self.tag_of(key);
        let (home, over) = self.buckets_of(key);
        for bucket in [home, over] {
            let v = self.view(bucket, 1, false)?;
            let b = v.bucket(bucket);
            if let Some(way) = b.ways.iter().position(|w| w.holds(tag)) {
                return Ok(v.read(bucket, way));
            }
        }
        Ok(None)
    }

    /// Writes `entry` where the data plane would (`flow_place` with epoch `now`): over
    /// the entry of the same key, else into a free way of its home bucket, else of its
    /// overflow bucket, else over the unconfirmed entry of the two seen longest ago, else
    /// over their entry seen longest ago. Returns the live entry of another flow it
    /// displaced.
    pub fn insert(&self, entry: &FlowEntry, now: u32) -> Result<Option<FlowEntry>, FlowTableError> {
        let (home, over) = self.buckets_of(&entry.key);
        let home_view = self.view(home, 1, true)?;
        let over_view = self.view(over, 1, true)?;
        let tag = self.tag_of(&entry.key);
        Ok(place(
            (&home_view, home),
            (&over_view, over),
            entry,
            tag,
            now,
        ))
    }

    /// [`FlowTable::insert`] for many entries, with one mapping of the whole table (for
    /// migrations and for filling a table in tests and the benchmark).
    pub fn insert_all(
        &self,
        entries: impl IntoIterator<Item = FlowEntry>,
        now: u32,
    ) -> Result<Placed, FlowTableError> {
        let v = self.view(0, self.buckets, true)?;
        let mut placed = Placed::default();
        for entry in entries {
            if entry.key.family == 0 {
                continue;
            }
            let (home, over) = self.buckets_of(&entry.key);
            let tag = self.tag_of(&entry.key);
            if place((&v, home), (&v, over), &entry, tag, now).is_some() {
                placed.evicted += 1;
            }
            placed.written += 1;
        }
        Ok(placed)
    }

    /// Places the entries of another table (a migration or conversion) so that what the
    /// data plane would keep is kept: one entry per key (the confirmed, then the most
    /// recently seen, of two: a table can hold a key twice after a downgrade and an
    /// upgrade), written least valuable first, so that where more entries share a
    /// bucket than it has ways, those that give way are the unconfirmed and then the
    /// least recently seen, whatever order the other table's walk met them in. Returns
    /// the distinct flows offered and those kept.
    pub fn place_all(&self, entries: Vec<FlowEntry>, now: u32) -> Result<Carried, FlowTableError> {
        // Higher is kept first: confirmed, then seen more recently (ages are epoch
        // distances from `now`, so the counter may wrap).
        let value = |e: &FlowEntry| {
            (
                e.flags & FLOW_F_CONFIRMED != 0,
                std::cmp::Reverse(now.wrapping_sub(e.seen)),
            )
        };
        let mut best: std::collections::HashMap<FlowKey, FlowEntry> =
            std::collections::HashMap::with_capacity(entries.len());
        for e in entries {
            match best.entry(e.key) {
                std::collections::hash_map::Entry::Occupied(mut o) => {
                    if value(&e) > value(o.get()) {
                        o.insert(e);
                    }
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(e);
                }
            }
        }
        let mut unique: Vec<FlowEntry> = best.into_values().collect();
        let offered = unique.len();
        // Ties broken by key, so a migration places alike however the walk went.
        unique.sort_by(|a, b| {
            value(a)
                .cmp(&value(b))
                .then_with(|| a.key.words64().cmp(&b.key.words64()))
        });
        let placed = self.insert_all(unique, now)?;
        Ok(Carried {
            offered,
            kept: placed.written - placed.evicted,
        })
    }
}

/// Writes `entry` (tagged `tag`) into the way `flow_place` picks of its home and overflow
/// buckets (each with a view that covers it writable); returns the live entry of another
/// flow it replaced.
fn place(
    home: (&View, u32),
    over: (&View, u32),
    entry: &FlowEntry,
    tag: u64,
    now: u32,
) -> Option<FlowEntry> {
    let (overflow, way) = flow_place(&home.0.bucket(home.1), &over.0.bucket(over.1), tag, now);
    let (v, bucket) = if overflow { over } else { home };
    let old = v.read(bucket, way);
    let displaced = v.bucket(bucket).ways[way];
    v.write(bucket, way, entry, tag);
    old.filter(|_| !displaced.holds(tag))
}

/// Whether `data` is a connection table of the builds before tagged ways: an array of
/// `WideFlowBucket`s (whole 64-byte entries, four to a bucket), memory-mappable.
pub fn is_wide_table(map_type: u32, key: u32, value: u32) -> bool {
    map_type == MapType::Array as u32 && key == 4 && value as usize == size_of::<WideFlowBucket>()
}

/// Every live entry of a connection table of the builds before tagged ways (see
/// `is_wide_table`), for converting it; `what` names it in errors.
pub fn wide_table_entries(data: &MapData, what: &str) -> Result<Vec<FlowEntry>, FlowTableError> {
    let (map_type, key, value, buckets, flags) = describe(data, what)?;
    if !is_wide_table(map_type as u32, key, value) || flags & BPF_F_MMAPABLE == 0 {
        return Err(FlowTableError::Layout {
            what: what.to_string(),
            found: format!(
                "{map_type:?} with {key}-byte keys, {value}-byte values, flags {flags:#x} \
                 (not the earlier layout either)"
            ),
        });
    }
    let fd = own_fd(data, what)?;
    let page = page_size();
    let size = size_of::<WideFlowBucket>();
    let mut out = Vec::new();
    let mut first = 0u32;
    while first < buckets {
        let end = first + WALK_BUCKETS.min(buckets - first);
        let m = map_bytes(
            &fd,
            page,
            first as usize * size,
            end as usize * size,
            false,
            what,
        )?;
        for bucket in first..end {
            let off = bucket as usize * size - m.first;
            // SAFETY: within the mapping (it covers buckets first..end), 64-aligned; any
            // bit pattern is a valid WideFlowBucket.
            let b: WideFlowBucket = unsafe {
                std::ptr::read_volatile(m.base.cast::<u8>().add(off).cast::<WideFlowBucket>())
            };
            out.extend(b.ways.iter().filter(|e| e.key.family != 0).copied());
        }
        first = end;
    }
    Ok(out)
}

/// A map's kind for messages (`Map` itself prints its whole descriptor).
struct MapKind<'a>(&'a Map);

impl std::fmt::Debug for MapKind<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = format!("{:?}", self.0);
        f.write_str(s.split('(').next().unwrap_or("another map type"))
    }
}

#[cfg(test)]
mod tests {
    use aya::maps::Array;
    use lb_common::{FAMILY_V4, FLOW_F_CONFIRMED, FlowState, PROTO_TCP, flow_buckets};

    use super::*;

    /// A key of client 198.18.x.y, port `sport`, to 192.0.2.10:80.
    fn key(client: u32, sport: u16) -> FlowKey {
        let mut k = FlowKey {
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&(0xc612_0000 + client).to_be_bytes());
        k.dst[..4].copy_from_slice(&[192, 0, 2, 10]);
        k
    }

    fn entry(k: FlowKey, backend: u32, seen: u32, flags: u32) -> FlowEntry {
        FlowEntry {
            key: k,
            state: FlowState {
                backend,
                service: 1,
                created_ns: 1000 + u64::from(backend),
            },
            seen,
            flags,
        }
    }

    /// A standalone table of `buckets` buckets, as the loader creates `L3LB_FLOWS`.
    /// `None` without the privileges to create maps (then the test has nothing to check).
    /// An unchecked accessor of `map` (seed 0).
    fn table_of(map: &Array<MapData, FlowBucket>) -> ((), FlowTable) {
        (
            (),
            FlowTable::from_map_data(aya::maps::IterableMap::map(map), "test table")
                .expect("accessor"),
        )
    }

    fn table(buckets: u32) -> Option<(Array<MapData, FlowBucket>, FlowTable)> {
        let values = lb_common::flow_table_values(buckets);
        let map = match Array::<MapData, FlowBucket>::create(values, BPF_F_MMAPABLE) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("skipped: cannot create a BPF map here ({e})");
                return None;
            }
        };
        let t = FlowTable::from_map_data(aya::maps::IterableMap::map(&map), "test table")
            .expect("accessor");
        Some((map, t))
    }

    #[test]
    fn a_torn_way_is_no_flow_to_verified_walks_and_does_not_sink_the_tag_sample() {
        let Some((mut map, t)) = table(256) else {
            return;
        };
        let t = t.verified();
        let good: Vec<FlowEntry> = (0..9)
            .map(|i| entry(key(2, 2000 + i), 5, 3, FLOW_F_CONFIRMED))
            .collect();
        for e in &good {
            t.insert(e, 3).expect("insert");
        }
        let a = entry(key(1, 1000), 7, 3, FLOW_F_CONFIRMED);
        t.insert(&a, 3).expect("insert");
        // Torn as two concurrent writers can leave it: the tag bound to backend 7, the
        // backend field another flow's 9.
        let home = t.buckets_of(&a.key).0;
        let mut b = map.get(&home, 0).expect("bucket");
        let way = b
            .ways
            .iter()
            .position(|w| w.holds(t.tag_of(&a.key)))
            .expect("way");
        b.ways[way].backend = 9;
        map.set(home, b, 0).expect("set");
        assert_eq!(
            t.get(&a.key).expect("get"),
            None,
            "as the data plane reads it"
        );
        let listed = t.entries().expect("entries");
        assert_eq!(
            listed.len(),
            9,
            "listed and carried over: the nine whole ones"
        );
        assert!(listed.iter().all(|e| e.key != a.key));
        assert_eq!(
            t.count().expect("count"),
            10,
            "ways in use: the torn one until replaced"
        );
        assert!(t.tags_agree(64).expect("sample"), "one torn way among ten");
        // Unchecked (a table of another tag format), every way is walked.
        let (_, unchecked) = table_of(&map);
        assert_eq!(unchecked.entries().expect("entries").len(), 10);
    }

    #[test]
    fn entries_go_where_the_data_plane_looks_and_come_back() {
        let Some((map, t)) = table(flow_buckets(4096)) else {
            return;
        };
        assert_eq!(t.buckets(), 1024);
        assert_eq!(t.capacity(), 4096);
        assert_eq!(t.count().expect("count"), 0, "a new table is empty");
        let a = entry(key(1, 1000), 7, 3, FLOW_F_CONFIRMED);
        assert_eq!(t.insert(&a, 3).expect("insert"), None);
        assert_eq!(t.get(&a.key).expect("get"), Some(a));
        assert_eq!(t.get(&key(1, 1001)).expect("get"), None);
        // The kernel's view (a system call, not the mapping) agrees on the bucket, the
        // way and its record.
        let home = t.buckets_of(&a.key).0;
        let b = map.get(&home, 0).expect("bucket");
        let way = b
            .ways
            .iter()
            .position(|w| w.holds(t.tag_of(&a.key)) && w.confirmed() && w.backend == 7)
            .expect("a way of the home bucket holds the flow");
        let rec = map
            .get(&lb_common::flow_record_index(t.buckets(), home, way), 0)
            .expect("record");
        // SAFETY: a record is a 64-byte value of the same array.
        let rec: FlowRecord = unsafe { std::mem::transmute(rec) };
        assert_eq!((rec.key, rec.service, rec.created_ns), (a.key, 1, 1007));
        // Writing the same key again replaces its entry.
        let a2 = entry(a.key, 8, 4, 0);
        assert_eq!(t.insert(&a2, 4).expect("insert"), None);
        assert_eq!(t.get(&a.key).expect("get"), Some(a2));
        assert_eq!(t.count().expect("count"), 1);
    }

    /// Keys (distinct from `not`) whose home bucket in a 256-bucket table is `home`.
    fn homed_at(home: u32, n: usize, not: &[FlowKey]) -> Vec<FlowKey> {
        let keys: Vec<FlowKey> = (0..200_000u32)
            .map(|i| key(i / 1000, (i % 1000) as u16 + 1))
            .filter(|k| flow_buckets_of(k, 256, 0).0 == home && !not.contains(k))
            .take(n)
            .collect();
        assert_eq!(keys.len(), n);
        keys
    }

    #[test]
    fn a_migration_keeps_what_the_data_plane_would_whatever_the_walk_order() {
        let Some((_map, t)) = table(256) else {
            return;
        };
        // A lone SYN whose home and overflow buckets are both filled by confirmed flows,
        // met last by the other table's walk: written in that order, it evicted one.
        let lone = key(0, 1);
        let (home, over) = flow_buckets_of(&lone, 256, 0);
        assert_ne!(home, over, "pick another key if this ever fails");
        let mut entries: Vec<FlowEntry> = homed_at(over, 4, &[lone])
            .into_iter()
            .chain(homed_at(home, 4, &[lone]))
            .enumerate()
            .map(|(i, k)| entry(k, i as u32, 90 + i as u32, FLOW_F_CONFIRMED))
            .collect();
        entries.push(entry(lone, 8, 100, 0));
        // The same key twice (a downgrade wrote a second entry): the more recently seen
        // is kept, and counted once.
        let twice = key(77, 7);
        entries.push(entry(twice, 20, 100, FLOW_F_CONFIRMED));
        entries.push(entry(twice, 21, 40, FLOW_F_CONFIRMED));
        let kept = t.place_all(entries.clone(), 100).expect("place");
        for e in &entries[..8] {
            assert_eq!(
                t.get(&e.key).expect("get").map(|x| x.state.backend),
                Some(e.state.backend),
                "a confirmed entry stays"
            );
        }
        // Written first, the lone SYN took a way while there was room; the confirmed
        // flow that then found its home bucket full went to its own overflow bucket.
        assert!(t.get(&lone).expect("get").is_some());
        assert_eq!(
            t.get(&twice).expect("get").map(|x| x.state.backend),
            Some(20)
        );
        assert_eq!(
            kept,
            Carried {
                offered: 10,
                kept: 10
            },
            "nothing displaced, the twice-met key counted once"
        );
        assert_eq!(t.count().expect("count"), 10);
    }

    /// A table too small for what it is given keeps what fits and says how many flows
    /// found no place (the agent warns with that number; a conversion used to report
    /// every flow kept).
    #[test]
    fn placing_more_flows_than_fit_reports_those_lost() {
        let Some((_map, t)) = table(64) else {
            return;
        };
        let ways = 64 * lb_common::FLOW_WAYS;
        let entries: Vec<FlowEntry> = (0..(2 * ways) as u32)
            .map(|i| entry(key(i, 1000 + (i % 7) as u16), i, 50, FLOW_F_CONFIRMED))
            .collect();
        let carried = t.place_all(entries, 50).expect("place");
        let held = t.count().expect("count") as usize;
        assert_eq!(carried.offered, 2 * ways);
        assert_eq!(carried.kept, held, "kept is what the table holds");
        assert!(held <= ways, "{held} entries in {ways} ways");
        assert_eq!(carried.lost(), 2 * ways - held);
        assert!(carried.lost() >= ways);
    }

    #[test]
    fn a_full_home_bucket_overflows_then_the_unconfirmed_entry_goes_first() {
        let Some((map, t)) = table(256) else {
            return;
        };
        // Five keys of one home bucket.
        let home = flow_buckets_of(&key(0, 1), 256, 0).0;
        let same = homed_at(home, 5, &[]);
        let over = flow_buckets_of(&same[4], 256, 0).1;
        assert_ne!(over, home, "pick another first key if this ever fails");
        // Two old confirmed, one newer unconfirmed (a lone SYN), one newer confirmed.
        let first = [
            entry(same[0], 1, 10, FLOW_F_CONFIRMED),
            entry(same[1], 2, 11, FLOW_F_CONFIRMED),
            entry(same[2], 3, 30, 0),
            entry(same[3], 4, 31, FLOW_F_CONFIRMED),
        ];
        let placed = t.insert_all(first, 40).expect("insert_all");
        assert_eq!(
            placed,
            Placed {
                written: 4,
                evicted: 0
            }
        );
        // The fifth flow of a full home bucket takes a free way of its overflow bucket:
        // nobody is displaced, and it is found there.
        let fifth = entry(same[4], 5, 40, 0);
        assert_eq!(t.insert(&fifth, 40).expect("insert"), None);
        assert_eq!(t.get(&same[4]).expect("get"), Some(fifth));
        assert_eq!(t.count().expect("count"), 5);

        // A sixth flow of the first bucket whose overflow bucket is full too (filled with
        // flows at home there, confirmed and fresh): the unconfirmed entry seen longest
        // ago of the two buckets goes, though older confirmed ones exist.
        let sixth_key = homed_at(home, 6, &[])[5];
        let over6 = flow_buckets_of(&sixth_key, 256, 0).1;
        assert_ne!(over6, home, "pick another first key if this ever fails");
        let bucket = map.get(&over6, 0).expect("bucket");
        let free = bucket.ways.iter().filter(|w| w.is_free()).count();
        let locals = homed_at(over6, free, &same);
        for (i, k) in locals.iter().enumerate() {
            let e = entry(*k, 10 + i as u32, 41, FLOW_F_CONFIRMED);
            assert_eq!(t.insert(&e, 41).expect("insert"), None);
        }
        let sixth = entry(sixth_key, 6, 41, 0);
        assert_eq!(
            t.insert(&sixth, 41).expect("insert"),
            Some(first[2]),
            "the unconfirmed entry goes first"
        );
        assert_eq!(t.get(&sixth_key).expect("get"), Some(sixth));
        assert_eq!(t.get(&same[2]).expect("get"), None);
        assert_eq!(t.count().expect("count"), 5 + free as u64);
    }

    #[test]
    fn a_walk_sees_every_entry_of_a_large_table_once() {
        let Some((_map, t)) = table(flow_buckets(100_000)) else {
            return;
        };
        assert_eq!(t.buckets(), 32_768, "more than one walk window");
        let n = 60_000u32;
        let placed = t
            .insert_all((0..n).map(|i| entry(key(i, 1), i, 0, 0)), 0)
            .expect("insert_all");
        assert_eq!(placed.written, n as usize);
        let count = t.count().expect("count");
        assert_eq!(count + placed.evicted as u64, u64::from(n));
        // 46 % full, 1.83 flows per bucket on average: with a fair hash (Poisson), about
        // 3 % of the flows find their home bucket full (≈ 1 800 here); their overflow
        // buckets take all but ≈ 0.3 % (≈ 160 in a simulation of this policy).
        assert!(placed.evicted < 400, "{placed:?}");
        let mut seen = std::collections::HashSet::new();
        t.for_each(|l| {
            let (home, over) = t.buckets_of(&l.entry.key);
            assert!(l.bucket == home || l.bucket == over, "{l:?}");
            assert!(seen.insert(l.entry.key), "seen twice: {l:?}");
        })
        .expect("walk");
        assert_eq!(seen.len() as u64, count);
    }

    #[test]
    fn another_layout_is_refused_with_what_it_is() {
        let map = match Array::<MapData, u64>::create(16, 0) {
            Ok(m) => m,
            Err(_) => return,
        };
        let err = FlowTable::from_map_data(aya::maps::IterableMap::map(&map), "L3LB_FLOWS")
            .expect_err("a u64 array is no connection table");
        let text = err.to_string();
        assert!(
            text.contains("L3LB_FLOWS")
                && text.contains("8-byte values")
                && text.contains("64-byte values created with BPF_F_MMAPABLE, 5 per bucket"),
            "{text}"
        );
        // The right values but not a whole table: 3 buckets' worth is no power of two.
        let Ok(map) = Array::<MapData, FlowBucket>::create(15, BPF_F_MMAPABLE) else {
            return;
        };
        let err = FlowTable::from_map_data(aya::maps::IterableMap::map(&map), "odd")
            .expect_err("15 values is no table");
        assert!(err.to_string().contains("15 entries"), "{err}");
    }

    #[test]
    fn a_table_of_whole_entries_from_an_earlier_build_is_read_for_conversion() {
        let Ok(mut map) = Array::<MapData, WideFlowBucket>::create(8192, BPF_F_MMAPABLE) else {
            return;
        };
        let mut b = WideFlowBucket::default();
        b.ways[1] = entry(key(1, 1), 3, 9, FLOW_F_CONFIRMED);
        b.ways[3] = entry(key(2, 2), 4, 8, 0);
        map.set(7, b, 0).expect("set");
        let mut c = WideFlowBucket::default();
        c.ways[0] = entry(key(3, 3), 5, 7, 0);
        map.set(4100, c, 0).expect("set");
        let data = aya::maps::IterableMap::map(&map);
        let mut got = wide_table_entries(data, "old").expect("read");
        got.sort_by_key(|e| e.state.backend);
        assert_eq!(got, vec![b.ways[1], b.ways[3], c.ways[0]]);
        assert!(
            FlowTable::from_map_data(data, "old").is_err(),
            "not this build's layout"
        );
        // And this build's table is not taken for an earlier one.
        let Some((new, _)) = table(256) else { return };
        assert!(wide_table_entries(aya::maps::IterableMap::map(&new), "new").is_err());
    }
}
