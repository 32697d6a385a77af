//! The Kubernetes deployment (`deploy/manifests`, `deploy/helm/l3lb`) read as the API server
//! would read it, and held to the least privilege the README promises. Needs no root and no
//! cluster.
//!
//! Every manifest document is deserialised into its `k8s-openapi` type. Those types ignore
//! unknown fields (serde's `deny_unknown_fields` is not set on them), and the API server
//! drops them too, so a misspelt field such as `readOnlyRootFilesytem` would silently do
//! nothing. Each object is therefore serialised back and compared with the document: a
//! field that did not survive the round trip is one the type does not have.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
};

use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The namespace the plain manifests install into.
const NAMESPACE: &str = "l3lb-system";
/// The agent's name: ServiceAccount, ClusterRole(Binding), ConfigMap and DaemonSet.
const NAME: &str = "l3lb";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// One YAML document of a manifest file, as JSON (what the API server receives).
struct Document {
    file: String,
    value: Value,
}

impl Document {
    fn api_version(&self) -> &str {
        self.value["apiVersion"].as_str().unwrap_or("")
    }

    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// Every document of every `.yaml` file under `deploy/manifests`, in file-name order;
/// documents that hold only comments are skipped.
fn documents() -> Vec<Document> {
    let dir = deploy_dir().join("manifests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let file = path
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .into_owned();
        for (i, de) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let yaml: serde_yaml_ng::Value = serde::Deserialize::deserialize(de)
                .unwrap_or_else(|e| panic!("{file}: document {i} is not YAML: {e}"));
            if yaml.is_null() {
                continue;
            }
            let value = serde_json::to_value(&yaml)
                .unwrap_or_else(|e| panic!("{file}: document {i} has no JSON form: {e}"));
            docs.push(Document {
                file: file.clone(),
                value,
            });
        }
    }
    docs
}

/// Paths of the fields of `original` that `round_trip` lost or changed.
fn lost_fields(original: &Value, round_trip: &Value, path: &str, out: &mut Vec<String>) {
    match (original, round_trip) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                let here = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match b.get(key) {
                    Some(other) => lost_fields(value, other, &here, out),
                    None => out.push(here),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                lost_fields(x, y, &format!("{path}[{i}]"), out);
            }
        }
        (a, b) if a == b => {}
        (a, b) => out.push(format!("{path} (written {a}, read back as {b})")),
    }
}

/// Deserialises `doc` into `T` and fails on any field `T` does not have.
fn typed<T: DeserializeOwned + Serialize>(doc: &Document) -> T {
    let what = format!("{}: {} {}", doc.file, doc.kind(), doc.name());
    let object: T = serde_json::from_value(doc.value.clone())
        .unwrap_or_else(|e| panic!("{what}: not a valid {}: {e}", doc.kind()));
    let back = serde_json::to_value(&object).expect("serialising a k8s-openapi object");
    let mut lost = Vec::new();
    lost_fields(&doc.value, &back, "", &mut lost);
    assert!(
        lost.is_empty(),
        "{what}: fields the Kubernetes API does not have (misspelt or misplaced?): {lost:?}"
    );
    object
}

/// The typed objects of the plain manifests, one of each kind.
struct Manifests {
    namespace: Option<Namespace>,
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    binding: ClusterRoleBinding,
    config_map: ConfigMap,
    daemon_set: DaemonSet,
}

fn one<T>(found: &mut Option<T>, object: T, kind: &str) {
    assert!(found.is_none(), "more than one {kind} in deploy/manifests");
    *found = Some(object);
}

