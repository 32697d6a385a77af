//! `cargo xtask fuzz`: runs the cargo-fuzz targets in `fuzz/` for a bounded time each and
//! reports libFuzzer's figures; `cargo xtask test` runs it briefly as one of its steps.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::Stdio,
};

use anyhow::{Context as _, Result, bail};

use crate::{prereqs, process, workspace::Workspace};

/// The targets, in the order they run: the XDP program, then the config parser.
pub const TARGETS: &[&str] = &["xdp", "config"];

/// libFuzzer options of one target beyond the time limit.
fn target_options(target: &str) -> &'static [&'static str] {
    match target {
        // Frames up to a little past the 3520 bytes BPF_PROG_TEST_RUN makes linear, at
        // full length from the start: libFuzzer's default grows the length limit slowly,
        // and a short run would then never try a frame longer than a few bytes.
        "xdp" => &["-max_len=3600", "-len_control=0"],
        _ => &[],
    }
}

/// Options of `cargo xtask fuzz`.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds each target runs (libFuzzer's `-max_total_time`).
    #[arg(long, default_value_t = 20)]
    pub seconds: u64,
    /// Targets to run (default: all of them).
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    pub targets: Vec<String>,
}

/// What libFuzzer reported for one target.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Target name.
    pub target: String,
    /// Inputs run (`stat::number_of_executed_units`).
    pub runs: u64,
    /// Mean executions per second (`stat::average_exec_per_sec`).
    pub exec_per_sec: u64,
    /// Code edges covered (`cov:` of the last status line).
    pub cov: u64,
    /// Features, edges and the harness's extra counters together (`ft:`).
    pub features: u64,
    /// Inputs in the corpus at the end (`corp:`).
    pub corpus: u64,
}

impl Report {
    /// Takes the figures of one line of libFuzzer's output, if it has any.
    fn add_line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("stat::") {
            let mut kv = rest.splitn(2, ':');
            let (Some(key), Some(value)) = (kv.next(), kv.next()) else {
                return;
            };
            let Ok(value) = value.trim().parse::<u64>() else {
                return;
            };
            match key {
                "number_of_executed_units" => self.runs = value,
                "average_exec_per_sec" => self.exec_per_sec = value,
                _ => {}
            }
            return;
        }
        // Status lines: `#4096 pulse cov: 812 ft: 1734 corp: 92/3021b lim: 4096 exec/s: …`
        if !line.starts_with('#') {
            return;
        }
        let mut words = line.split_whitespace();
        while let Some(word) = words.next() {
            let slot = match word {
                "cov:" => &mut self.cov,
                "ft:" => &mut self.features,
                "corp:" => &mut self.corpus,
                _ => continue,
            };
            if let Some(n) = words
                .next()
                .and_then(|w| w.split('/').next())
                .and_then(|w| w.parse().ok())
            {
                *slot = n;
            }
        }
    }
}

/// Runs `cargo fuzz run <target>` for `seconds` on each target (all when none are named),
/// with the target's seeds when `fuzz/seeds/<target>` exists; fails on the first crash,
/// naming the reproducer libFuzzer wrote.
pub fn run(workspace: &Workspace, args: &Args) -> Result<Vec<Report>> {
    prereqs::ensure_cargo_fuzz(workspace)?;
    let targets: Vec<&str> = if args.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        args.targets.iter().map(String::as_str).collect()
    };
    let mut reports = Vec::new();
    for target in targets {
        let report = run_target(workspace, target, args.seconds)?;
        println!(
            "fuzz {}: {} runs in {} s, {} exec/s, cov {}, ft {}, corpus {}",
            report.target,
            report.runs,
            args.seconds,
            report.exec_per_sec,
            report.cov,
            report.features,
            report.corpus
        );
        reports.push(report);
    }
    Ok(reports)
}

