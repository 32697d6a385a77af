//! Running child processes: echoing them, naming the step that failed, exit codes and Ctrl-C.

use std::{
    ffi::{OsStr, c_int},
    fs, io,
    os::unix::process::ExitStatusExt,
    process::{Command, ExitStatus, Output},
};

use anyhow::{Context, Result, bail};

/// Renders `cmd` as a line you could paste into a shell (environment overrides first).
pub fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            words.push(format!("{}={}", key.to_string_lossy(), quote(value)));
        }
    }
    words.push(quote(cmd.get_program()));
    words.extend(cmd.get_args().map(quote));
    words.join(" ")
}

/// Quotes one word for a POSIX shell, leaving plain words alone.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./=+:@,%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` as the step `name` with inherited stdio; fails naming the step and the
/// command when it cannot start or does not exit successfully.
pub fn run_step(name: &str, cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    eprintln!("==> {name}: {line}");
    let status = cmd
        .status()
        .with_context(|| format!("step `{name}` failed: could not start `{line}`"))?;
    if !status.success() {
        bail!("step `{name}` failed ({}): `{line}`", describe(status));
    }
    Ok(())
}

/// Totals of the `test result:` lines of a `cargo test` run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
    /// Tests marked `#[ignore]`.
    pub ignored: u64,
}

impl Tally {
    /// Adds the counts of one `test result: ok. 3 passed; 0 failed; 1 ignored; …` line.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(kind), Some(count)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = count.parse::<u64>() else {
                continue;
            };
            match kind {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs a `cargo test` command as step `name`, passing its stdout through while adding
/// up the `test result:` lines; fails like [`run_step`].
pub fn run_tests_tallied(name: &str, cmd: &mut Command) -> Result<Tally> {
    use std::io::{BufRead as _, BufReader};
    let line = display(cmd);
    eprintln!("==> {name}: {line}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("step `{name}` failed: could not start `{line}`"))?;
    let mut tally = Tally::default();
    if let Some(out) = child.stdout.take() {
        for l in BufReader::new(out).lines() {
            let l = l.with_context(|| format!("reading the output of `{line}`"))?;
            println!("{l}");
            tally.add_line(&l);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("step `{name}` failed: waiting for `{line}`"))?;
    if !status.success() {
        bail!("step `{name}` failed ({}): `{line}`", describe(status));
    }
    Ok(tally)
}

/// Runs `cmd` with captured output; `Ok(None)` when its program is not installed.
pub fn output_if_installed(cmd: &mut Command) -> Result<Option<Output>> {
    match cmd.output() {
        Ok(output) => Ok(Some(output)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("could not run `{}`", display(cmd))),
    }
}

/// Runs `cmd` with captured output and returns its stdout; fails when it does not succeed.
pub fn stdout_of(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let output = cmd
        .output()
        .with_context(|| format!("could not run `{line}`"))?;
    if !output.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            describe(output.status),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// Says how a process ended: "exit status: 101" or "killed by signal 2".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status: {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => status.to_string(),
    }
}

/// The exit code a shell would report for `status`: the code itself, or 128 + the signal.
pub fn exit_code(status: ExitStatus) -> u8 {
    let code = match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => 1,
    };
    u8::try_from(code & 0xff).unwrap_or(1)
}

/// Whether this process runs with effective user id 0.
pub fn is_root() -> Result<bool> {
    let status =
        fs::read_to_string("/proc/self/status").context("could not read /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("/proc/self/status has no `Uid:` line with an effective user id")?;
    Ok(euid == "0")
}

/// Lets Ctrl-C reach only the children, so xtask can wait for them to clean up and then
/// report how they ended.
///
/// The terminal sends SIGINT to the whole foreground process group: children get it
/// themselves. xtask catches it with a handler that does nothing (rather than ignoring
/// it, because an ignored signal stays ignored across `exec` while a caught one is reset
/// to its default, so children keep the normal SIGINT behaviour).
pub fn outlive_ctrl_c() {
    const SIGINT: c_int = 2;
    const SIG_ERR: usize = usize::MAX;

    extern "C" fn do_nothing(_signal: c_int) {}

    unsafe extern "C" {
        /// libc's `signal(2)`; std already links libc. Returns the previous handler.
        fn signal(signum: c_int, handler: extern "C" fn(c_int)) -> usize;
    }

    // SAFETY: `signal` is the C library's, called with a valid signal number and a handler
    // that is async-signal-safe because it does nothing. glibc installs it with SA_RESTART,
    // and std retries `waitpid` on EINTR anyway, so waiting for a child is not disturbed.
    let previous = unsafe { signal(SIGINT, do_nothing) };
    if previous == SIG_ERR {
        eprintln!("warning: could not catch SIGINT; Ctrl-C will stop xtask before its children");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_what_needs_it() {
        let mut cmd = Command::new("dpkg-query");
        cmd.args(["-W", "--showformat=${Status}", "it's"])
            .env("A", "b c");
        assert_eq!(
            display(&cmd),
            r"A='b c' dpkg-query -W '--showformat=${Status}' 'it'\''s'"
        );
    }

    #[test]
    fn tally_adds_cargo_test_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 9 passed; 0 failed; 2 ignored; 0 measured; 0 filtered out; finished in 1.58s");
        t.add_line(
            "test result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 4 tests");
        assert_eq!(
            t,
            Tally {
                passed: 10,
                failed: 3,
                ignored: 2
            }
        );
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(2)), 130);
    }
}
