//! The Kubernetes side of `l3lb run --kubernetes`: watches of Services, EndpointSlices
//! and Nodes feed a debounced rebuild; each rebuild's desired state goes to the agent
//! loop, which applies it like a config reload.
//!
//! Convergence: kube-runtime's watcher speaks list/watch (a watch that ends is resumed from
//! its last resourceVersion). Any error — `410 Gone`, a refused connection, a broken
//! stream — drops that kind's watch and relists it after a backoff; the kind's cache is
//! replaced whole when the list completes, so objects deleted meanwhile disappear and a
//! rebuild never sees half a list. Nothing is applied before all three kinds have been
//! listed once, and while the API server is unreachable nothing is applied at all: the
//! maps keep the last known state, and `/readyz` says why it is not ready until every
//! failed kind has been listed again.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    hash::BuildHasher as _,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Context as _;
use futures::{StreamExt as _, stream::BoxStream};
use hyper::StatusCode;
use k8s_openapi::{
    api::{
        core::v1::{Node, ObjectReference, Service},
        discovery::v1::EndpointSlice,
        events::v1::Event as K8sEvent,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{Api, Client, Resource, api::PostParams, runtime::watcher};
use serde::de::DeserializeOwned;
use thiserror::Error;
use tokio::{sync::watch as latest, time::Instant};
use tracing::{debug, info, warn};

use super::translate::{Settings, Warning, translate};
use crate::{
    agent::{self, Agent, KubernetesState},
    config::Config,
    http::{self, Reply},
    sys,
};

/// The field manager / reporting controller name l3lb writes Events as.
pub const CONTROLLER: &str = "l3lb.io/agent";

/// Errors setting up the Kubernetes connection.
#[derive(Debug, Error)]
pub enum KubeError {
    /// The kubeconfig could not be read.
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: kube::config::KubeconfigError,
    },
    /// Neither a kubeconfig nor in-cluster credentials were usable.
    #[error("no Kubernetes credentials (kubeconfig or in-cluster service account): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    /// The client could not be built (TLS setup, proxy, …).
    #[error("building the Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// A client from `kubeconfig`, or else as kubectl would (`$KUBECONFIG`, `~/.kube/config`,
/// then the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.to_path_buf(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// The watched kinds, in the order readiness reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Services = 0,
    EndpointSlices = 1,
    Nodes = 2,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Services => "services",
            Kind::EndpointSlices => "endpointslices",
            Kind::Nodes => "nodes",
        })
    }
}

const KINDS: [Kind; 3] = [Kind::Services, Kind::EndpointSlices, Kind::Nodes];

/// What a watcher event means for the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Progress {
    /// An object was added, changed or deleted in the cache.
    Changed,
    /// A (re)list finished: the cache was replaced as a whole.
    Synced,
    /// A relist is under way; the cache is unchanged until it finishes.
    Listing,
}

/// Per kind: listed at least once, and whether its watch currently works.
#[derive(Debug, Clone, Default)]
struct KindState {
    synced: bool,
    error: Option<String>,
}

#[derive(Debug, Default)]
struct ReadinessState {
    kinds: [KindState; 3],
    /// A rebuild has been handed to the agent loop.
    sent: bool,
    /// The outcome of the last apply: `None` before the first.
    applied: Option<Result<(), String>>,
}

/// Whether the agent follows the API server: shared between the watch loop and `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<Mutex<ReadinessState>>);

impl Readiness {
    /// A fresh state: not ready until every kind is listed and the first state applied.
    pub fn new() -> Self {
        Self::default()
    }

    /// Per resource kind, whether its watch is established (listed, no error since).
    pub fn watches(&self) -> std::collections::BTreeMap<String, bool> {
        let state = match self.0.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        KINDS
            .iter()
            .map(|&kind| {
                let k = &state.kinds[kind as usize];
                (kind.to_string(), k.synced && k.error.is_none())
            })
            .collect()
    }

    /// `Ok` when ready, else every reason it is not.
    pub fn check(&self) -> Result<(), String> {
        let state = match self.0.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut reasons = Vec::new();
        for kind in KINDS {
            let k = &state.kinds[kind as usize];
            if let Some(e) = &k.error {
                reasons.push(format!("{kind}: {e}"));
            } else if !k.synced {
                reasons.push(format!("{kind}: not listed yet"));
            }
        }
        match &state.applied {
            Some(Ok(())) => {}
            Some(Err(e)) => reasons.push(format!("applying the state to the maps failed: {e}")),
            None if reasons.is_empty() => reasons.push(if state.sent {
                "first state not applied yet".to_string()
            } else {
                "first state not built yet".to_string()
            }),
            None => {}
        }
        if reasons.is_empty() {
            Ok(())
        } else {
            Err(reasons.join("; "))
        }
    }

