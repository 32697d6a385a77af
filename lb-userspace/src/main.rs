//! `l3lb`: the XDP load balancer's command-line entry point.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// An XDP load balancer with direct server return that preserves client IPs.
#[derive(Parser)]
#[command(name = "l3lb", version, about, long_about = None)]
struct Cli {
    /// Log level filter (overridden by RUST_LOG), e.g. info, debug, l3lb=trace.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, apply the config and run until SIGTERM (SIGHUP reloads).
    Run {
        /// Path of the YAML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config; exits non-zero with the first error and its field path.
    Check {
        /// Path of the YAML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show VIPs, backends and counters from the pinned maps of a running agent.
    Status {
        /// The agent's pin_path.
        #[arg(long, default_value = "/sys/fs/bpf/l3lb")]
        pin_path: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    unblock_signals();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&cli.log_level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The agent is driven by SIGHUP, SIGTERM and SIGINT; a parent that blocked them (the mask
/// survives exec) would leave it unstoppable, so they are unblocked before anything else.
fn unblock_signals() {
    // SAFETY: manipulates a local signal set and this thread's mask, before any thread exists.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            rt.block_on(l3lb::agent::run(&config))
        }
        Command::Check { config } => {
            let cfg = l3lb::config::Config::load(&config)
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            println!(
                "{}: ok ({} services, {} backends)",
                config.display(),
                cfg.services.len(),
                cfg.services.iter().map(|s| s.backends.len()).sum::<usize>()
            );
            Ok(())
        }
        Command::Status { pin_path, json } => {
            let status = l3lb::status::read(&l3lb::agent::pin_dir(&pin_path))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).context("encoding JSON")?
                );
            } else {
                print!("{}", l3lb::status::render(&status));
            }
            Ok(())
        }
    }
}
