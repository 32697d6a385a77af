//! The DaemonSet's privileges are enough for the agent, and each capability it adds is
//! needed. Needs root (a network namespace, XDP, bpffs).
//!
//! The agent runs as the container runtime would start it from
//! `deploy/manifests/daemonset.yaml`: as the manifest's user, with the manifest's
//! capabilities as its bounding, permitted and effective sets (no ambient or inheritable
//! ones), `no_new_privs` for `allowPrivilegeEscalation: false`, a read-only root file
//! system and a read-only `/proc/sys`, and the DaemonSet's bpffs volume: a directory of a
//! bpffs (0700 at its root, as on a host) mounted at the ConfigMap's `pin_path` (in the
//! container's own /run), with nothing else of that bpffs in view. Its settings are the ConfigMap's with
//! the lab's interface and one service, so the balancer path is loaded, not just decap.

use std::{path::PathBuf, time::Duration};

use k8s_openapi::api::{apps::v1::DaemonSet, core::v1::ConfigMap};
use l3lb_tests::{Netns, l3lb_bin, spawn_in};

fn manifest<T: serde::de::DeserializeOwned>(file: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy/manifests")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

/// What the container runtime gives the agent, from the DaemonSet.
struct Privileges {
    /// Capability names as the manifest spells them (`BPF`, `NET_ADMIN`, …).
    capabilities: Vec<String>,
    uid: i64,
    no_new_privs: bool,
    /// The bpffs volume: the node's directory and where the container sees it.
    bpffs_host_path: String,
    bpffs_mount_path: String,
}

fn daemonset_privileges() -> Privileges {
    let ds: DaemonSet = manifest("daemonset.yaml");
    let pod = ds.spec.and_then(|s| s.template.spec).expect("pod template");
    let sc = pod.containers[0]
        .security_context
        .clone()
        .expect("securityContext");
    let caps = sc.capabilities.expect("capabilities");
    assert_eq!(caps.drop, Some(vec!["ALL".to_string()]), "drops ALL first");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.host_path.is_some())
        .expect("the bpffs hostPath volume");
    let mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume.name)
        .expect("the bpffs volume mounted");
    Privileges {
        capabilities: caps.add.unwrap_or_default(),
        uid: sc.run_as_user.expect("runAsUser is explicit"),
        no_new_privs: sc.allow_privilege_escalation == Some(false),
        bpffs_host_path: volume.host_path.as_ref().expect("hostPath").path.clone(),
        bpffs_mount_path: mount.mount_path.clone(),
    }
}

/// The ConfigMap's settings for `interface`, plus one IPIP service.
fn settings(interface: &str) -> String {
    let cm: ConfigMap = manifest("configmap.yaml");
    let text = cm
        .data
        .expect("data")
        .remove("l3lb.yaml")
        .expect("l3lb.yaml");
    let cfg = l3lb::config::Config::parse(&text).expect("the ConfigMap's settings");
    assert!(
        cfg.pin_path.starts_with("/run/"),
        "pins on the volume mounted in the container's /run"
    );
    let mut value: serde_yaml_ng::Mapping = serde_yaml_ng::from_str(&text).expect("settings");
    value.insert("interface".into(), interface.into());
    let service: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        "{name: web, vip: 192.0.2.10, ports: [80], backends: [{address: 10.99.0.2}]}",
    )
    .expect("service");
    value.insert("services".into(), vec![service].into());
    let out = serde_yaml_ng::to_string(&value).expect("settings YAML");
    l3lb::config::Config::parse(&out).expect("the lab's settings");
    out
}