    /// Records the outcome of an apply (the agent loop calls this).
    pub fn record_apply(&self, result: Result<(), String>) {
        self.update(|s| s.applied = Some(result));
    }

    fn update(&self, f: impl FnOnce(&mut ReadinessState)) {
        match self.0.lock() {
            Ok(mut s) => f(&mut s),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    fn all_synced(&self) -> bool {
        let mut all = false;
        self.update(|s| all = s.kinds.iter().all(|k| k.synced));
        all
    }
}

/// Longest wait between two attempts to reach the API server.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One kind's watch and its cache of objects by `namespace/name`.
///
/// kube-runtime's watcher does the list/watch protocol (resume from the last
/// resourceVersion when a watch ends, bookmarks, pagination); this wrapper owns what
/// happens on an error: the stream is dropped and, after a backoff, a fresh watcher
/// relists. A resumed watch gives no sign that it started, so relisting is what lets
/// readiness say "in sync again" — and it guarantees that nothing deleted during an
/// outage survives it. The cache is replaced whole when a list completes, so a rebuild
/// never sees half a list.
struct Watch<K: Resource + 'static> {
    kind: Kind,
    api: Api<K>,
    stream: Option<BoxStream<'static, Result<watcher::Event<K>, watcher::Error>>>,
    cache: BTreeMap<String, K>,
    /// Objects of a list in progress.
    listing: Option<BTreeMap<String, K>>,
    failures: u32,
    retry_at: Option<Instant>,
}

fn object_key<K: Resource>(o: &K) -> String {
    let m = o.meta();
    format!(
        "{}/{}",
        m.namespace.as_deref().unwrap_or(""),
        m.name.as_deref().unwrap_or("")
    )
}

impl<K> Watch<K>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    fn new(kind: Kind, api: Api<K>) -> Self {
        let mut w = Self {
            kind,
            api,
            stream: None,
            cache: BTreeMap::new(),
            listing: None,
            failures: 0,
            retry_at: None,
        };
        w.restart();
        w
    }

    fn restart(&mut self) {
        self.retry_at = None;
        self.listing = None;
        self.stream = Some(watcher(self.api.clone(), watcher::Config::default()).boxed());
    }

    /// The next watcher item; pending forever while waiting to retry.
    async fn next(&mut self) -> Result<watcher::Event<K>, String> {
        match &mut self.stream {
            Some(stream) => match stream.next().await {
                Some(item) => item.map_err(|e| e.to_string()),
                None => Err("watch stream ended".to_string()),
            },
            None => std::future::pending().await,
        }
    }

    /// Folds one item into the cache.
    fn handle(&mut self, item: Result<watcher::Event<K>, String>) -> Result<Progress, String> {
        // Managed fields and annotations (last-applied-configuration) are most of an
        // object's size and none of l3lb's business.
        fn slim<K: Resource>(mut o: K) -> K {
            o.meta_mut().managed_fields = None;
            o.meta_mut().annotations = None;
            o
        }
        match item {
            Ok(watcher::Event::Apply(o)) => {
                self.cache.insert(object_key(&o), slim(o));
                Ok(Progress::Changed)
            }
            Ok(watcher::Event::Delete(o)) => {
                self.cache.remove(&object_key(&o));
                Ok(Progress::Changed)
            }
            Ok(watcher::Event::Init) => {
                self.listing = Some(BTreeMap::new());
                Ok(Progress::Listing)
            }
            Ok(watcher::Event::InitApply(o)) => {
                self.listing
                    .get_or_insert_with(BTreeMap::new)
                    .insert(object_key(&o), slim(o));
                Ok(Progress::Listing)
            }
            Ok(watcher::Event::InitDone) => {
                self.cache = self.listing.take().unwrap_or_default();
                self.failures = 0;
                Ok(Progress::Synced)
            }
            Err(e) => {
                self.stream = None;
                self.listing = None;
                self.failures += 1;
                let delay = backoff(self.failures);
                debug!(kind = %self.kind, ?delay, "relisting after a watch error");
                self.retry_at = Some(Instant::now() + delay);
                Err(e)
            }
        }
    }

