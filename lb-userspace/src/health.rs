//! Active health checks: each backend of a service with a `health_check` (standalone
//! mode), or each target node of an `externalTrafficPolicy: Local` Service (Kubernetes
//! mode, its `healthCheckNodePort`), is probed from the balancer at its own address and
//! the check's port (not through the tunnel to the VIP). `fall` consecutive failures take
//! it out of new-connection selection (weight 0: its established connections stay and
//! drain); `rise` consecutive successes bring it back. A backend counts as up until checks
//! say otherwise, so a starting or restarting balancer forwards at once.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
    task::JoinHandle,
};

use crate::config::{CheckKind, Config, HealthCheck};

/// (service name, backend address): what a check is about.
pub type Key = (String, IpAddr);

/// One backend to probe: which one, how, and where the probe goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// The backend the outcome is about.
    pub key: Key,
    /// How to check it.
    pub check: HealthCheck,
    /// Where the probe connects (the backend's address, the check's port).
    pub addr: SocketAddr,
}

impl Target {
    /// What this target's probes look at (see [`Probed`]).
    pub fn probed(&self) -> Probed {
        Probed {
            addr: self.addr,
            kind: self.check.kind,
            path: self.check.path.clone(),
        }
    }
}

/// What a probe looks at: where it connects and what it asks. A verdict is about this:
/// a check retimed (interval, timeout, rise, fall) keeps it, one that probes elsewhere or
/// otherwise starts afresh, and an outcome counts only for the probe it came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Probed {
    /// Address and port the probe connects to.
    pub addr: SocketAddr,
    /// `tcp` or `http`.
    pub kind: CheckKind,
    /// The path an `http` probe asks for.
    pub path: String,
}

/// The probe targets of a standalone config: every backend of a service with a check.
pub fn targets(config: &Config) -> Vec<Target> {
    let mut out = Vec::new();
    for svc in &config.services {
        let (Some(check), Some(port)) = (&svc.health_check, svc.health_port()) else {
            continue;
        };
        for b in &svc.backends {
            out.push(Target {
                key: (svc.name.clone(), b.address),
                check: check.clone(),
                addr: SocketAddr::new(b.address, port),
            });
        }
    }
    out
}

/// One check result, sent by a probe task to the agent.
#[derive(Debug)]
pub struct Outcome {
    /// The backend checked.
    pub key: Key,
    /// What the probe looked at: an outcome that arrives after the backend's check was
    /// changed to probe something else (queued while a reload ran) does not count.
    pub probed: Probed,
    /// `Err` with the reason when the check failed.
    pub result: Result<(), String>,
}

/// A backend changing state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The backend.
    pub key: Key,
    /// Its new state.
    pub up: bool,
    /// Consecutive results that made the change.
    pub streak: u32,
    /// The last failure's reason (when going down).
    pub reason: Option<String>,
}

#[derive(Debug, Clone)]
struct State {
    /// The check as configured now (its `rise` and `fall` decide).
    check: HealthCheck,
    probed: Probed,
    up: bool,
    successes: u32,
    failures: u32,
}

/// Health of every checked backend, fed with check outcomes.
#[derive(Debug, Default, Clone)]
pub struct Tracker {
    states: HashMap<Key, State>,
}

impl Tracker {
    /// Follows `config`: backends no longer checked are forgotten, new ones start up,
    /// and those whose check is unchanged keep their state.
    pub fn follow(&mut self, config: &Config) {
        self.follow_targets(&targets(config));
    }

    /// Follows a list of targets (see [`Tracker::follow`]). A target that probes something
    /// else than before (address, port, kind, path) starts afresh; one that probes the same
    /// keeps its streaks and verdict, whether or not its timing changed, so neither
    /// re-applying after an unrelated change nor retuning a check turns a failing backend
    /// healthy.
    pub fn follow_targets(&mut self, targets: &[Target]) {
        let wanted: HashMap<Key, (&HealthCheck, Probed)> = targets
            .iter()
            .map(|t| (t.key.clone(), (&t.check, t.probed())))
            .collect();
        self.states
            .retain(|k, s| wanted.get(k).is_some_and(|(_, p)| *p == s.probed));
        for (k, (check, probed)) in wanted {
            let state = self.states.entry(k).or_insert(State {
                check: check.clone(),
                probed,
                up: true,
                successes: 0,
                failures: 0,
            });
            state.check = check.clone();
        }
    }

