//! Processes started inside a namespace, logging to a file, stopped on drop.

use std::{
    env,
    ffi::OsStr,
    fs::{self, OpenOptions},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::Netns;

/// How long [`ChildGuard::stop`] (and drop) waits after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Path of the `l3lb` binary: `$L3LB_BIN`, else next to the test's target directory.
///
/// Cargo puts test executables in `target/<profile>/deps/` and binaries in
/// `target/<profile>/`, so `<dir of current_exe>/../l3lb` (or `<dir>/l3lb`) is tried.
pub fn l3lb_bin() -> Result<PathBuf> {
    if let Some(path) = env::var_os("L3LB_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("L3LB_BIN={} does not exist", path.display());
        }
        return Ok(path);
    }
    let exe = env::current_exe().context("finding the current executable")?;
    let dir = exe
        .parent()
        .with_context(|| format!("{} has no parent directory", exe.display()))?;
    let candidates = [dir.join("../l3lb"), dir.join("l3lb")];
    for candidate in &candidates {
        if candidate.is_file() {
            return Ok(candidate
                .canonicalize()
                .unwrap_or_else(|_| candidate.clone()));
        }
    }
    bail!(
        "the l3lb binary is not at {} or {}: build it with `cargo build -p l3lb` \
         (same profile as the tests) or set L3LB_BIN",
        candidates[0].display(),
        candidates[1].display()
    )
}

/// Starts `cmd args…` inside `ns` (`ip netns exec`), stdout and stderr to `log_path`.
///
/// The log file is truncated first. `ip netns exec` execs the command, so the child's
/// pid is the command's own and signals reach it directly.
pub fn spawn_in<I, S>(
    ns: &Netns,
    cmd: impl AsRef<OsStr>,
    args: I,
    log_path: &Path,
) -> Result<ChildGuard>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let label = std::iter::once(cmd.as_ref().to_string_lossy().into_owned())
        .chain(args.iter().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(dir) = log_path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let log = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(log_path)
        .with_context(|| format!("opening log {}", log_path.display()))?;
    let log_err = log.try_clone()?;
    // Its own process group: a Ctrl-C at the terminal reaches the test or demo, which then
    // stops its children in order, instead of killing the agents under its feet.
    let mut command = Command::new("ip");
    // SIGHUP back to its default: a run started under `nohup` ignores it, children
    // inherit that, and a shell cannot trap a signal ignored on entry (the lab's
    // processes and tests signal their children with it).
    // SAFETY: only sigaction(2), which is async-signal-safe, runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            Ok(())
        });
    }
    let child = command
        .process_group(0)
        .args(["netns", "exec", ns.name()])
        .arg(cmd.as_ref())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .with_context(|| format!("starting `{label}` in {}", ns.name()))?;
    Ok(ChildGuard {
        child,
        log_path: log_path.to_owned(),
        label: format!("`{label}` in {}", ns.name()),
        status: None,
    })
}

/// A running process; drop sends SIGTERM, waits up to 5 s, then SIGKILLs it.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    log_path: PathBuf,
    label: String,
    status: Option<ExitStatus>,
}

impl ChildGuard {
    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The log file (stdout and stderr).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// A reader of the log's lines as they are written, from the current end on.
    pub fn tail(&self) -> Result<LogTail> {
        let file = fs::File::open(&self.log_path)
            .with_context(|| format!("opening log {}", self.log_path.display()))?;
        let offset = file.metadata()?.len();
        Ok(LogTail {
            file,
            offset,
            partial: Vec::new(),
        })
    }

    /// Everything the process has logged so far (lossy UTF-8; empty if unreadable).
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Sends a signal, e.g. `libc::SIGHUP`.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        if let Some(status) = self.try_status()? {
            bail!("{} already exited ({status}); cannot signal it", self.label);
        }
        // SAFETY: kill(2) on our own, not yet reaped child; no memory involved.
        if unsafe { libc::kill(self.pid(), signal) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sending signal {signal} to {}", self.label));
        }
        Ok(())
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait()?;
        }
        Ok(self.status)
    }

    /// Waits until the log contains `needle`; fails early if the process exits.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits until the log contains `needle` at least `count` times (e.g. a 2nd reload).
    pub fn wait_for_log_count(
        &mut self,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the log before the status so a last line written before exit counts.
            let log = self.log();
            if log.matches(needle).count() >= count {
                return Ok(());
            }
            if let Some(status) = self.try_status()? {
                bail!(
                    "{} exited ({status}) before logging {needle:?} ×{count}; log {}:\n{}",
                    self.label,
                    self.log_path.display(),
                    tail(&log)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not log {needle:?} ×{count} within {timeout:?}; log {}:\n{}",
                    self.label,
                    self.log_path.display(),
                    tail(&log)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still running after {timeout:?}; log:\n{}",
                    self.label,
                    tail(&self.log())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, wait up to 5 s, then SIGKILL; returns the exit status (idempotent).
    pub fn stop(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_status()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on our own, not yet reaped child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        if let Ok(status) = self.wait_exit(STOP_GRACE) {
            return Ok(status);
        }
        eprintln!(
            "l3lb-tests: {} ignored SIGTERM for {STOP_GRACE:?}; killing it",
            self.label
        );
        self.child.kill().ok();
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("l3lb-tests: stopping {}: {e:#}", self.label);
        }
    }
}

/// Reads a log file's new complete lines as they are written (see [`ChildGuard::tail`]):
/// cheap enough to poll every few hundred microseconds, unlike re-reading the whole file.
#[derive(Debug)]
pub struct LogTail {
    file: fs::File,
    offset: u64,
    partial: Vec<u8>,
}

impl LogTail {
    /// The lines completed since the last call (lossy UTF-8, without newlines).
    pub fn lines(&mut self) -> Result<Vec<String>> {
        use std::io::{Read as _, Seek as _, SeekFrom};
        self.file.seek(SeekFrom::Start(self.offset))?;
        let mut fresh = Vec::new();
        let n = self.file.read_to_end(&mut fresh)?;
        self.offset += n as u64;
        self.partial.extend_from_slice(&fresh);
        let Some(last) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return Ok(Vec::new());
        };
        let rest = self.partial.split_off(last + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        Ok(complete
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect())
    }
}

/// The last 40 lines of a log, for error messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