fn manifests() -> Manifests {
    let (mut ns, mut sa, mut role, mut binding, mut cm, mut ds) =
        (None, None, None, None, None, None);
    for doc in documents() {
        match (doc.api_version(), doc.kind()) {
            ("v1", "Namespace") => one(&mut ns, typed::<Namespace>(&doc), "Namespace"),
            ("v1", "ServiceAccount") => one(&mut sa, typed(&doc), "ServiceAccount"),
            ("v1", "ConfigMap") => one(&mut cm, typed(&doc), "ConfigMap"),
            ("apps/v1", "DaemonSet") => one(&mut ds, typed(&doc), "DaemonSet"),
            ("rbac.authorization.k8s.io/v1", "ClusterRole") => {
                one(&mut role, typed(&doc), "ClusterRole")
            }
            ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => {
                one(&mut binding, typed(&doc), "ClusterRoleBinding")
            }
            (api, kind) => panic!(
                "{}: {api} {kind} is not a kind this test knows; add it here with its checks",
                doc.file
            ),
        }
    }
    Manifests {
        namespace: ns,
        service_account: sa.expect("a ServiceAccount"),
        cluster_role: role.expect("a ClusterRole"),
        binding: binding.expect("a ClusterRoleBinding"),
        config_map: cm.expect("a ConfigMap"),
        daemon_set: ds.expect("a DaemonSet"),
    }
}

impl Manifests {
    fn pod(&self) -> &PodSpec {
        self.daemon_set
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("the DaemonSet has a pod template spec")
    }

    fn agent(&self) -> &Container {
        let pod = self.pod();
        assert_eq!(
            pod.containers.len(),
            1,
            "the pod runs exactly one container, the agent"
        );
        assert!(
            pod.init_containers.as_ref().is_none_or(Vec::is_empty),
            "no init containers (they would need their own privileges)"
        );
        &pod.containers[0]
    }

    /// The settings file's text (the ConfigMap key the agent's `--config` names).
    fn settings(&self) -> (&str, &str) {
        let data = self.config_map.data.as_ref().expect("ConfigMap data");
        assert_eq!(data.len(), 1, "the ConfigMap holds one file, the settings");
        let (key, text) = data.iter().next().expect("one key");
        (key.as_str(), text.as_str())
    }
}

#[test]
fn every_manifest_is_a_kubernetes_object_without_unknown_fields() {
    let m = manifests();
    for (kind, meta) in [
        ("ServiceAccount", &m.service_account.metadata),
        ("ConfigMap", &m.config_map.metadata),
        ("DaemonSet", &m.daemon_set.metadata),
    ] {
        assert_eq!(meta.name.as_deref(), Some(NAME), "{kind} name");
        assert_eq!(
            meta.namespace.as_deref(),
            Some(NAMESPACE),
            "{kind} namespace"
        );
    }
    assert_eq!(m.cluster_role.metadata.name.as_deref(), Some(NAME));
    assert_eq!(m.binding.metadata.name.as_deref(), Some(NAME));
    if let Some(ns) = &m.namespace {
        assert_eq!(ns.metadata.name.as_deref(), Some(NAMESPACE));
        // The pod needs host networking, a hostPath and extra capabilities: only the
        // "privileged" Pod Security level admits it.
        let labels = ns.metadata.labels.as_ref().expect("namespace labels");
        assert_eq!(
            labels
                .get("pod-security.kubernetes.io/enforce")
                .map(String::as_str),
            Some("privileged")
        );
    }
}

/// The detector itself: a misspelt field is caught, a correct one is not.
#[test]
fn a_misspelt_field_is_caught() {
    let doc = |security: Value| Document {
        file: "inline".into(),
        value: serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "securityContext": security}]},
        }),
    };
    let _ = typed::<k8s_openapi::api::core::v1::Pod>(&doc(
        serde_json::json!({"readOnlyRootFilesystem": true}),
    ));
    let typo = std::panic::catch_unwind(|| {
        typed::<k8s_openapi::api::core::v1::Pod>(&doc(
            serde_json::json!({"readOnlyRootFilesytem": true}),
        ))
    });
    let message = typo.expect_err("a misspelt field must fail");
    let message = message
        .downcast_ref::<String>()
        .expect("panic message")
        .clone();
    assert!(
        message.contains("spec.containers[0].securityContext.readOnlyRootFilesytem"),
        "{message}"
    );
}