    fn restart_if_due(&mut self, now: Instant) {
        if self.retry_at.is_some_and(|t| t <= now) {
            self.restart();
        }
    }

    fn objects(&self) -> Vec<K> {
        self.cache.values().cloned().collect()
    }
}

/// Exponential backoff, 0.5 s doubling to 30 s, with up to a quarter of jitter so the
/// agents of a whole cluster do not return to a recovering API server in step.
fn backoff(failures: u32) -> Duration {
    let base = Duration::from_millis(500)
        .saturating_mul(1u32 << failures.saturating_sub(1).min(8))
        .min(MAX_BACKOFF);
    let noise = std::collections::hash_map::RandomState::new().hash_one(failures) % 1000;
    base + base / 4 * u32::try_from(noise).unwrap_or(0) / 1000
}

/// Creates an Event (events.k8s.io/v1) on the Service a warning is about: the one write
/// l3lb does, needing RBAC `create` on `events` in that group.
async fn publish(client: Client, warning: Warning, node_name: String) {
    let (namespace, name) = warning
        .service
        .split_once('/')
        .map(|(n, s)| (n.to_string(), s.to_string()))
        .unwrap_or_else(|| ("default".to_string(), warning.service.clone()));
    let now = k8s_openapi::jiff::Timestamp::now();
    let event = K8sEvent {
        metadata: ObjectMeta {
            namespace: Some(namespace.clone()),
            name: Some(format!("{name}.{:x}", now.as_nanosecond())),
            ..Default::default()
        },
        action: Some("Balance".to_string()),
        reason: Some(warning.reason.to_string()),
        note: Some(warning.message.clone()),
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".to_string()),
        reporting_controller: Some(CONTROLLER.to_string()),
        reporting_instance: Some(format!("{CONTROLLER}/{node_name}")),
        regarding: Some(ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("Service".to_string()),
            name: Some(name),
            namespace: Some(namespace.clone()),
            uid: Some(warning.uid.clone()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let api: Api<K8sEvent> = Api::namespaced(client, &namespace);
    match api.create(&PostParams::default(), &event).await {
        Ok(_) => debug!(service = %warning.service, reason = warning.reason, "event created"),
        Err(e) => {
            warn!(service = %warning.service, "creating an Event: {e} (RBAC: create on events.k8s.io events)")
        }
    }
}

/// Remembers which warnings were logged (and which Services got an Event), so each is
/// said once rather than on every rebuild.
#[derive(Default)]
struct WarningLog {
    logged: HashSet<(String, &'static str, String)>,
    evented: HashSet<(String, &'static str)>,
}

impl WarningLog {
    fn report(&mut self, warnings: &[Warning], client: &Client, node_name: &str) {
        let current: HashSet<(String, &'static str, String)> = warnings
            .iter()
            .map(|w| (w.uid.clone(), w.reason, w.message.clone()))
            .collect();
        for w in warnings {
            if self
                .logged
                .contains(&(w.uid.clone(), w.reason, w.message.clone()))
            {
                continue;
            }
            warn!(service = %w.service, reason = w.reason, "{}", w.message);
            // One Event per Service and reason for this agent's lifetime: enough for
            // `kubectl describe` to show it, and no `patch` permission needed for series.
            if self.evented.insert((w.uid.clone(), w.reason)) {
                tokio::spawn(publish(client.clone(), w.clone(), node_name.to_string()));
            }
        }
        // A warning that went away and comes back is logged again.
        self.logged = current;
    }
}

/// Watches the API and sends each debounced rebuild to `out`; runs until the receiver
/// is gone.
async fn watch_loop(
    client: Client,
    settings: Settings,
    debounce: Duration,
    readiness: Readiness,
    out: latest::Sender<Option<KubernetesState>>,
) {
    let mut services = Watch::new(Kind::Services, Api::<Service>::all(client.clone()));
    let mut slices = Watch::new(
        Kind::EndpointSlices,
        Api::<EndpointSlice>::all(client.clone()),
    );
    let mut nodes = Watch::new(Kind::Nodes, Api::<Node>::all(client.clone()));
    let mut warnings = WarningLog::default();
    // The batch closes `debounce` after its first change (not after the last one), so a
    // steady stream of changes is still applied every `debounce`.
    let mut deadline: Option<Instant> = None;
    let far = Duration::from_secs(86400 * 365);
    loop {
        let apply_at = deadline.unwrap_or_else(|| Instant::now() + far);
        let retry_at = [services.retry_at, slices.retry_at, nodes.retry_at]
            .into_iter()
            .flatten()
            .min();
        let (kind, progress) = tokio::select! {
            item = services.next() => (Kind::Services, services.handle(item)),
            item = slices.next() => (Kind::EndpointSlices, slices.handle(item)),
            item = nodes.next() => (Kind::Nodes, nodes.handle(item)),
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(|| Instant::now() + far)), if retry_at.is_some() => {
                let now = Instant::now();
                services.restart_if_due(now);
                slices.restart_if_due(now);
                nodes.restart_if_due(now);
                continue;
            }
            _ = tokio::time::sleep_until(apply_at), if deadline.is_some() => {
                deadline = None;
                if !readiness.all_synced() {
                    // Applying before every kind is listed would withdraw services whose
                    // endpoints or nodes simply have not arrived yet.
                    continue;
                }
                let local: Vec<IpAddr> = match sys::local_address_set() {
                    Ok(set) => set.into_iter().collect(),
                    Err(e) => {
                        warn!("reading local addresses: {e:#}");
                        Vec::new()
                    }
                };
                let t = translate(
                    &services.objects(),
                    &slices.objects(),
                    &nodes.objects(),
                    &local,
                    &settings,
                );
                warnings.report(&t.warnings, &client, &settings.node_name);
                debug!(services = t.desired.services.len(), probes = t.checks.len(), "rebuilt desired state");
                let state = KubernetesState {
                    desired: t.desired,
                    checks: t.checks,
                };
                if out.send(Some(state)).is_err() {
                    return;
                }
                readiness.update(|s| s.sent = true);
                continue;
            }
        };
        match progress {
            Ok(p) => {
                readiness.update(|s| {
                    let k = &mut s.kinds[kind as usize];
                    if p == Progress::Synced {
                        if k.error.take().is_some() {
                            info!(%kind, "relisted; in sync with the API server again");
                        }
                        k.synced = true;
                    }
                });
                if p != Progress::Listing && deadline.is_none() {
                    deadline = Some(Instant::now() + debounce);
                }
            }
            Err(e) => {
                readiness.update(|s| {
                    let k = &mut s.kinds[kind as usize];
                    if k.error.is_none() {
                        warn!(%kind, "watch failed; keeping the last applied state and relisting with backoff: {e}");
                    } else {
                        debug!(%kind, "watch still failing: {e}");
                    }
                    k.error = Some(e);
                });
            }
        }
    }
}

/// How `l3lb run --kubernetes` was asked to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Node settings (interface, pins, sizes, metrics address, `kubernetes:` section).
    pub config: Config,
    /// This node's name (`--node-name` / `NODE_NAME`).
    pub node_name: String,
    /// A kubeconfig to use instead of the usual lookup.
    pub kubeconfig: Option<PathBuf>,
}

/// Runs the Kubernetes agent until SIGTERM or SIGINT.
pub async fn run(opts: Options) -> anyhow::Result<()> {
    let signals = agent::Signals::install()?;
    let k = &opts.config.kubernetes;
    let settings = Settings {
        class: k.load_balancer_class.clone(),
        take_unclassed: k.take_unclassed,
        node_name: opts.node_name.clone(),
        balancer_node_labels: k.balancer_node_labels.clone(),
        node_health_check: k.node_health_check.clone(),
    };
    let debounce = Duration::from_millis(k.debounce_ms);
    let client = client(opts.kubeconfig.as_deref()).await?;
    let agent = Agent::start_kubernetes(opts.config.clone())?;

    let readiness = Readiness::new();
    let probe = readiness.clone();
    let router = agent
        .router()
        .route("/readyz", move || match probe.check() {
            Ok(()) => Reply::text(StatusCode::OK, "ok\n"),
            Err(why) => Reply::text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        });
    let bound = http::serve(opts.config.metrics_address, router).await?;
    // `/metrics` reports each kind's watch state, copied from the readiness tracker.
    let (labels, watched) = (agent.metrics_labels(), readiness.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let watches = watched.watches();
            labels
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .watches = watches;
        }
    });
    info!(
        address = %bound,
        node = %settings.node_name,
        class = %settings.class,
        take_unclassed = settings.take_unclassed,
        "watching the Kubernetes API; /metrics, /healthz and /readyz served"
    );

    // Latest value wins: a rebuild the agent has not applied yet is simply superseded.
    let (tx, rx) = latest::channel(None);
    tokio::spawn(watch_loop(
        client,
        settings,
        debounce,
        readiness.clone(),
        tx,
    ));
    let updates = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            rx.changed().await.ok()?;
            let latest = rx.borrow_and_update().clone();
            if let Some(desired) = latest {
                return Some((desired, rx));
            }
        }
    });
    agent::run_agent(agent, signals, Box::pin(updates), |r| {
        readiness.record_apply(r)
    })
    .await
    .context("running the agent")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "resourceVersion": "1"}
        }))
        .expect("a Node")
    }

    fn names(w: &Watch<Node>) -> Vec<String> {
        w.objects()
            .iter()
            .filter_map(|n| n.metadata.name.clone())
            .collect()
    }

    #[tokio::test]
    async fn a_relist_replaces_the_cache_whole_and_only_when_complete() {
        let config = kube::Config::new("http://127.0.0.1:9".parse().expect("url"));
        let client = Client::try_from(config).expect("client");
        let mut w = Watch::new(Kind::Nodes, Api::<Node>::all(client));
        assert_eq!(w.handle(Ok(watcher::Event::Init)), Ok(Progress::Listing));
        assert!(w.handle(Ok(watcher::Event::InitApply(node("a")))).is_ok());
        assert!(w.handle(Ok(watcher::Event::InitApply(node("b")))).is_ok());
        assert!(
            names(&w).is_empty(),
            "nothing visible before the list completes"
        );
        assert_eq!(w.handle(Ok(watcher::Event::InitDone)), Ok(Progress::Synced));
        assert_eq!(names(&w), ["a", "b"]);
        assert_eq!(
            w.handle(Ok(watcher::Event::Delete(node("a")))),
            Ok(Progress::Changed)
        );
        assert_eq!(names(&w), ["b"]);

        // An error drops the watch and schedules a relist; the cache stays as it was
        // (forwarding keeps the last known state) until the relist completes.
        assert!(w.handle(Err("410 Gone".into())).is_err());
        assert!(w.stream.is_none() && w.retry_at.is_some());
        assert_eq!(names(&w), ["b"]);
        w.restart_if_due(Instant::now() + MAX_BACKOFF * 2);
        assert!(w.stream.is_some() && w.retry_at.is_none());
        assert!(w.handle(Ok(watcher::Event::Init)).is_ok());
        assert!(w.handle(Ok(watcher::Event::InitApply(node("c")))).is_ok());
        assert_eq!(names(&w), ["b"]);
        assert!(w.handle(Ok(watcher::Event::InitDone)).is_ok());
        assert_eq!(names(&w), ["c"], "b was deleted while the watch was down");
    }

    #[test]
    fn backoff_doubles_to_thirty_seconds_with_bounded_jitter() {
        let first = backoff(1);
        assert!(first >= Duration::from_millis(500) && first <= Duration::from_millis(625));
        let fourth = backoff(4);
        assert!(fourth >= Duration::from_secs(4) && fourth <= Duration::from_secs(5));
        for n in 7..40 {
            let d = backoff(n);
            assert!(
                d >= MAX_BACKOFF && d <= MAX_BACKOFF + MAX_BACKOFF / 4,
                "{n}: {d:?}"
            );
        }
    }

    #[test]
    fn ready_only_when_listed_connected_and_applied() {
        let r = Readiness::new();
        assert!(r.check().unwrap_err().contains("not listed yet"));
        r.update(|s| s.kinds.iter_mut().for_each(|k| k.synced = true));
        assert!(r.all_synced());
        assert!(r.check().unwrap_err().contains("not built yet"));
        r.record_apply(Ok(()));
        assert_eq!(r.check(), Ok(()));
        r.update(|s| s.kinds[Kind::Nodes as usize].error = Some("connection refused".into()));
        assert_eq!(r.check(), Err("nodes: connection refused".to_string()));
        r.update(|s| s.kinds[Kind::Nodes as usize].error = None);
        r.record_apply(Err("service table is full".into()));
        assert!(r.check().unwrap_err().contains("service table is full"));
    }
}