    /// Records one outcome; returns the transition it caused, if any.
    pub fn record(&mut self, outcome: Outcome) -> Option<Transition> {
        let state = self.states.get_mut(&outcome.key)?;
        if outcome.probed != state.probed {
            return None;
        }
        match outcome.result {
            Ok(()) => {
                state.failures = 0;
                state.successes = state.successes.saturating_add(1);
                if !state.up && state.successes >= state.check.rise {
                    state.up = true;
                    return Some(Transition {
                        key: outcome.key,
                        up: true,
                        streak: state.successes,
                        reason: None,
                    });
                }
            }
            Err(reason) => {
                state.successes = 0;
                state.failures = state.failures.saturating_add(1);
                if state.up && state.failures >= state.check.fall {
                    state.up = false;
                    return Some(Transition {
                        key: outcome.key,
                        up: false,
                        streak: state.failures,
                        reason: Some(reason),
                    });
                }
            }
        }
        None
    }

    /// The backends currently failing their checks.
    pub fn down(&self) -> HashSet<Key> {
        self.states
            .iter()
            .filter(|(_, s)| !s.up)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The checked backends.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.states.keys()
    }

    /// Whether `key` is checked, and then whether it is up.
    pub fn state(&self, key: &Key) -> Option<bool> {
        self.states.get(key).map(|s| s.up)
    }
}

/// The running probe tasks, one per target; dropping this stops them.
#[derive(Debug, Default)]
pub struct Probes {
    tasks: HashMap<Target, JoinHandle<()>>,
}

impl Drop for Probes {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
    }
}

impl Probes {
    /// Probes exactly `targets`, sending outcomes to `tx`: tasks of targets no longer
    /// wanted stop, new targets get a task, unchanged ones keep theirs (and their rhythm).
    /// Must run inside a tokio runtime.
    pub fn follow(&mut self, targets: &[Target], tx: &mpsc::Sender<Outcome>) {
        let wanted: HashSet<&Target> = targets.iter().collect();
        self.tasks.retain(|t, task| {
            let keep = wanted.contains(t);
            if !keep {
                task.abort();
            }
            keep
        });
        for (n, target) in targets.iter().enumerate() {
            if self.tasks.contains_key(target) {
                continue;
            }
            // Spread the probes over the interval instead of a burst.
            let offset = target
                .check
                .interval
                .mul_f64((n as f64 * 0.618_034).fract());
            let task = tokio::spawn(run_probe(target.clone(), offset, tx.clone()));
            self.tasks.insert(target.clone(), task);
        }
    }
}

/// Probes `target` every interval (after `offset`) until the receiver is gone.
async fn run_probe(target: Target, offset: Duration, tx: mpsc::Sender<Outcome>) {
    tokio::time::sleep(offset).await;
    let mut tick = tokio::time::interval(target.check.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = probe(&target.check, target.addr).await;
        let outcome = Outcome {
            key: target.key.clone(),
            probed: target.probed(),
            result,
        };
        if tx.send(outcome).await.is_err() {
            return;
        }
    }
}

/// One check of `target`, bounded by the check's timeout.
pub async fn probe(check: &HealthCheck, target: SocketAddr) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, probe_inner(check, target)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

