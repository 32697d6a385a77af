//! The `l3lb` command line as a user meets it: `check` exit codes and messages, `--help`.

use std::process::Command;

fn l3lb(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_l3lb"))
        .args(args)
        .output()
        .expect("run l3lb");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("l3lb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

const GOOD: &str = "interface: eth0
services:
  - name: web
    vip: 192.0.2.10
    ports: [80, 443]
    backends:
      - address: 10.0.0.11
      - address: 10.0.0.12
        weight: 2
  - name: dns
    vip: 192.0.2.10
    ports: [53]
    protocol: udp
    forwarding: l2
    backends:
      - address: 10.0.0.13
";

#[test]
fn check_accepts_a_valid_config() {
    let path = write("good.yaml", GOOD);
    let (ok, stdout, stderr) = l3lb(&["check", "--config", path.to_str().expect("utf-8")]);
    assert!(ok, "stderr: {stderr}");
    assert!(stdout.contains("ok (2 services, 3 backends)"), "{stdout}");
}

#[test]
fn check_rejects_with_the_field_path_and_a_nonzero_exit() {
    let bad = GOOD.replace("10.0.0.11", "10.0.0");
    let path = write("bad.yaml", &bad);
    let (ok, _, stderr) = l3lb(&["check", "--config", path.to_str().expect("utf-8")]);
    assert!(!ok, "invalid config must fail");
    assert!(
        stderr.contains(r#"services[0].backends[0].address: invalid IP address "10.0.0""#),
        "{stderr}"
    );
    let typo = GOOD.replace("forwarding: l2", "forwardin: l2");
    let path = write("typo.yaml", &typo);
    let (ok, _, stderr) = l3lb(&["check", "--config", path.to_str().expect("utf-8")]);
    assert!(!ok);
    assert!(
        stderr.contains("services[1].forwardin: unknown field"),
        "{stderr}"
    );
    let (ok, _, stderr) = l3lb(&["check", "--config", "/nonexistent/l3lb.yaml"]);
    assert!(!ok);
    assert!(stderr.contains("cannot read"), "{stderr}");
}

#[test]
fn help_lists_the_subcommands() {
    let (ok, stdout, _) = l3lb(&["--help"]);
    assert!(ok);
    for cmd in ["run", "check", "status", "down"] {
        assert!(stdout.contains(cmd), "--help mentions {cmd}: {stdout}");
    }
}

fn l3lb_without_node_name(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_l3lb"))
        .args(args)
        .env_remove("NODE_NAME")
        .output()
        .expect("run l3lb");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kubernetes_mode_needs_the_node_name() {
    let (ok, stderr) = l3lb_without_node_name(&["run", "--kubernetes", "--interface", "lo"]);
    assert!(!ok);
    assert!(
        stderr.contains("--node-name") && stderr.contains("NODE_NAME"),
        "{stderr}"
    );
}

#[test]
fn kubernetes_settings_errors_name_the_field() {
    let path = write(
        "kube-bad.yaml",
        "interface: eth0\nkubernetes:\n  debounce: 5\n",
    );
    let (ok, stderr) = l3lb_without_node_name(&[
        "run",
        "--kubernetes",
        "--node-name",
        "n1",
        "--config",
        path.to_str().expect("utf-8"),
    ]);
    assert!(!ok);
    assert!(
        stderr.contains("kubernetes.debounce: unknown field `debounce`"),
        "{stderr}"
    );
}

#[test]
fn kubernetes_settings_of_comments_alone_are_empty_settings() {
    let path = write(
        "kube-comments.yaml",
        "# interface: eth0\n# kubernetes:\n#   debounce_ms: 500\n",
    );
    let (ok, stderr) = l3lb_without_node_name(&[
        "run",
        "--kubernetes",
        "--node-name",
        "n1",
        "--interface",
        "l3lbnone0",
        "--kubeconfig",
        "/nonexistent/kubeconfig",
        "--config",
        path.to_str().expect("utf-8"),
    ]);
    // Past the settings: the next step (the API client) is what fails here.
    assert!(!ok);
    assert!(
        !stderr.contains("empty") && stderr.contains("kubeconfig"),
        "{stderr}"
    );
}

#[test]
fn kubernetes_mode_refuses_static_services() {
    let path = write("kube-services.yaml", GOOD);
    let (ok, stderr) = l3lb_without_node_name(&[
        "run",
        "--kubernetes",
        "--node-name",
        "n1",
        "--config",
        path.to_str().expect("utf-8"),
    ]);
    assert!(!ok);
    assert!(stderr.contains("remove `services`"), "{stderr}");
}

#[test]
fn bench_generate_refuses_a_rate_or_duration_it_cannot_keep() {
    let base = [
        "bench",
        "generate",
        "--interface",
        "lo",
        "--dst-mac",
        "02:00:00:00:00:01",
        "--vip",
        "192.0.2.10",
    ];
    for (extra, needle) in [
        (["--rate", "0"], "--rate"),
        (["--count", "0"], "--count"),
        (["--duration", "inf"], "--duration"),
        (["--duration", "0"], "--duration"),
        (["--duration=-3", "--flows=1024"], "--duration"),
    ] {
        let args: Vec<&str> = base.iter().chain(extra.iter()).copied().collect();
        let (ok, _, stderr) = l3lb(&args);
        assert!(!ok, "{extra:?} accepted");
        assert!(
            stderr.contains(needle) && !stderr.contains("panicked"),
            "{extra:?}: {stderr}"
        );
    }
}

/// In the DaemonSet's pod the pins are mounted at /run/l3lb/bpf and the pod's
/// L3LB_PIN_PATH says so: `status`, `flows` and `down` take it when --pin-path is not
/// given, and --pin-path still wins. (`down` is not run: were the variable ignored, it
/// would take down a balancer pinned at the default path of the host running the test.)
#[test]
fn the_pin_path_comes_from_l3lb_pin_path_unless_given() {
    let (ok, help, _) = l3lb(&["down", "--help"]);
    assert!(
        ok && help.contains("L3LB_PIN_PATH"),
        "down reads it: {help}"
    );
    let env_dir = "/nonexistent/l3lb-from-env";
    for args in [&["status"][..], &["flows", "--vip", "192.0.2.1"][..]] {
        let out = Command::new(env!("CARGO_BIN_EXE_l3lb"))
            .args(args)
            .env("L3LB_PIN_PATH", env_dir)
            .output()
            .expect("run l3lb");
        // No pins there: both fail naming the path.
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains(env_dir), "{args:?} used the variable: {said}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_l3lb"))
        .args(["status", "--pin-path", "/nonexistent/l3lb-from-flag"])
        .env("L3LB_PIN_PATH", env_dir)
        .output()
        .expect("run l3lb");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/l3lb-from-flag") && !err.contains(env_dir),
        "the flag wins: {err}"
    );
}