#[test]
fn the_agent_gets_bpf_net_admin_and_perfmon_and_nothing_else() {
    let m = manifests();
    let pod = m.pod();
    let agent = m.agent();
    let sc = agent
        .security_context
        .as_ref()
        .expect("container securityContext");
    let caps = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(
        caps.drop.as_deref(),
        Some(&["ALL".to_string()][..]),
        "drop ALL first"
    );
    let added: BTreeSet<&str> = caps
        .add
        .iter()
        .flatten()
        .map(|c| c.trim_start_matches("CAP_"))
        .collect();
    assert_eq!(
        added,
        BTreeSet::from(["BPF", "NET_ADMIN", "PERFMON"]),
        "capabilities added"
    );
    assert_ne!(sc.privileged, Some(true), "never privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert!(
        sc.proc_mount.is_none(),
        "/proc stays masked (the default procMount)"
    );
    // RuntimeDefault seccomp, set on the pod or the container and not overridden.
    let pod_seccomp = pod
        .security_context
        .as_ref()
        .and_then(|s| s.seccomp_profile.as_ref());
    let seccomp = sc.seccomp_profile.as_ref().or(pod_seccomp);
    assert_eq!(
        seccomp.map(|s| s.type_.as_str()),
        Some("RuntimeDefault"),
        "seccomp profile"
    );
    assert_ne!(pod.host_pid, Some(true), "no host PID namespace");
    assert_ne!(pod.host_ipc, Some(true), "no host IPC namespace");
}

#[test]
fn the_agent_runs_in_the_node_network_with_the_node_bpffs() {
    let m = manifests();
    let pod = m.pod();
    assert_eq!(
        pod.host_network,
        Some(true),
        "XDP attaches to the node's NIC"
    );
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let host_paths: Vec<_> = volumes
        .iter()
        .filter_map(|v| v.host_path.as_ref().map(|h| (v.name.as_str(), h)))
        .collect();
    assert_eq!(
        host_paths.len(),
        1,
        "bpffs is the only host path: {host_paths:?}"
    );
    let (bpffs, host_path) = host_paths[0];
    // The pin directory alone, not the node's whole bpffs (other programs' pins).
    assert_eq!(host_path.path, "/sys/fs/bpf/l3lb");
    assert_eq!(host_path.type_.as_deref(), Some("DirectoryOrCreate"));
    let mount = m
        .agent()
        .volume_mounts
        .iter()
        .flatten()
        .find(|vm| vm.name == bpffs)
        .expect("bpffs is mounted");
    // Not below /sys: the container's /sys is a fresh sysfs, where the runtime cannot
    // create the mount point (and the default AppArmor profile denies writes under
    // /sys/fs/*).
    assert!(
        !mount.mount_path.starts_with("/sys/") && mount.mount_path.starts_with('/'),
        "bpffs mounted outside /sys: {}",
        mount.mount_path
    );
    assert_ne!(mount.read_only, Some(true), "pins are written there");
    // `kubectl exec … -- l3lb status` finds the pins without --pin-path.
    let pin_env = m
        .agent()
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "L3LB_PIN_PATH")
        .and_then(|e| e.value.as_deref());
    assert_eq!(
        pin_env,
        Some(mount.mount_path.as_str()),
        "L3LB_PIN_PATH names the mount"
    );
    // Bidirectional would need a privileged container; the agent never mounts anything.
    assert_eq!(mount.mount_propagation.as_deref(), Some("HostToContainer"));

    let (_, text) = m.settings();
    let settings = l3lb::config::Config::parse(text).expect("settings");
    assert_eq!(
        settings.pin_path,
        std::path::Path::new(&mount.mount_path),
        "pin_path {} is the bpffs mount {}",
        settings.pin_path.display(),
        mount.mount_path
    );
}

#[test]
fn node_name_comes_from_the_downward_api() {
    let m = manifests();
    let env = m.agent().env.as_deref().unwrap_or_default();
    let node_name = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME is set");
    let field = node_name
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("NODE_NAME comes from a fieldRef");
    assert_eq!(field.field_path, "spec.nodeName");
    assert!(node_name.value.is_none());
}

