//! Developer tasks for l3lb, run as `cargo xtask <command>`.
//!
//! Everything here shells out through [`std::process::Command`], so what xtask does is
//! what you would type: each step is echoed before it runs and named when it fails.

mod bench;
mod build_ebpf;
mod demo;
mod fuzz;
mod prereqs;
mod process;
mod test;
mod workspace;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::workspace::Workspace;

/// Developer tasks for l3lb.
#[derive(Parser)]
#[command(bin_name = "cargo xtask", about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (nightly rust-src, bpf-linker, Debian
    /// packages); skip what is present.
    Prereqs,
    /// Check formatting, lint, build and run every test, including the root-only lab tests.
    Test(test::Args),
    /// Build the agent and the lab, then run the demo in network namespaces.
    Demo(demo::Args),
    /// Measure per-packet cost against a floor program and the control plane (release
    /// build); prints a table with PASS/MISS per target and writes every figure as JSON.
    Bench(bench::Args),
    /// Build the agent and with it the eBPF program (`-- -vv` shows the eBPF build's output).
    BuildEbpf(build_ebpf::Args),
    /// Run the cargo-fuzz targets (`fuzz/`: the XDP program, the config parser) for a
    /// bounded time each and print libFuzzer's figures (root, for the XDP target).
    Fuzz(fuzz::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    process::outlive_ctrl_c();
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            // Printed by hand: anyhow's `Debug` adds a backtrace whenever RUST_BACKTRACE is
            // set, which buries the message that names the failed step and its fix.
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; the exit code is the demo's own for `demo`, success otherwise.
fn run(command: Command) -> Result<ExitCode> {
    let workspace = Workspace::locate()?;
    match command {
        Command::Prereqs => {
            prereqs::ensure(&workspace, prereqs::Needs::ALL).map(|()| ExitCode::SUCCESS)
        }
        Command::Test(args) => test::run(&workspace, &args).map(|()| ExitCode::SUCCESS),
        Command::Demo(args) => demo::run(&workspace, &args),
        Command::Bench(args) => bench::run(&workspace, &args).map(|()| ExitCode::SUCCESS),
        Command::BuildEbpf(args) => build_ebpf::run(&workspace, &args).map(|()| ExitCode::SUCCESS),
        Command::Fuzz(args) => fuzz::run(&workspace, &args).map(|_| ExitCode::SUCCESS),
    }
}