async fn probe_inner(check: &HealthCheck, target: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect(target)
        .await
        .map_err(|e| format!("connecting to {target}: {e}"))?;
    if check.kind == CheckKind::Tcp {
        return Ok(());
    }
    let host = match target.ip() {
        IpAddr::V4(a) => format!("{a}:{}", target.port()),
        IpAddr::V6(a) => format!("[{a}]:{}", target.port()),
    };
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: l3lb-health-check\r\nConnection: close\r\n\r\n",
        check.path
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("sending the request to {target}: {e}"))?;
    // The status line is all that is needed; read until it is complete.
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 1024 {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the answer from {target}: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let line = line.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    let status = match (words.next(), words.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code.parse::<u16>().ok(),
        _ => None,
    };
    match status {
        Some(200..=399) => Ok(()),
        Some(code) => Err(format!("GET {} answered {code}", check.path)),
        None => Err(format!("not an HTTP answer: {line:?}")),
    }
}

/// How long after a backend stops answering it leaves new-connection selection, at most.
pub fn detection_time(check: &HealthCheck) -> Duration {
    (check.interval * check.fall).saturating_add(check.timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(kind: CheckKind, path: &str) -> HealthCheck {
        HealthCheck {
            kind,
            port: None,
            path: path.into(),
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
        }
    }

    fn outcome(ok: bool) -> Outcome {
        outcome_of(80, ok)
    }

    /// An outcome of a tcp probe of web's backend 10.0.0.1 at `port`.
    fn outcome_of(port: u16, ok: bool) -> Outcome {
        let addr: IpAddr = "10.0.0.1".parse().expect("addr");
        Outcome {
            key: ("web".into(), addr),
            probed: Probed {
                addr: SocketAddr::new(addr, port),
                kind: CheckKind::Tcp,
                path: "/".into(),
            },
            result: if ok { Ok(()) } else { Err("refused".into()) },
        }
    }

    fn tracker() -> Tracker {
        let config = Config::parse(
            "interface: eth0\nservices:\n  - name: web\n    vip: 192.0.2.1\n    ports: [80]\n    \
             health_check: {type: tcp, interval: 100ms, timeout: 50ms, rise: 2, fall: 3}\n    \
             backends:\n      - address: 10.0.0.1\n",
        )
        .expect("config");
        let mut t = Tracker::default();
        t.follow(&config);
        t
    }

    #[test]
    fn fall_failures_take_a_backend_down_and_rise_successes_bring_it_back() {
        let mut t = tracker();
        let key = ("web".to_string(), "10.0.0.1".parse().expect("addr"));
        assert_eq!(t.state(&key), Some(true), "up until checks say otherwise");
        assert_eq!(t.record(outcome(false)), None);
        assert_eq!(t.record(outcome(false)), None);
        // A success in between restarts the count.
        assert_eq!(t.record(outcome(true)), None);
        assert_eq!(t.record(outcome(false)), None);
        assert_eq!(t.record(outcome(false)), None);
        let down = t.record(outcome(false)).expect("third failure in a row");
        assert!(!down.up);
        assert_eq!(down.streak, 3);
        assert_eq!(down.reason.as_deref(), Some("refused"));
        assert!(t.down().contains(&key));
        assert_eq!(t.record(outcome(true)), None);
        let up = t.record(outcome(true)).expect("second success");
        assert!(up.up);
        assert!(t.down().is_empty());
    }

    #[test]
    fn a_changed_check_starts_afresh_and_an_unchecked_backend_is_forgotten() {
        let mut t = tracker();
        for _ in 0..3 {
            t.record(outcome(false));
        }
        assert_eq!(t.down().len(), 1);
        let unchecked = Config::parse(
            "interface: eth0\nservices:\n  - name: web\n    vip: 192.0.2.1\n    ports: [80]\n    \
             backends:\n      - address: 10.0.0.1\n",
        )
        .expect("config");
        t.follow(&unchecked);
        assert!(t.down().is_empty());
        assert_eq!(t.record(outcome(false)), None, "no longer tracked");
    }

    /// web's config with a tcp check of `check_fields` (after `type: tcp`).
    fn checked(check_fields: &str) -> Config {
        Config::parse(&format!(
            "interface: eth0\nservices:\n  - name: web\n    vip: 192.0.2.1\n    ports: [80]\n    \
             health_check: {{type: tcp{check_fields}}}\n    backends:\n      - address: 10.0.0.1\n",
        ))
        .expect("config")
    }

    #[test]
    fn a_retimed_check_keeps_its_verdict_and_a_replaced_ones_outcomes_do_not_count() {
        let mut t = tracker();
        let key = ("web".to_string(), "10.0.0.1".parse().expect("addr"));
        for _ in 0..3 {
            t.record(outcome(false));
        }
        assert_eq!(t.state(&key), Some(false));
        // Only the timing changes: still down, and the new `rise` decides.
        t.follow(&checked(", interval: 1s, timeout: 500ms, rise: 1, fall: 5"));
        assert_eq!(t.state(&key), Some(false), "retimed: still down");
        assert!(t.record(outcome(true)).is_some_and(|tr| tr.up), "rise 1");
        // The check moves to port 81: afresh, and a result of the port-80 probe (queued
        // while the reload ran) does not count against it.
        t.follow(&checked(", port: 81, fall: 1"));
        assert_eq!(
            t.record(outcome_of(80, false)),
            None,
            "the old probe's result"
        );
        assert_eq!(t.state(&key), Some(true));
        assert!(t.record(outcome_of(81, false)).is_some_and(|tr| !tr.up));
    }

    #[test]
    fn following_unchanged_targets_keeps_a_failing_backend_down() {
        let node = |port: u16| Target {
            key: ("shop/web/v4".to_string(), "10.0.0.1".parse().expect("addr")),
            check: HealthCheck {
                port: Some(port),
                ..check(CheckKind::Http, "/healthz")
            },
            addr: SocketAddr::new("10.0.0.1".parse().expect("addr"), port),
        };
        let outcome = |ok: bool| Outcome {
            key: node(32000).key,
            probed: node(32000).probed(),
            result: if ok { Ok(()) } else { Err("503".into()) },
        };
        let mut t = Tracker::default();
        t.follow_targets(&[node(32000)]);
        for _ in 0..3 {
            t.record(outcome(false));
        }
        assert_eq!(t.state(&node(32000).key), Some(false));
        // An API change that leaves this node's probe as it was (a re-apply).
        t.follow_targets(&[node(32000)]);
        assert_eq!(t.state(&node(32000).key), Some(false), "still down");
        assert_eq!(
            t.record(outcome(true)),
            None,
            "the success streak counts on"
        );
        // A new healthCheckNodePort is a new probe: it starts up.
        t.follow_targets(&[node(32001)]);
        assert_eq!(t.state(&node(32000).key), Some(true));
        t.follow_targets(&[]);
        assert_eq!(t.state(&node(32000).key), None);
    }

    async fn serve_http_once(status: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                let body = if request.starts_with("GET /healthz HTTP/1.1\r\n") {
                    status
                } else {
                    "400 Bad Request"
                };
                let _ = s
                    .write_all(format!("HTTP/1.1 {body}\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn http_checks_want_a_2xx_or_3xx_status_for_the_path() {
        let ok = serve_http_once("200 OK").await;
        assert_eq!(probe(&check(CheckKind::Http, "/healthz"), ok).await, Ok(()));
        let bad = serve_http_once("503 Service Unavailable").await;
        let err = probe(&check(CheckKind::Http, "/healthz"), bad)
            .await
            .expect_err("503 fails");
        assert!(err.contains("503"), "{err}");
    }

    #[tokio::test]
    async fn tcp_checks_want_an_accepted_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        assert_eq!(probe(&check(CheckKind::Tcp, "/"), addr).await, Ok(()));
        drop(listener);
        let err = probe(&check(CheckKind::Tcp, "/"), addr)
            .await
            .expect_err("refused");
        assert!(err.contains("connecting"), "{err}");
    }

    #[tokio::test]
    async fn a_silent_backend_fails_within_the_timeout() {
        // A listener that never accepts still completes the handshake (backlog), so use
        // an HTTP check against it: no answer arrives.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let started = std::time::Instant::now();
        let err = probe(&check(CheckKind::Http, "/"), addr)
            .await
            .expect_err("silent");
        assert!(err.contains("no answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
        drop(listener);
    }
}