/// (API group, resource, verb) triples a ClusterRole grants.
fn grants(role: &ClusterRole) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "rules name resources by type only"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_reads_services_endpointslices_and_nodes_and_writes_only_events() {
    let m = manifests();
    let mut expected = BTreeSet::new();
    for (group, resource) in [
        ("", "services"),
        ("", "nodes"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        // The watchers list, then watch; nothing gets single objects.
        for verb in ["list", "watch"] {
            expected.insert((group.into(), resource.into(), verb.into()));
        }
    }
    // Events on the Services it handles, created once each (see the comment in
    // clusterrole.yaml): no patch, which would let the agent rewrite anyone's Events.
    expected.insert(("events.k8s.io".into(), "events".into(), "create".into()));
    assert_eq!(grants(&m.cluster_role), expected);

    let binding = &m.binding;
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        Some(&binding.role_ref.name),
        m.cluster_role.metadata.name.as_ref()
    );
    let subjects = binding.subjects.as_deref().unwrap_or_default();
    assert_eq!(subjects.len(), 1, "bound to the agent alone");
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(
        Some(&subjects[0].name),
        m.service_account.metadata.name.as_ref()
    );
    assert_eq!(subjects[0].namespace, m.service_account.metadata.namespace);
    assert_eq!(
        m.pod().service_account_name,
        m.service_account.metadata.name,
        "the pod runs as the bound ServiceAccount"
    );
}

#[test]
fn the_agent_requests_and_is_limited_in_resources() {
    let m = manifests();
    let resources = m.agent().resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    let limits = resources.limits.as_ref().expect("limits");
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    // BPF maps are charged to the container's memory cgroup: a memory limit bounds them.
    assert!(limits.contains_key("memory"));
}

/// The port and loopback-ness of a probe, checked against where the agent listens.
fn probe_target(probe: Option<&Probe>, what: &str) -> (String, String, i32) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("{what} is an httpGet probe"));
    let port = match &get.port {
        IntOrString::Int(p) => *p,
        IntOrString::String(s) => panic!("{what}: port {s} by number (hostNetwork)"),
    };
    (
        get.host.clone().unwrap_or_default(),
        get.path.clone().unwrap_or_default(),
        port,
    )
}

#[test]
fn the_agent_is_started_with_the_settings_and_probed_where_it_listens() {
    let m = manifests();
    let agent = m.agent();
    let args = agent.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    assert!(args.iter().any(|a| a == "--kubernetes"), "{args:?}");
    assert!(
        args.iter().any(|a| a == "--class=l3lb.io/xdp"),
        "the default class, spelt out: {args:?}"
    );

    // --config names the ConfigMap's key where the ConfigMap is mounted.
    let (key, text) = m.settings();
    let volume = m
        .pod()
        .volumes
        .iter()
        .flatten()
        .find(|v| v.config_map.as_ref().map(|c| &c.name) == m.config_map.metadata.name.as_ref())
        .expect("the ConfigMap is a volume");
    let mount = agent
        .volume_mounts
        .iter()
        .flatten()
        .find(|vm| vm.name == volume.name)
        .expect("the ConfigMap is mounted");
    assert_eq!(mount.read_only, Some(true));
    let config_arg = format!("--config={}/{key}", mount.mount_path);
    assert!(args.contains(&config_arg), "{config_arg} in {args:?}");

    // The settings are a config the agent accepts, without services (those come from
    // the API).
    let settings = l3lb::config::Config::parse(text).expect("the settings parse");
    assert!(settings.services.is_empty());
    let listen: SocketAddr = settings.metrics_address;
    assert!(
        listen.ip().is_loopback() || listen.ip().is_unspecified(),
        "the kubelet probes 127.0.0.1: metrics_address {listen} must include loopback"
    );

    let (host, path, port) = probe_target(agent.readiness_probe.as_ref(), "readinessProbe");
    assert_eq!((host.as_str(), path.as_str()), ("127.0.0.1", "/readyz"));
    assert_eq!(port, i32::from(listen.port()));
    let (host, path, port) = probe_target(agent.liveness_probe.as_ref(), "livenessProbe");
    assert_eq!((host.as_str(), path.as_str()), ("127.0.0.1", "/healthz"));
    assert_eq!(port, i32::from(listen.port()));
    let declared: Vec<i32> = agent
        .ports
        .iter()
        .flatten()
        .map(|p| p.container_port)
        .collect();
    assert_eq!(
        declared,
        vec![i32::from(listen.port())],
        "the metrics port is declared"
    );
}