/// A shell line that sets up the container's view and execs the agent in it. It runs
/// under `ip netns exec`, whose private mount namespace keeps every mount here (and the
/// bpffs holding the pins) away from the host and gone when the agent exits.
fn container_command(p: &Privileges, caps: &[String], bin: &str, config: &str) -> String {
    let bounding: String = caps
        .iter()
        .map(|c| format!(",+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let nnp = if p.no_new_privs {
        " --no-new-privs"
    } else {
        ""
    };
    // The node's bpffs (0700 at its root, as /sys/fs/bpf on a host) is mounted aside, at
    // /mnt of this private mount namespace; the container's /sys/fs/bpf is no bpffs (an
    // empty directory of its own sysfs: an empty tmpfs here), and its /run, its own,
    // holds the volume, as the runtime would give it.
    let node_dir = p
        .bpffs_host_path
        .strip_prefix("/sys/fs/bpf")
        .expect("the volume is a directory of the node's bpffs");
    assert!(
        p.bpffs_mount_path.starts_with("/run/"),
        "the volume is mounted in the container's /run: {}",
        p.bpffs_mount_path
    );
    format!(
        "set -e; \
         mount -t bpf bpf /mnt; chmod 0700 /mnt; mkdir -p /mnt{node_dir}; \
         mount -t tmpfs -o mode=0755 none /sys/fs/bpf; \
         mount -t tmpfs -o mode=0755 none /run; mkdir -p {mount_path}; \
         mount --bind /mnt{node_dir} {mount_path}; \
         mount --bind /proc/sys /proc/sys; mount -o remount,bind,ro /proc/sys; \
         mount -o remount,bind,ro /; \
         exec setpriv --reuid={uid} --regid={uid} --clear-groups \
           --inh-caps=-all --bounding-set=-all{bounding}{nnp} \
           {bin} run --config {config}",
        uid = p.uid,
        mount_path = p.bpffs_mount_path,
    )
}

struct Setup {
    ns: Netns,
    dir: PathBuf,
    config: PathBuf,
}

fn setup(name: &str) -> Setup {
    let ns = Netns::new(name).expect("namespace");
    ns.ip(["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        .expect("veth");
    for dev in ["v0", "v1"] {
        ns.ip(["link", "set", dev, "up"]).expect("up");
    }
    ns.ip(["addr", "add", "10.99.0.1/24", "dev", "v0"])
        .expect("addr");
    ns.ip(["addr", "add", "10.99.0.2/24", "dev", "v1"])
        .expect("addr");
    // The node prerequisite the README names: Kubernetes nodes forward already, and the
    // agent cannot write /proc/sys from its container.
    ns.sysctl(&[("net.ipv4.ip_forward", "1")]).expect("sysctl");
    // Per test: the tests of this file run in parallel in one process.
    let dir = std::env::temp_dir().join(format!("l3lb-privileges-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("l3lb.yaml");
    std::fs::write(&config, settings("v0")).expect("config");
    Setup { ns, dir, config }
}

fn pid_status(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status of the agent")
}

fn status_field<'a>(status: &'a str, field: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(str::trim)
        .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
}

fn capability_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| match n.trim_start_matches("CAP_") {
            "NET_ADMIN" => 1u64 << 12,
            "PERFMON" => 1u64 << 38,
            "BPF" => 1u64 << 39,
            other => panic!("capability {other} is not one this test knows"),
        })
        .fold(0, |a, b| a | b)
}

#[test]
fn the_agent_runs_with_exactly_the_daemonsets_privileges() {
    let p = daemonset_privileges();
    let s = setup("priv-all");
    let bin = l3lb_bin().expect("binary");
    let line = container_command(
        &p,
        &p.capabilities,
        &bin.to_string_lossy(),
        &s.config.to_string_lossy(),
    );
    let mut agent = spawn_in(&s.ns, "sh", ["-c", &line], &s.dir.join("agent.log")).expect("agent");
    agent
        .wait_for_log("l3lb ready", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", agent.log()));

    let status = pid_status(agent.pid());
    let expected = format!("{:016x}", capability_mask(&p.capabilities));
    for set in ["CapEff:", "CapPrm:", "CapBnd:"] {
        assert_eq!(status_field(&status, set), expected, "{set}");
    }
    assert_eq!(status_field(&status, "CapAmb:"), "0000000000000000");
    assert_eq!(status_field(&status, "CapInh:"), "0000000000000000");
    assert_eq!(
        status_field(&status, "NoNewPrivs:"),
        if p.no_new_privs { "1" } else { "0" }
    );
    let uid = status_field(&status, "Uid:");
    assert!(
        uid.split_whitespace().all(|u| u == p.uid.to_string()),
        "{uid}"
    );

    let link = s.ns.ip(["link", "show", "v0"]).expect("link");
    assert!(link.contains("xdp"), "the program is attached: {link}");

    let exit = agent.stop().expect("stop");
    assert!(exit.success(), "{exit:?}\n{}", agent.log());
    assert!(
        agent.log().contains("the data plane keeps forwarding"),
        "{}",
        agent.log()
    );
    let _ = std::fs::remove_dir_all(&s.dir);
}

#[test]
fn each_capability_the_daemonset_adds_is_needed() {
    let p = daemonset_privileges();
    let s = setup("priv-fewer");
    let bin = l3lb_bin().expect("binary");
    for missing in &p.capabilities {
        let fewer: Vec<String> = p
            .capabilities
            .iter()
            .filter(|c| *c != missing)
            .cloned()
            .collect();
        let line = container_command(
            &p,
            &fewer,
            &bin.to_string_lossy(),
            &s.config.to_string_lossy(),
        );
        let log = s.dir.join(format!("without-{missing}.log"));
        let mut agent = spawn_in(&s.ns, "sh", ["-c", &line], &log).expect("agent");
        let exit = agent.wait_exit(Duration::from_secs(20)).expect("exits");
        let text = agent.log();
        assert!(
            !exit.success() && !text.contains("l3lb ready"),
            "without {missing} the agent still started:\n{text}"
        );
        let name = format!("CAP_{}", missing.trim_start_matches("CAP_"));
        assert!(
            text.contains("error: missing capabilities: ") && text.contains(&name),
            "without {missing}: an error naming it ({exit:?})\n{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&s.dir);
}
