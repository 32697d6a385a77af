//! `cargo xtask bench`: build the agent and the benchmark in release mode and run it.

use std::ffi::OsString;

use anyhow::{Result, bail};

use crate::{prereqs, process, workspace::Workspace};

/// Options of `cargo xtask bench`.
#[derive(clap::Args)]
pub struct Args {
    /// A short run (under two minutes) that exercises every measurement; CI runs this.
    #[arg(long)]
    pub quick: bool,
    /// Where to write every figure as JSON (default: target/bench/bench.json, or
    /// bench-quick.json with --quick).
    #[arg(long)]
    pub json: Option<OsString>,
}

/// Installs missing prerequisites, builds release binaries, and runs the benchmark with
/// `L3LB_BIN` pointing at the release agent. Numbers never fail it; errors do.
pub fn run(workspace: &Workspace, args: &Args) -> Result<()> {
    if !process::is_root()? {
        bail!(
            "`cargo xtask bench` must run as root: it loads XDP programs and runs them \
             with BPF_PROG_TEST_RUN in a private network namespace"
        );
    }
    prereqs::ensure(
        workspace,
        prereqs::Needs {
            lint: false,
            lab: true,
            fuzz: false,
        },
    )?;
    let mut build = workspace.cargo();
    build.args([
        "build",
        "--release",
        "-p",
        "l3lb",
        "-p",
        "l3lb-tests",
        "--bin",
        "l3lb",
        "--bin",
        "bench",
    ]);
    process::run_step("build (release)", &mut build)?;
    let release = workspace.target_dir().join("release");
    let mut bench = std::process::Command::new(release.join("bench"));
    bench
        .env("L3LB_BIN", release.join("l3lb"))
        .current_dir(&workspace.root);
    if args.quick {
        bench.arg("--quick");
    }
    // A quick run (CI's) writes beside a full run's figures, never over them.
    let json = args.json.clone().unwrap_or_else(|| {
        workspace
            .target_dir()
            .join("bench")
            .join(if args.quick {
                "bench-quick.json"
            } else {
                "bench.json"
            })
            .into()
    });
    bench.arg("--json").arg(json);
    process::run_step("bench", &mut bench)
}