fn run_target(workspace: &Workspace, target: &str, seconds: u64) -> Result<Report> {
    let fuzz_dir = workspace.root.join("fuzz");
    let corpus = fuzz_dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)
        .with_context(|| format!("creating the corpus directory {}", corpus.display()))?;
    let mut cmd = workspace.nightly_cargo();
    cmd.args(["fuzz", "run", target]).arg(&corpus);
    let seeds = fuzz_dir.join("seeds").join(target);
    if seeds.is_dir() {
        // Read-only: libFuzzer writes new inputs into the first directory only.
        cmd.arg(&seeds);
    }
    cmd.arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .arg("-print_final_stats=1")
        .args(target_options(target));
    let dict = fuzz_dir.join("dicts").join(format!("{target}.dict"));
    if dict.is_file() {
        cmd.arg(format!("-dict={}", dict.display()));
    }
    let line = process::display(&cmd);
    eprintln!("==> fuzz {target}: {line}");
    // libFuzzer reports on stderr: pass it through and keep the figures.
    let mut child = cmd
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("step `fuzz {target}` failed: could not start `{line}`"))?;
    let mut report = Report {
        target: target.to_owned(),
        ..Report::default()
    };
    let mut crash_file = None;
    if let Some(err) = child.stderr.take() {
        for l in BufReader::new(err).lines() {
            let l = l.with_context(|| format!("reading the output of `{line}`"))?;
            eprintln!("{l}");
            report.add_line(&l);
            if let Some(path) = l.split("Test unit written to ").nth(1) {
                crash_file = Some(path.trim().to_owned());
            }
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("step `fuzz {target}` failed: waiting for `{line}`"))?;
    if !status.success() {
        let how = crash_file.map_or_else(String::new, |file| {
            format!(
                "; reproduce with `cargo +nightly fuzz run {target} {}`",
                relative(&workspace.root, Path::new(&file))
            )
        });
        bail!(
            "step `fuzz {target}` failed ({}): `{line}`{how}",
            process::describe(status)
        );
    }
    Ok(report)
}

/// `path` relative to `root` when it is inside it (cargo-fuzz runs from `fuzz/`).
fn relative(root: &Path, path: &Path) -> String {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join("fuzz").join(path)
    };
    absolute
        .strip_prefix(root)
        .unwrap_or(&absolute)
        .display()
        .to_string()
}

/// Whether `cargo fuzz` runs (cargo-fuzz is installed where cargo finds it).
pub fn cargo_fuzz_present(workspace: &Workspace) -> Result<bool> {
    let mut cmd = workspace.cargo();
    cmd.args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(process::output_if_installed(&mut cmd)?.is_some_and(|o| o.status.success()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_figures() {
        let mut r = Report::default();
        for line in [
            "#2\tINITED cov: 120 ft: 130 corp: 1/1b exec/s: 0 rss: 40Mb",
            "#65536\tpulse  cov: 812 ft: 1734 corp: 92/3021b lim: 4096 exec/s: 4369 rss: 80Mb",
            "#90000\tDONE   cov: 815 ft: 1750 corp: 95/3100b lim: 4096 exec/s: 4500 rss: 81Mb",
            "stat::number_of_executed_units: 90000",
            "stat::average_exec_per_sec:     4500",
            "stat::new_units_added:          94",
        ] {
            r.add_line(line);
        }
        assert_eq!(
            (r.runs, r.exec_per_sec, r.cov, r.features, r.corpus),
            (90000, 4500, 815, 1750, 95)
        );
    }

    #[test]
    fn names_reproducers_relative_to_the_repository() {
        let root = Path::new("/repo");
        assert_eq!(
            relative(root, Path::new("artifacts/xdp/crash-1")),
            "fuzz/artifacts/xdp/crash-1"
        );
        assert_eq!(
            relative(root, Path::new("/repo/fuzz/artifacts/xdp/crash-1")),
            "fuzz/artifacts/xdp/crash-1"
        );
    }
}
