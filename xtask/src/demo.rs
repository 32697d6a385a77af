//! `cargo xtask demo`: build the agent and the lab, then run the demo.

use std::{ffi::OsString, process::ExitCode};

use anyhow::{Context, Result, bail};

use crate::{prereqs, process, workspace::Workspace};

/// Options of `cargo xtask demo`.
#[derive(clap::Args)]
pub struct Args {
    /// Arguments passed on to the demo binary.
    #[arg(last = true)]
    demo_args: Vec<OsString>,
}

/// Installs missing prerequisites, builds `l3lb` and the lab's binaries, and runs `demo`
/// with `L3LB_BIN` pointing at the agent; returns the demo's exit code. On Ctrl-C the
/// demo gets SIGINT from the terminal and xtask waits for it to clean up.
pub fn run(workspace: &Workspace, args: &Args) -> Result<ExitCode> {
    if !process::is_root()? {
        bail!(
            "`cargo xtask demo` must run as root: the demo builds its network in network \
             namespaces and attaches XDP programs; run it as root (for example \
             `sudo -E env PATH=\"$PATH\" cargo xtask demo`)"
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
    build.args(["build", "-p", "l3lb", "-p", "l3lb-tests", "--bins"]);
    process::run_step("build", &mut build)?;

    let debug = workspace.target_dir().join("debug");
    let mut demo = std::process::Command::new(debug.join("demo"));
    demo.env("L3LB_BIN", debug.join("l3lb"))
        .args(&args.demo_args)
        .current_dir(&workspace.root);
    let line = process::display(&demo);
    eprintln!("==> demo: {line}");
    let status = demo
        .status()
        .with_context(|| format!("could not start the demo: `{line}`"))?;
    if !status.success() {
        eprintln!("demo ended with {}", process::describe(status));
    }
    Ok(ExitCode::from(process::exit_code(status)))
}
