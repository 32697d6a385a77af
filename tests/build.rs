//! Builds lb-ebpf a second time, without its `log` feature, for the benchmark and the
//! tests that show the shipped program's disabled log statements cost nothing (the agent's
//! own object is built by lb-userspace's build.rs).

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    // aya-build reruns this script when lb-ebpf's sources change; the program also
    // compiles lb-common (hashes, map layouts), whose changes must rebuild it too, or the
    // embedded object silently keeps the old code.
    let common = packages
        .iter()
        .find(|p| p.name.as_str() == "lb-common")
        .ok_or_else(|| anyhow!("package lb-common not found in the workspace"))?;
    if let Some(dir) = common.manifest_path.parent() {
        println!("cargo:rerun-if-changed={dir}");
    }
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "lb-ebpf")
        .ok_or_else(|| anyhow!("package lb-ebpf not found in the workspace"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("lb-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            no_default_features: true,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
