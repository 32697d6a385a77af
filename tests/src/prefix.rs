//! Name prefixes unique to one lab instance, and the liveness check that lets
//! [`crate::Lab::sweep_stale`] remove what a killed test left behind.
//!
//! A prefix is `l3lab-<pid>-<n>`. Every process that issues prefixes holds an exclusive
//! `flock` on `/run/l3lb-lab/owners/<pid>.lock` for its whole life, so "is the owner of
//! this prefix still running?" is answered by trying that lock: this is immune to pid
//! reuse and works across pid namespaces that share `/run`.

use std::{
    collections::HashSet,
    fs::{self, File, OpenOptions},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock, PoisonError},
};

use crate::lab::LAB_ROOT;

/// First component of every name the lab creates.
pub const NAME_TAG: &str = "l3lab";

/// Prefixes issued by this process (live or already cleaned up).
static ISSUED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
/// The owner lock this process holds while it lives (`None` if it could not be taken).
static OWNER_LOCK: OnceLock<Option<File>> = OnceLock::new();

/// A name prefix unique to one lab instance: `l3lab-<pid>-<n>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Prefix(String);

impl Prefix {
    /// Issues a prefix that no namespace, pin directory or other instance uses.
    pub fn fresh() -> Prefix {
        hold_owner_lock();
        let pid = std::process::id();
        let taken = existing_names();
        let mut issued = ISSUED.lock().unwrap_or_else(PoisonError::into_inner);
        let issued = issued.get_or_insert_with(HashSet::new);
        let mut n = issued.len();
        loop {
            let candidate = format!("{NAME_TAG}-{pid}-{n}");
            let dashed = format!("{candidate}-");
            let collides = issued.contains(&candidate)
                || taken
                    .iter()
                    .any(|t| t == &candidate || t.starts_with(&dashed));
            if !collides {
                issued.insert(candidate.clone());
                return Prefix(candidate);
            }
            n += 1;
        }
    }

    /// The prefix as a string, e.g. `l3lab-4242-0`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The full name of a thing called `name` in this instance: `<prefix>-<name>`.
    pub fn name(&self, name: &str) -> String {
        format!("{}-{name}", self.0)
    }

    /// Splits a lab-created name (`l3lab-<pid>-<n>[-…]`) into its prefix and owner pid.
    pub fn parse(name: &str) -> Option<(Prefix, u32)> {
        let mut parts = name.splitn(4, '-');
        if parts.next()? != NAME_TAG {
            return None;
        }
        let pid_str = parts.next()?;
        let n_str = parts.next()?;
        let pid: u32 = pid_str.parse().ok()?;
        n_str.parse::<u64>().ok()?;
        Some((Prefix(format!("{NAME_TAG}-{pid_str}-{n_str}")), pid))
    }

    /// True when the instance that owns this prefix can no longer clean up after itself.
    pub fn is_stale(&self) -> bool {
        let Some((_, pid)) = Prefix::parse(&self.0) else {
            return false;
        };
        if pid == std::process::id() {
            // Same pid as ours: stale only if an earlier process with our pid issued it.
            let issued = ISSUED.lock().unwrap_or_else(PoisonError::into_inner);
            return !issued.as_ref().is_some_and(|s| s.contains(&self.0));
        }
        owner_is_dead(pid)
    }
}

impl std::fmt::Display for Prefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn owner_lock_path(pid: u32) -> PathBuf {
    Path::new(LAB_ROOT)
        .join("owners")
        .join(format!("{pid}.lock"))
}

/// Takes this process's owner lock once (best effort: without it, liveness falls back
/// to `/proc/<pid>`).
fn hold_owner_lock() {
    OWNER_LOCK.get_or_init(|| {
        let path = owner_lock_path(std::process::id());
        let dir = path.parent()?;
        fs::create_dir_all(dir).ok()?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .ok()?;
        // SAFETY: flock on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        (rc == 0).then_some(file)
    });
}

fn owner_is_dead(pid: u32) -> bool {
    match File::open(owner_lock_path(pid)) {
        Ok(file) => {
            // SAFETY: flock on a file descriptor we own; released when `file` drops.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            rc == 0
        }
        Err(_) => !Path::new("/proc").join(pid.to_string()).exists(),
    }
}

/// Names of namespaces and pin directories currently present that look lab-made.
fn existing_names() -> Vec<String> {
    let mut names = Vec::new();
    for dir in [
        PathBuf::from("/run/netns"),
        Path::new(LAB_ROOT).join("bpffs"),
    ] {
        if let Ok(entries) = fs::read_dir(dir) {
            names.extend(
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with(NAME_TAG)),
            );
        }
    }
    names
}