/// The node probe defaults the ConfigMap shows in a comment are the agent's defaults, so
/// whoever uncomments them to edit gets what ran before.
#[test]
fn the_settings_comment_shows_the_node_health_check_defaults() {
    let m = manifests();
    let (_, text) = m.settings();
    let shown: String = text
        .lines()
        .skip_while(|l| l.trim() != "# kubernetes:")
        .map_while(|l| l.trim_start().strip_prefix("# "))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        shown.contains("node_health_check"),
        "the commented example is in the settings: {text}"
    );
    let parsed = l3lb::config::Config::parse(&format!("interface: eth0\n{shown}"))
        .expect("the commented settings parse");
    assert_eq!(
        parsed.kubernetes.node_health_check,
        l3lb::config::NodeHealthCheck::default()
    );
}

/// A YAML file of the chart as JSON.
fn chart_yaml(name: &str) -> Value {
    let path = deploy_dir().join("helm/l3lb").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let yaml: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::to_value(yaml).expect("JSON form")
}

/// The chart's defaults are the plain manifests' settings, so `helm install` and
/// `kubectl apply -f deploy/manifests` install the same agent. This test has no Helm to
/// render with; `deploy/helm/check-render.py` renders the chart with Helm's own code and
/// compares the objects themselves.
#[test]
fn the_helm_chart_defaults_match_the_manifests() {
    let m = manifests();
    let chart = chart_yaml("Chart.yaml");
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "l3lb");
    assert_eq!(chart["type"], "application");
    assert_eq!(chart["appVersion"], env!("CARGO_PKG_VERSION"));

    let values = chart_yaml("values.yaml");
    let settings = l3lb::config::Config::parse(m.settings().1).expect("settings");
    assert_eq!(values["interface"], settings.interface.as_str());
    assert_eq!(
        values["xdpMode"],
        serde_json::to_value(settings.xdp_mode).expect("xdp_mode")
    );
    // The node's directory; the pod mounts it where the settings' pin_path says.
    assert_eq!(values["pinPath"], "/sys/fs/bpf/l3lb");
    assert_eq!(settings.pin_path, std::path::Path::new("/run/l3lb/bpf"));
    assert_eq!(
        values["metricsAddress"],
        settings.metrics_address.to_string()
    );
    assert_eq!(values["class"], "l3lb.io/xdp");
    assert_eq!(values["takeUnclassed"], false);

    let agent = m.agent();
    let image = agent.image.as_deref().expect("image");
    let tag = values["image"]["tag"]
        .as_str()
        .filter(|t| !t.is_empty())
        .unwrap_or(env!("CARGO_PKG_VERSION"));
    assert_eq!(
        format!(
            "{}:{tag}",
            values["image"]["repository"].as_str().unwrap_or("")
        ),
        image
    );
    assert_eq!(
        values["resources"],
        serde_json::to_value(agent.resources.as_ref()).expect("resources")
    );
    let pod = m.pod();
    assert_eq!(
        values["nodeSelector"],
        serde_json::to_value(&pod.node_selector).expect("nodeSelector")
    );
    assert_eq!(
        values["tolerations"],
        serde_json::to_value(&pod.tolerations).expect("tolerations")
    );
    assert_eq!(
        values["priorityClassName"],
        serde_json::to_value(&pod.priority_class_name).expect("priorityClassName")
    );

    // Every template is there for every kind the plain manifests hold (the namespace is
    // Helm's --create-namespace).
    let templates: BTreeMap<String, String> =
        std::fs::read_dir(deploy_dir().join("helm/l3lb/templates"))
            .expect("templates")
            .map(|e| {
                let p = e.expect("entry").path();
                let text = std::fs::read_to_string(&p).expect("template text");
                (
                    p.file_name().expect("name").to_string_lossy().into_owned(),
                    text,
                )
            })
            .collect();
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ] {
        assert!(
            templates
                .values()
                .any(|t| t.contains(&format!("kind: {kind}\n"))),
            "a template of kind {kind}"
        );
    }
}
