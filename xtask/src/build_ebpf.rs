//! `cargo xtask build-ebpf`: build the agent, whose build script builds the eBPF program.

use std::ffi::OsString;

use anyhow::Result;

use crate::{prereqs, process, workspace::Workspace};

/// Options of `cargo xtask build-ebpf`.
#[derive(clap::Args)]
pub struct Args {
    /// Arguments passed on to `cargo build -p l3lb`, for example `-- --release -vv`.
    #[arg(last = true)]
    cargo_build_args: Vec<OsString>,
}

/// Installs the build prerequisites (nightly rust-src, bpf-linker) and runs
/// `cargo build -p l3lb`, so the eBPF build's compiler and linker output shows.
pub fn run(workspace: &Workspace, args: &Args) -> Result<()> {
    prereqs::ensure(
        workspace,
        prereqs::Needs {
            lint: false,
            lab: false,
            fuzz: false,
        },
    )?;
    let mut build = workspace.cargo();
    build
        .args(["build", "-p", "l3lb"])
        .args(&args.cargo_build_args);
    process::run_step("build", &mut build)
}
