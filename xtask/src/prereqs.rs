//! `cargo xtask prereqs`: install what building and testing l3lb need, skip what is present.
//!
//! Prints one line per item, `<item>: present` or `<item>: installed`.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{process, workspace::Workspace};

/// The bpf-linker version to use. It links through rustc's own LLVM; 0.11 and later
/// default to a system LLVM that Debian 12 lacks and fail to link.
const BPF_LINKER_VERSION: &str = "0.10.4";

/// Debian packages the lab tests and the demo run: `ip`, `ethtool`, `bpftool`, `nft`,
/// `sysctl`/`pkill`, `tcpdump` and `nsenter`/`unshare`.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "bpftool",
    "nftables",
    "procps",
    "tcpdump",
    "util-linux",
];

/// The cargo-deny version `cargo xtask test` checks the dependency tree with.
const CARGO_DENY_VERSION: &str = "0.20.2";

/// Which groups of prerequisites a command needs.
#[derive(Clone, Copy)]
pub struct Needs {
    /// rustfmt and clippy for the toolchain running xtask, and clippy for nightly.
    pub lint: bool,
    /// The Debian packages the lab uses.
    pub lab: bool,
    /// cargo-fuzz, for the fuzz targets.
    pub fuzz: bool,
}

impl Needs {
    /// Everything: what `cargo xtask prereqs` installs.
    pub const ALL: Self = Self {
        lint: true,
        lab: true,
        fuzz: true,
    };
}

/// Ensures the prerequisites in `needs`, plus what building the eBPF program always needs
/// (nightly with rust-src, bpf-linker), installing what is missing.
pub fn ensure(workspace: &Workspace, needs: Needs) -> Result<()> {
    ensure_nightly()?;
    ensure_components(Toolchain::Nightly, &["rust-src"])?;
    if needs.lint {
        ensure_components(Toolchain::Nightly, &["clippy"])?;
        ensure_components(Toolchain::Active, &["rustfmt", "clippy"])?;
        ensure_cargo_deny(workspace)?;
    }
    ensure_bpf_linker(workspace)?;
    if needs.lab {
        ensure_debian_packages()?;
    }
    if needs.fuzz {
        ensure_cargo_fuzz(workspace)?;
    }
    Ok(())
}

/// Installs cargo-fuzz with cargo unless `cargo fuzz` already runs. It drives the
/// targets in `fuzz/` (which build with nightly, present already for the eBPF crate).
pub fn ensure_cargo_fuzz(workspace: &Workspace) -> Result<()> {
    let item = "cargo-fuzz";
    if crate::fuzz::cargo_fuzz_present(workspace)? {
        report(item, "present");
        return Ok(());
    }
    let mut cmd = workspace.cargo();
    cmd.args(["install", "cargo-fuzz", "--locked"]);
    process::run_step("install cargo-fuzz", &mut cmd)?;
    if !crate::fuzz::cargo_fuzz_present(workspace)? {
        bail!(
            "installed cargo-fuzz, but `cargo fuzz --version` does not run: is ~/.cargo/bin on PATH?"
        );
    }
    report(item, "installed");
    Ok(())
}

/// A rustup toolchain to query or install components into.
#[derive(Clone, Copy)]
enum Toolchain {
    /// `nightly`, for the eBPF crate.
    Nightly,
    /// The toolchain running xtask (rustup's choice: `RUSTUP_TOOLCHAIN`, overrides, default).
    Active,
}

impl Toolchain {
    /// The `--toolchain` arguments for rustup.
    fn args(self) -> &'static [&'static str] {
        match self {
            Self::Nightly => &["--toolchain", "nightly"],
            Self::Active => &[],
        }
    }

    /// How the item lines name this toolchain.
    fn label(self) -> &'static str {
        match self {
            Self::Nightly => "nightly",
            Self::Active => "active toolchain",
        }
    }
}

/// Prints the status line of one item.
fn report(item: &str, status: &str) {
    println!("{item}: {status}");
}

/// The installed components of `toolchain`, or `None` when rustup does not know the toolchain.
fn installed_components(toolchain: Toolchain) -> Result<Option<Vec<String>>> {
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "list", "--installed"])
        .args(toolchain.args());
    let output = process::output_if_installed(&mut cmd)?
        .context("rustup is not on PATH; install it from https://rustup.rs (l3lb needs its nightly toolchain)")?;
    if !output.status.success() {
        return Ok(None);
    }
    let stdout = String::from_utf8(output.stdout).context("rustup printed non-UTF-8 output")?;
    Ok(Some(
        stdout.lines().map(|line| line.trim().to_owned()).collect(),
    ))
}

/// Installs the nightly toolchain (minimal profile) when rustup does not have it.
fn ensure_nightly() -> Result<()> {
    let item = "nightly toolchain";
    if installed_components(Toolchain::Nightly)?.is_some() {
        report(item, "present");
        return Ok(());
    }
    process::run_step(
        "install the nightly toolchain",
        Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]),
    )?;
    report(item, "installed");
    Ok(())
}

