//! `l3lb`: the XDP load balancer's command-line entry point.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

/// An XDP load balancer with direct server return that preserves client IPs.
#[derive(Parser)]
#[command(name = "l3lb", version, about, long_about = None)]
struct Cli {
    /// Log level filter (overridden by RUST_LOG), e.g. info, debug, l3lb=trace.
    ///
    /// The XDP program's own debug logs (each drop with its reason and addresses, each new
    /// flow's backend, ICMP handling) are on only when the filter names the target
    /// l3lb::xdp, e.g. `info,l3lb::xdp=debug` (trace adds one line per decapsulated
    /// packet); `debug` alone leaves them off. Off, the verifier removes them from the
    /// program; on, they cost per packet: for debugging only.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, apply the config and run until SIGTERM (SIGHUP reloads).
    ///
    /// The data plane keeps forwarding after the agent exits; the next `run` (a restart
    /// or an upgrade) takes over its connection table and switches the program in place.
    ///
    /// With --kubernetes the services come from the Kubernetes API (LoadBalancer Services
    /// of l3lb's class) and the config file, if any, gives only the node settings.
    ///
    /// The XDP program logs (debug only) when --log-level or RUST_LOG names the target
    /// l3lb::xdp, e.g. `--log-level info,l3lb::xdp=debug`; see --log-level.
    Run {
        /// Path of the YAML config (with --kubernetes: optional node settings).
        #[arg(long, short, required_unless_present = "kubernetes")]
        config: Option<PathBuf>,
        /// Take services from the Kubernetes API (kubeconfig or in-cluster credentials).
        #[arg(long)]
        kubernetes: bool,
        /// This node's name (from the downward API: spec.nodeName).
        #[arg(long, env = "NODE_NAME", requires = "kubernetes")]
        node_name: Option<String>,
        /// Kubeconfig to use (default: $KUBECONFIG, ~/.kube/config, in-cluster).
        #[arg(long, requires = "kubernetes")]
        kubeconfig: Option<PathBuf>,
        /// NIC to attach to, overriding the config's `interface` (with --kubernetes).
        #[arg(long, requires = "kubernetes")]
        interface: Option<String>,
        /// spec.loadBalancerClass to handle, overriding the config (default l3lb.io/xdp).
        #[arg(long, alias = "class", requires = "kubernetes")]
        load_balancer_class: Option<String>,
        /// Also handle LoadBalancer Services without a class.
        #[arg(long, requires = "kubernetes")]
        take_unclassed: bool,
        /// Serve /metrics, /healthz and /readyz on this address of the node, at the port
        /// of the settings' metrics_address (with --kubernetes; the chart's
        /// metricsOnNodeIP sets it from the downward API: status.hostIP).
        #[arg(long, env = "L3LB_METRICS_HOST", requires = "kubernetes")]
        metrics_host: Option<std::net::IpAddr>,
    },
    /// Validate a config; exits non-zero with the first error and its field path.
    Check {
        /// Path of the YAML config.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Detach the XDP program and remove the pins (and with them the connection table);
    /// stop the agent first.
    Down {
        /// The agent's pin_path (the DaemonSet sets L3LB_PIN_PATH to its mount).
        #[arg(long, env = "L3LB_PIN_PATH", default_value = "/sys/fs/bpf/l3lb")]
        pin_path: PathBuf,
    },
    /// Benchmark tools.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Show services, VIPs, backends (weight, health), counters and connection-table usage.
    ///
    /// Reads only the pinned maps, so it works whether or not the agent runs. The
    /// connection-table count is taken now, by walking the table.
    Status {
        /// The agent's pin_path (the DaemonSet sets L3LB_PIN_PATH to its mount).
        #[arg(long, env = "L3LB_PIN_PATH", default_value = "/sys/fs/bpf/l3lb")]
        pin_path: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// List the connection-table entries of a VIP, newest first: client, service, backend.
    ///
    /// Bounded: walks the table once (at most its capacity), keeps the VIP's entries and
    /// prints the newest --limit of them, by the time each entry was written. Reads only
    /// the pinned maps, so it works whether or not the agent runs.
    Flows {
        /// The VIP: ADDR (every port) or ADDR:PORT ([ADDR]:PORT for IPv6).
        #[arg(long)]
        vip: l3lb::flows::VipFilter,
        /// The most entries to print.
        #[arg(long, default_value_t = l3lb::flows::DEFAULT_LIMIT)]
        limit: usize,
        /// The agent's pin_path (the DaemonSet sets L3LB_PIN_PATH to its mount).
        #[arg(long, env = "L3LB_PIN_PATH", default_value = "/sys/fs/bpf/l3lb")]
        pin_path: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Send UDP frames to a VIP from this host with the kernel's live-frame generator
    /// (the NIC's driver must support XDP transmit); prints the achieved rate.
    Generate {
        /// Interface to send on.
        #[arg(long, short)]
        interface: String,
        /// Destination MAC (the balancer's interface, or the next router's).
        #[arg(long)]
        dst_mac: String,
        /// Source MAC (default: the interface's).
        #[arg(long)]
        src_mac: Option<String>,
        /// The VIP.
        #[arg(long)]
        vip: std::net::Ipv4Addr,
        /// Destination port.
        #[arg(long, default_value_t = 53)]
        port: u16,
        /// Protocol: udp (datagrams of --size), or tcp (60-byte ACK segments of
        /// established-looking flows, without payload).
        #[arg(long, default_value = "udp", value_parser = ["udp", "tcp"])]
        protocol: String,
        /// First source address; flows count up from it.
        #[arg(long, default_value = "198.18.0.1")]
        src: std::net::Ipv4Addr,
        /// First source port; flows count up from it.
        #[arg(long, default_value_t = 1024)]
        src_port: u16,
        /// Distinct flows (a power of two).
        #[arg(long, default_value_t = 65536)]
        flows: u32,
        /// Frame size in bytes, Ethernet header included (60 to 1514).
        #[arg(long, default_value_t = 60)]
        size: usize,
        /// Frames to send (default: as many as --duration allows).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        count: Option<u64>,
        /// Seconds to send for (default: 10, or until --count frames are sent).
        #[arg(long, value_parser = parse_seconds)]
        duration: Option<f64>,
        /// Frames per second to aim at (default: as fast as possible).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rate: Option<u64>,
    },
}

/// A `--duration`: seconds, positive and finite (at most a year).
fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    if !(v > 0.0 && v <= 366.0 * 86_400.0) {
        return Err(format!(
            "{s}: not a number of seconds above 0 and within a year"
        ));
    }
    Ok(v)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `l3lb run` keeps its signals blocked until its handlers exist (see
    // `l3lb::agent::Signals`); every other command takes them as they come.
    l3lb::agent::mask_signals(matches!(cli.command, Command::Run { .. }));
    // The data plane's per-packet logs must be asked for by name (see l3lb::program_log).
    let filter_of = |spec: &str| {
        tracing_subscriber::EnvFilter::try_new(l3lb::program_log::filter_directives(spec))
    };
    let filter = std::env::var("RUST_LOG")
        .map_err(|e| e.to_string())
        .and_then(|spec| filter_of(&spec).map_err(|e| e.to_string()))
        .or_else(|_| filter_of(&cli.log_level))
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(l3lb::program_log::filter_directives("info"))
        });
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

/// The node settings of Kubernetes mode: the config file if given (its `interface` may be
/// overridden), else the defaults with `--interface`.
fn kubernetes_config(
    path: Option<&std::path::Path>,
    interface: Option<String>,
) -> anyhow::Result<l3lb::config::Config> {
    let text = match path {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => String::new(),
    };
    // The file may leave `interface` to the flag: the flag's value is filled in before
    // validation so every other field is still checked with its path.
    let mut value: serde_yaml_ng::Value = if text.trim().is_empty() {
        serde_yaml_ng::Value::Mapping(Default::default())
    } else {
        serde_yaml_ng::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "{}: {e}",
                path.map(|p| p.display().to_string()).unwrap_or_default()
            )
        })?
    };
    // A file of comments alone (the chart's settings with everything commented out) is
    // as empty as a blank one.
    if value.is_null() {
        value = serde_yaml_ng::Value::Mapping(Default::default());
    }
    if let (Some(iface), serde_yaml_ng::Value::Mapping(m)) = (interface, &mut value) {
        m.insert("interface".into(), iface.into());
    }
    let text = serde_yaml_ng::to_string(&value).context("re-encoding the settings")?;
    let origin = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "settings".to_string());
    let config = l3lb::config::Config::parse(&text).map_err(|e| {
        let hint = if e.to_string().contains("interface") {
            " (give --interface or a config with `interface`)"
        } else {
            ""
        };
        anyhow::anyhow!("{origin}: {e}{hint}")
    })?;
    if !config.services.is_empty() {
        anyhow::bail!(
            "{origin}: services: with --kubernetes the services come from the API server; remove `services`"
        );
    }
    Ok(config)
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run {
            config,
            kubernetes,
            node_name,
            kubeconfig,
            interface,
            load_balancer_class,
            take_unclassed,
            metrics_host,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            if !kubernetes {
                let config = config.context("--config is required without --kubernetes")?;
                return rt.block_on(l3lb::agent::run(&config));
            }
            let mut cfg = kubernetes_config(config.as_deref(), interface)?;
            if let Some(class) = load_balancer_class {
                cfg.kubernetes.load_balancer_class = class;
            }
            cfg.kubernetes.take_unclassed |= take_unclassed;
            if let Some(ip) = metrics_host {
                cfg.metrics_address.set_ip(ip);
            }
            let node_name = node_name.filter(|n| !n.is_empty()).context(
                "--kubernetes needs this node's name: --node-name, or NODE_NAME from the downward API (spec.nodeName)",
            )?;
            rt.block_on(l3lb::kubernetes::watch::run(
                l3lb::kubernetes::watch::Options {
                    config: cfg,
                    node_name,
                    kubeconfig,
                },
            ))
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
        Command::Bench(BenchCommand::Generate {
            interface,
            dst_mac,
            src_mac,
            vip,
            port,
            protocol,
            src,
            src_port,
            flows,
            size,
            count,
            duration,
            rate,
        }) => {
            let opts = l3lb::generate::GenerateOptions {
                interface,
                dst_mac: l3lb::generate::parse_mac(&dst_mac)?,
                src_mac: src_mac
                    .as_deref()
                    .map(l3lb::generate::parse_mac)
                    .transpose()?,
                src,
                vip,
                port,
                protocol: if protocol == "tcp" {
                    lb_common::PROTO_TCP
                } else {
                    lb_common::PROTO_UDP
                },
                src_port,
                flows,
                size,
                count,
                // A count alone sends until it is done; without either, ten seconds.
                duration: match (duration, count) {
                    (Some(d), _) => Some(std::time::Duration::from_secs_f64(d)),
                    (None, Some(_)) => None,
                    (None, None) => Some(std::time::Duration::from_secs(10)),
                },
                rate,
            };
            let r = l3lb::generate::generate(&opts)?;
            println!(
                "sent {} {} frames of {} bytes in {:.2} s: {:.0} pps ({} flows)",
                r.frames,
                protocol.to_uppercase(),
                opts.size,
                r.seconds,
                r.pps(),
                opts.flows
            );
            Ok(())
        }
        Command::Down { pin_path } => {
            let dir = l3lb::agent::pin_dir(&pin_path);
            if !dir.exists() {
                println!("nothing pinned at {}", dir.display());
                return Ok(());
            }
            let links = l3lb::handover::down(&dir)
                .with_context(|| format!("removing the pins in {}", dir.display()))?;
            // The pin_path itself goes too once nothing else is in it (the agent created
            // it); a directory holding other files is left alone.
            let _ = std::fs::remove_dir(&pin_path);
            println!(
                "detached {links} link(s) and removed the pins in {}",
                dir.display()
            );
            Ok(())
        }
        Command::Status { pin_path, json } => {
            let status = l3lb::status::read(&l3lb::agent::pin_dir(&pin_path))
                .context("reading the status")?;
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
        Command::Flows {
            vip,
            limit,
            pin_path,
            json,
        } => {
            let list = l3lb::flows::read(&l3lb::agent::pin_dir(&pin_path), &vip, limit)
                .with_context(|| format!("listing the flows to {vip}"))?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&list).context("encoding JSON")?
                );
            } else {
                print!("{}", l3lb::flows::render(&list));
            }
            Ok(())
        }
    }
}
