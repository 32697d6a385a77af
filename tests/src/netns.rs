//! Named network namespaces as guards, commands run inside them, and threads that
//! live inside them.
//!
//! Network namespaces are per thread: [`Netns::enter`] and [`Netns::spawn_thread`] run
//! code on a *new* thread that has joined the namespace, so the caller's thread never
//! moves. A socket belongs to the namespace it was created in and keeps working from
//! any thread afterwards.

use std::{
    ffi::OsStr,
    fs::File,
    io::Write,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Command, Stdio},
    sync::mpsc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::prefix::Prefix;

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    deleted: bool,
}

impl Netns {
    /// Creates `<fresh prefix>-<name>`, standalone (not part of a [`crate::Lab`]).
    pub fn new(name: &str) -> Result<Netns> {
        Netns::with_prefix(&Prefix::fresh(), name)
    }

    /// Creates the namespace `<prefix>-<name>`.
    pub fn with_prefix(prefix: &Prefix, name: &str) -> Result<Netns> {
        let full = prefix.name(name);
        host(["ip", "netns", "add", full.as_str()])
            .with_context(|| format!("creating network namespace {full} (are you root?)"))?;
        let ns = Netns {
            name: full,
            deleted: false,
        };
        ns.ip(["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The full namespace name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `args` inside the namespace (`ip netns exec`); stdout, or an error with stderr.
    pub fn run<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut full: Vec<std::ffi::OsString> = vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone().into(),
        ];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        host(full)
    }

    /// Runs `ip -n <ns> args…` (cheaper than [`Netns::run`] for `ip` itself).
    pub fn ip<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut full: Vec<std::ffi::OsString> =
            vec!["ip".into(), "-n".into(), self.name.clone().into()];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        host(full)
    }

    /// Runs `ip -n <ns> -batch -` with one `ip` command (without the `ip`) per line.
    pub fn ip_batch(&self, lines: &[String]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let mut child = Command::new("ip")
            .args(["-n", &self.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning `ip -batch`")?;
        let mut stdin = child
            .stdin
            .take()
            .ok_or_else(|| anyhow!("`ip -batch` has no stdin"))?;
        stdin.write_all(lines.join("\n").as_bytes())?;
        drop(stdin);
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "`ip -n {} -batch -` failed ({}): {}\ncommands:\n{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                lines.join("\n")
            );
        }
        Ok(())
    }

    /// Sets sysctls inside the namespace, e.g. `[("net.ipv4.ip_forward", "0")]`.
    pub fn sysctl(&self, settings: &[(&str, &str)]) -> Result<()> {
        let mut args = vec!["sysctl".to_owned(), "-q".to_owned(), "-w".to_owned()];
        args.extend(settings.iter().map(|(k, v)| format!("{k}={v}")));
        self.run(args).map(drop)
    }

    /// The MAC address of `dev` inside the namespace.
    pub fn mac(&self, dev: &str) -> Result<crate::Mac> {
        let path = format!("/sys/class/net/{dev}/address");
        self.run(["cat", path.as_str()])?
            .trim()
            .parse()
            .with_context(|| format!("MAC address of {dev} in {}", self.name))
    }

    /// Pids of the processes whose main thread is in the namespace (`ip netns pids`).
    pub fn pids(&self) -> Result<Vec<i32>> {
        let out = host(["ip", "netns", "pids", self.name.as_str()])?;
        Ok(out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect())
    }

    /// Runs `f` on a new thread inside the namespace and returns its result.
    ///
    /// A panic in `f` is resumed on the caller's thread.
    pub fn enter<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = self.open()?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> Result<R> {
                join_netns(&file)?;
                Ok(f())
            });
            match handle.join() {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Starts a long-lived named thread inside the namespace (for servers and workers).
    pub fn spawn_thread<F, R>(&self, thread_name: &str, f: F) -> Result<JoinHandle<R>>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let file = self.open()?;
        let (tx, rx) = mpsc::sync_channel::<Result<()>>(1);
        let handle = std::thread::Builder::new()
            .name(thread_name.to_owned())
            .spawn(move || {
                let joined = join_netns(&file);
                drop(file);
                let ok = joined.is_ok();
                // The receiver waits for this message; a send error means it gave up.
                let _ = tx.send(joined);
                if !ok {
                    // Never run `f` outside the namespace.
                    std::panic::resume_unwind(Box::new("setns failed"));
                }
                f()
            })
            .with_context(|| format!("spawning thread {thread_name}"))?;
        rx.recv()
            .map_err(|_| anyhow!("thread {thread_name} died before joining {}", self.name))??;
        Ok(handle)
    }

    /// Joins the calling thread to the namespace; only for threads this crate spawned.
    pub(crate) fn join_current_thread(&self) -> Result<()> {
        join_netns(&self.open()?)
    }

    fn open(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("opening {}", self.path().display()))
    }

    /// Kills every process in the namespace: SIGTERM, up to `grace`, then SIGKILL.
    pub fn kill_all(&self, grace: Duration) -> Result<()> {
        let own = std::process::id() as i32;
        let pids: Vec<i32> = self.pids()?.into_iter().filter(|&p| p != own).collect();
        terminate(&pids, grace);
        Ok(())
    }

    /// Deletes the namespace now (idempotent); processes inside should be gone first.
    pub fn delete(&mut self) -> Result<()> {
        if self.deleted {
            return Ok(());
        }
        self.deleted = true;
        delete_netns(&self.name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("l3lb-tests: {e:#}");
        }
    }
}

/// Deletes a namespace by name (`ip netns del`).
pub(crate) fn delete_netns(name: &str) -> Result<()> {
    host(["ip", "netns", "del", name]).map(drop)
}

/// Names from `ip netns list`.
pub(crate) fn list_netns() -> Result<Vec<String>> {
    let out = host(["ip", "netns", "list"])?;
    Ok(out
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Sends SIGTERM to `pids`, waits up to `grace` for them to go, then SIGKILLs the rest.
pub(crate) fn terminate(pids: &[i32], grace: Duration) {
    for &pid in pids {
        // SAFETY: kill(2) with a positive pid and a valid signal; no memory involved.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && !pids.iter().all(|&p| is_gone(p)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &pid in pids.iter().filter(|&&p| !is_gone(p)) {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// True when `pid` no longer runs (absent or a zombie).
pub(crate) fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may contain spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => true,
    }
}

fn join_netns(file: &File) -> Result<()> {
    // SAFETY: setns(2) on a namespace file descriptor we own; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

/// Runs a command in the test's own namespace; stdout, or an error with stderr.
pub fn host<I, S>(args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = args
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let (cmd, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
    let out = Command::new(cmd)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running `{shown}` (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `args` inside `ns` (`ip netns exec`); stdout, or an error with stderr.
pub fn run<S: AsRef<OsStr>>(ns: &Netns, args: &[S]) -> Result<String> {
    ns.run(args)
}