/// Adds each of `components` to `toolchain` unless it is installed already.
fn ensure_components(toolchain: Toolchain, components: &[&str]) -> Result<()> {
    let installed = installed_components(toolchain)?.with_context(|| {
        format!(
            "rustup cannot list the components of the {} toolchain",
            toolchain.label()
        )
    })?;
    for component in components {
        let item = format!("{component} ({})", toolchain.label());
        let target_suffixed = format!("{component}-");
        if installed
            .iter()
            .any(|name| name == component || name.starts_with(&target_suffixed))
        {
            report(&item, "present");
            continue;
        }
        let mut cmd = Command::new("rustup");
        cmd.args(["component", "add", component])
            .args(toolchain.args());
        process::run_step(&format!("install {item}"), &mut cmd)?;
        report(&item, "installed");
    }
    Ok(())
}

/// The version `bpf-linker --version` reports, or `None` when it is not on PATH or broken.
fn bpf_linker_version() -> Result<Option<String>> {
    let Some(output) = process::output_if_installed(Command::new("bpf-linker").arg("--version"))?
    else {
        return Ok(None);
    };
    if !output.status.success() {
        return Ok(None);
    }
    Ok(parse_bpf_linker_version(&String::from_utf8_lossy(
        &output.stdout,
    )))
}

/// The version in `bpf-linker --version` output (`bpf-linker 0.10.4`).
fn parse_bpf_linker_version(stdout: &str) -> Option<String> {
    stdout.split_whitespace().nth(1).map(str::to_owned)
}

/// Installs bpf-linker [`BPF_LINKER_VERSION`] with cargo unless that version is on PATH.
fn ensure_bpf_linker(workspace: &Workspace) -> Result<()> {
    let item = format!("bpf-linker {BPF_LINKER_VERSION}");
    let found = bpf_linker_version()?;
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        report(&item, "present");
        return Ok(());
    }
    if let Some(other) = &found {
        eprintln!("bpf-linker {other} is on PATH; replacing it with {BPF_LINKER_VERSION}");
    }
    // cargo waits by itself when another cargo holds the package cache lock.
    let mut cmd = workspace.cargo();
    cmd.args([
        "install",
        &format!("bpf-linker@{BPF_LINKER_VERSION}"),
        "--locked",
    ]);
    process::run_step(&format!("install {item}"), &mut cmd)?;
    match bpf_linker_version()? {
        Some(version) if version == BPF_LINKER_VERSION => {}
        Some(version) => bail!(
            "installed bpf-linker {BPF_LINKER_VERSION}, but the bpf-linker first on PATH is \
             still {version}: remove it or put ~/.cargo/bin earlier on PATH"
        ),
        None => bail!(
            "installed bpf-linker {BPF_LINKER_VERSION}, but `bpf-linker --version` does not \
             run: is ~/.cargo/bin on PATH?"
        ),
    }
    report(&item, "installed");
    Ok(())
}

/// Installs cargo-deny [`CARGO_DENY_VERSION`] unless that version is on PATH.
fn ensure_cargo_deny(workspace: &Workspace) -> Result<()> {
    let item = format!("cargo-deny {CARGO_DENY_VERSION}");
    let version = || -> Result<Option<String>> {
        let Some(out) = process::output_if_installed(Command::new("cargo-deny").arg("--version"))?
        else {
            return Ok(None);
        };
        // `cargo-deny 0.20.2`
        Ok(String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .map(str::to_owned))
    };
    if version()?.as_deref() == Some(CARGO_DENY_VERSION) {
        report(&item, "present");
        return Ok(());
    }
    let mut cmd = workspace.cargo();
    cmd.args([
        "install",
        &format!("cargo-deny@{CARGO_DENY_VERSION}"),
        "--locked",
    ]);
    process::run_step(&format!("install {item}"), &mut cmd)?;
    if version()?.as_deref() != Some(CARGO_DENY_VERSION) {
        bail!(
            "installed {item}, but `cargo-deny --version` does not report it: is ~/.cargo/bin on PATH?"
        );
    }
    report(&item, "installed");
    Ok(())
}

/// Whether dpkg reports `package` as installed.
fn debian_package_installed(package: &str) -> Result<bool> {
    let mut cmd = Command::new("dpkg-query");
    cmd.args(["-W", "--showformat=${Status}", package]);
    let output = process::output_if_installed(&mut cmd)?.context(
        "dpkg-query is not on PATH: l3lb's lab expects Debian (or Ubuntu) to install its tools",
    )?;
    Ok(output.status.success()
        && String::from_utf8_lossy(&output.stdout).trim() == "install ok installed")
}

/// Installs the missing [`DEBIAN_PACKAGES`] with apt-get (as root), or names the command.
fn ensure_debian_packages() -> Result<()> {
    let mut missing = Vec::new();
    for package in DEBIAN_PACKAGES {
        if debian_package_installed(package)? {
            report(package, "present");
        } else {
            missing.push(*package);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let mut install = Command::new("apt-get");
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y"])
        .args(&missing);
    if !process::is_root()? {
        bail!(
            "missing Debian packages: {}; install them as root with:\n  \
             sudo apt-get update && sudo {}",
            missing.join(", "),
            process::display(&install)
        );
    }
    let mut update = Command::new("apt-get");
    update
        .env("DEBIAN_FRONTEND", "noninteractive")
        .arg("update");
    process::run_step("apt-get update", &mut update)?;
    process::run_step("install Debian packages", &mut install)?;
    for package in missing {
        report(package, "installed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bpf_linker_version() {
        assert_eq!(
            parse_bpf_linker_version("bpf-linker 0.10.4\n").as_deref(),
            Some("0.10.4")
        );
        assert_eq!(parse_bpf_linker_version(""), None);
    }
}
