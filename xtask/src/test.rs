//! `cargo xtask test`: the whole check a change must pass, as CI runs it.

use std::ffi::OsString;

use anyhow::{Result, bail};

use crate::{prereqs, process, workspace::Workspace};

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct Args {
    /// Skip `cargo fmt --check` and both clippy runs.
    #[arg(long)]
    no_lint: bool,
    /// Skip the quick benchmark run at the end.
    #[arg(long)]
    no_bench: bool,
    /// Skip the fuzz targets' short run.
    #[arg(long)]
    no_fuzz: bool,
    /// Seconds each fuzz target runs.
    #[arg(long, default_value_t = 20)]
    fuzz_seconds: u64,
    /// Arguments passed on to `cargo test` (after its own flags), for example
    /// `-- --no-fail-fast -- --nocapture`.
    #[arg(last = true)]
    cargo_test_args: Vec<OsString>,
}

/// Installs missing prerequisites, then checks formatting, lints the userspace and eBPF
/// crates, builds everything and runs all tests; stops at the first failing step.
pub fn run(workspace: &Workspace, args: &Args) -> Result<()> {
    if !process::is_root()? {
        bail!(
            "`cargo xtask test` must run as root: the lab tests create network namespaces, \
             veth pairs and XDP attachments, which need CAP_NET_ADMIN, CAP_BPF and \
             CAP_SYS_ADMIN; run it as root (for example `sudo -E env PATH=\"$PATH\" cargo xtask test`)"
        );
    }
    prereqs::ensure(
        workspace,
        prereqs::Needs {
            lint: !args.no_lint,
            lab: true,
            fuzz: !args.no_fuzz,
        },
    )?;

    if !args.no_lint {
        let mut fmt = workspace.cargo();
        fmt.args(["fmt", "--all", "--", "--check"]);
        process::run_step("format check", &mut fmt)?;

        let mut clippy = workspace.cargo();
        clippy.args([
            "clippy",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]);
        process::run_step("clippy (userspace)", &mut clippy)?;

        // The eBPF crate is not a default member and only builds for the BPF target, so
        // it gets its own clippy run with the flags aya-build uses to build it.
        let mut clippy_ebpf = workspace.nightly_cargo();
        clippy_ebpf.args([
            "clippy",
            "-p",
            "lb-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ]);
        process::run_step("clippy (eBPF)", &mut clippy_ebpf)?;

        // And once without its `log` feature (the benchmark's comparison object), whose
        // stand-ins for the log statements are otherwise never linted.
        let mut clippy_ebpf_no_log = workspace.nightly_cargo();
        clippy_ebpf_no_log.args([
            "clippy",
            "-p",
            "lb-ebpf",
            "--no-default-features",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
            "--",
            "-D",
            "warnings",
        ]);
        process::run_step("clippy (eBPF, without log)", &mut clippy_ebpf_no_log)?;
    }
    let supply_chain_skipped = if args.no_lint {
        0
    } else {
        supply_chain(workspace)?
    };

    let mut build = workspace.cargo();
    build.args([
        "build",
        "--workspace",
        "--exclude",
        "lb-ebpf",
        "--all-targets",
    ]);
    process::run_step("build", &mut build)?;

    let agent = workspace.target_dir().join("debug").join("l3lb");
    let mut test = workspace.cargo();
    test.env("L3LB_BIN", &agent)
        .args(["test", "--workspace", "--exclude", "lb-ebpf"])
        .args(&args.cargo_test_args);
    let mut tally = process::run_tests_tallied("test", &mut test)?;
    tally.ignored += supply_chain_skipped;
    // Each fuzz target that runs its time without finding anything counts as one passed
    // test (a finding fails the step, naming the reproducer).
    if !args.no_fuzz {
        let reports = crate::fuzz::run(
            workspace,
            &crate::fuzz::Args {
                seconds: args.fuzz_seconds,
                targets: Vec::new(),
            },
        )?;
        tally.passed += reports.len() as u64;
    }
    // The benchmark never fails on a number, but it must keep working.
    if !args.no_bench {
        crate::bench::run(
            workspace,
            &crate::bench::Args {
                quick: true,
                json: None,
            },
        )?;
    }
    // One closing line for every runner of the workspace together, so a reader of the log
    // (or CI) does not mistake the last crate's empty doc-test run for the whole story.
    println!(
        "tests: {} passed, {} failed, {} skipped",
        tally.passed, tally.failed, tally.ignored
    );
    Ok(())
}

/// `cargo deny`: licenses, bans and sources must pass; advisories need RustSec's database
/// from GitHub, and where it cannot be fetched the check is reported as skipped (and
/// counted in the closing line), never as passed. Returns the checks skipped.
fn supply_chain(workspace: &Workspace) -> Result<u64> {
    let mut deny = std::process::Command::new("cargo-deny");
    deny.current_dir(&workspace.root).args([
        "--all-features",
        "check",
        "licenses",
        "bans",
        "sources",
    ]);
    process::run_step(
        "supply chain (cargo deny: licenses, bans, sources)",
        &mut deny,
    )?;
    let mut advisories = std::process::Command::new("cargo-deny");
    advisories
        .current_dir(&workspace.root)
        .args(["check", "advisories"]);
    let out = advisories
        .output()
        .map_err(|e| anyhow::anyhow!("running cargo deny check advisories: {e}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() {
        println!("supply chain (cargo deny: advisories): ok");
        return Ok(0);
    }
    // A fetch failure is the network, not the dependency tree.
    if stderr.contains("failed to fetch")
        || stderr.contains("failed to open advisory database")
        || stderr.contains("Could not resolve host")
        || stderr.contains("unable to access")
        || stderr.contains("failed to resolve address")
    {
        println!(
            "supply chain (cargo deny: advisories): SKIPPED — RustSec's advisory database \
             (github.com) is unreachable from this machine; run `cargo deny check advisories` \
             where it is"
        );
        return Ok(1);
    }
    eprintln!("{stderr}");
    bail!("cargo deny check advisories failed (see above)");
}
