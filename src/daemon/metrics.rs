//! Prometheus metrics of the hub, served on a loopback address by default.
//! Names use base units and `_total` for counters; labels are low
//! cardinality (cluster, direction, reason; never a session id).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::wire::DialCode;

/// RTT histogram bucket bounds, seconds.
pub const RTT_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// A cumulative histogram (counts per bucket, sum, count).
#[derive(Debug, Default, Clone)]
pub struct Histogram {
    pub buckets: [u64; RTT_BUCKETS.len()],
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&mut self, v: f64) {
        for (i, b) in RTT_BUCKETS.iter().enumerate() {
            if v <= *b {
                self.buckets[i] += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }
}

/// Why the gateway could not reach a member: the `reason` label of
/// `towerctl_dial_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialFailure {
    NotConnected,
    UnknownCluster,
    ChannelRefused,
    AgentError,
    /// The agent's dial policy refused the target.
    Denied,
    /// The target could not be resolved or dialed in the member.
    TargetFailed,
    /// The hub's access rules do not let the operator reach the member
    /// (answered as an unknown member, counted apart for the admin).
    Forbidden,
}

impl DialFailure {
    pub const ALL: [DialFailure; 7] = [
        DialFailure::NotConnected,
        DialFailure::UnknownCluster,
        DialFailure::ChannelRefused,
        DialFailure::AgentError,
        DialFailure::Denied,
        DialFailure::TargetFailed,
        DialFailure::Forbidden,
    ];

    pub fn label(self) -> &'static str {
        match self {
            DialFailure::NotConnected => "not_connected",
            DialFailure::UnknownCluster => "unknown_cluster",
            DialFailure::ChannelRefused => "channel_refused",
            DialFailure::AgentError => "agent_error",
            DialFailure::Denied => "denied",
            DialFailure::TargetFailed => "target_failed",
            DialFailure::Forbidden => "forbidden",
        }
    }
}

impl From<DialCode> for DialFailure {
    fn from(c: DialCode) -> DialFailure {
        match c {
            DialCode::Denied => DialFailure::Denied,
            _ => DialFailure::TargetFailed,
        }
    }
}

/// Counters of [`DialFailure`]s.
#[derive(Default)]
pub struct DialFailures([AtomicU64; DialFailure::ALL.len()]);

impl DialFailures {
    pub fn add(&self, why: DialFailure) {
        self.0[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, why: DialFailure) -> u64 {
        self.0[why as usize].load(Ordering::Relaxed)
    }
}

/// Per-member figures for the metrics page.
#[derive(Debug, Clone, Default)]
pub struct MemberStats {
    pub name: String,
    pub connected: bool,
    /// Its tunnel is up on this hub (`connected` implies it) or on another
    /// hub of the group: what operators reach through this hub.
    pub reachable: bool,
    pub rtt: Histogram,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub streams: u64,
    /// The windows the open streams asked the agent for, in bytes.
    pub windows: u64,
    /// Channels opened since the hub started (a counter).
    pub opened: u64,
    pub reconnects: u64,
}

/// Everything the metrics page shows, taken at once: rendering is a pure
/// function of it, testable without a running hub.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub members: Vec<MemberStats>,
    /// Counts by [`DialFailure`], in [`DialFailure::ALL`]'s order.
    pub dial_failures: Vec<(DialFailure, u64)>,
    pub audit_dropped: u64,
    /// Unauthenticated connections held, by listener.
    pub unauthenticated: Vec<(&'static str, u64)>,
    /// With a shared registry (etcd): its health as this hub sees it.
    pub registry: Option<RegistryHealth>,
}

/// A shared registry's health, as one hub sees it.
#[derive(Debug, Clone, Default)]
pub struct RegistryHealth {
    /// How long ago this hub's copy of the registry was last confirmed
    /// current (what `--store-max-stale` is held against).
    pub age_seconds: f64,
    /// `--store-max-stale`, when set.
    pub max_stale_seconds: Option<f64>,
    /// Whether it refuses operators now for want of a current registry.
    pub refusing_operators: bool,
    /// etcd calls failed so far, by kind.
    pub failures: Vec<(&'static str, u64)>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One metric with a line per member, labelled by cluster.
fn per_cluster(
    o: &mut String,
    stats: &[MemberStats],
    name: &str,
    kind: &str,
    help: &str,
    value: impl Fn(&MemberStats) -> u64,
) {
    let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for c in stats {
        let _ = writeln!(o, "{name}{{cluster=\"{}\"}} {}", esc(&c.name), value(c));
    }
}

/// The metrics page.
pub fn render(snap: &Snapshot) -> String {
    let mut o = String::new();
    let stats = &snap.members;
    let connected = stats.iter().filter(|c| c.connected).count();
    let _ = writeln!(o, "# HELP towerctl_members Registered member clusters.\n# TYPE towerctl_members gauge\ntowerctl_members {}", stats.len());
    let _ = writeln!(o, "# HELP towerctl_agents_connected Members with a live tunnel.\n# TYPE towerctl_agents_connected gauge\ntowerctl_agents_connected {connected}");
    let _ = writeln!(o, "# HELP towerctl_tunnel_up Whether the member's tunnel is up.\n# TYPE towerctl_tunnel_up gauge");
    for c in stats {
        let _ = writeln!(
            o,
            "towerctl_tunnel_up{{cluster=\"{}\"}} {}",
            esc(&c.name),
            u8::from(c.connected)
        );
    }
    // With several hubs, `towerctl_tunnel_up` is 0 on every hub but the one
    // holding the member: an alert on it alone fired from all the others.
    let _ = writeln!(o, "# HELP towerctl_member_reachable Whether the member's tunnel is up on this hub or on another hub of its group (reachable through this hub).\n# TYPE towerctl_member_reachable gauge");
    for c in stats {
        let _ = writeln!(
            o,
            "towerctl_member_reachable{{cluster=\"{}\"}} {}",
            esc(&c.name),
            u8::from(c.reachable)
        );
    }
    let _ = writeln!(o, "# HELP towerctl_tunnel_rtt_seconds Round-trip time of tunnel keepalives.\n# TYPE towerctl_tunnel_rtt_seconds histogram");
    for c in stats {
        let n = esc(&c.name);
        for (i, b) in RTT_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                o,
                "towerctl_tunnel_rtt_seconds_bucket{{cluster=\"{n}\",le=\"{b}\"}} {}",
                c.rtt.buckets[i]
            );
        }
        let _ = writeln!(
            o,
            "towerctl_tunnel_rtt_seconds_bucket{{cluster=\"{n}\",le=\"+Inf\"}} {}",
            c.rtt.count
        );
        let _ = writeln!(
            o,
            "towerctl_tunnel_rtt_seconds_sum{{cluster=\"{n}\"}} {}",
            c.rtt.sum
        );
        let _ = writeln!(
            o,
            "towerctl_tunnel_rtt_seconds_count{{cluster=\"{n}\"}} {}",
            c.rtt.count
        );
    }
    let _ = writeln!(o, "# HELP towerctl_tunnel_bytes_total Bytes carried through the tunnel, by direction (in: from the member).\n# TYPE towerctl_tunnel_bytes_total counter");
    for c in stats {
        let n = esc(&c.name);
        let _ = writeln!(
            o,
            "towerctl_tunnel_bytes_total{{cluster=\"{n}\",direction=\"in\"}} {}",
            c.bytes_in
        );
        let _ = writeln!(
            o,
            "towerctl_tunnel_bytes_total{{cluster=\"{n}\",direction=\"out\"}} {}",
            c.bytes_out
        );
    }
    per_cluster(
        &mut o,
        stats,
        "towerctl_tunnel_streams",
        "gauge",
        "Open tunnel channels (upstream connections).",
        |c| c.streams,
    );
    per_cluster(
        &mut o,
        stats,
        "towerctl_tunnel_stream_windows_bytes",
        "gauge",
        "What the open channels may have in flight towards the hub together (their windows): the most the hub buffers for them if their clients stop reading. Held to 128 MiB per member and half of that per operator, past which new channels get 32 KiB.",
        |c| c.windows,
    );
    per_cluster(&mut o, stats, "towerctl_tunnel_streams_opened_total", "counter", "Tunnel channels opened since the hub started: API requests on a new channel, CONNECTs and port-forwarded connections.", |c| c.opened);
    per_cluster(
        &mut o,
        stats,
        "towerctl_agent_reconnects_total",
        "counter",
        "Agent sessions after the first since the hub started.",
        |c| c.reconnects,
    );
    let _ = writeln!(o, "# HELP towerctl_dial_failures_total Gateway requests that could not reach their member, by reason.\n# TYPE towerctl_dial_failures_total counter");
    for (reason, v) in &snap.dial_failures {
        let _ = writeln!(
            o,
            "towerctl_dial_failures_total{{reason=\"{}\"}} {v}",
            reason.label()
        );
    }
    let _ = writeln!(o, "# HELP towerctl_unauthenticated_connections Connections that have not authenticated yet, by listener.\n# TYPE towerctl_unauthenticated_connections gauge");
    for (listener, n) in &snap.unauthenticated {
        let _ = writeln!(
            o,
            "towerctl_unauthenticated_connections{{listener=\"{listener}\"}} {n}"
        );
    }
    if let Some(r) = &snap.registry {
        let _ = writeln!(o, "# HELP towerctl_registry_age_seconds How long ago this hub's copy of the shared registry (etcd) was last confirmed current; past --store-max-stale it refuses operators.\n# TYPE towerctl_registry_age_seconds gauge\ntowerctl_registry_age_seconds {:.3}", r.age_seconds);
        if let Some(max) = r.max_stale_seconds {
            let _ = writeln!(o, "# HELP towerctl_registry_max_stale_seconds --store-max-stale: the registry age past which this hub refuses operators.\n# TYPE towerctl_registry_max_stale_seconds gauge\ntowerctl_registry_max_stale_seconds {max:.3}");
        }
        let _ = writeln!(o, "# HELP towerctl_registry_refusing_operators Whether this hub refuses operators now, its copy of the shared registry too old (--store-max-stale).\n# TYPE towerctl_registry_refusing_operators gauge\ntowerctl_registry_refusing_operators {}", u8::from(r.refusing_operators));
        let _ = writeln!(o, "# HELP towerctl_registry_errors_total Requests to etcd (reads, writes, lease renewals; not its watch stream) that failed, by kind: unreachable (no endpoint answered, or none had a leader; requests not tried again within 2 s of that are not counted), no_space (etcd out of space, a NOSPACE alarm: registry writes, owner records and joins fail), refused (any other refusal: credentials, permissions).\n# TYPE towerctl_registry_errors_total counter");
        for (kind, n) in &r.failures {
            let _ = writeln!(o, "towerctl_registry_errors_total{{kind=\"{kind}\"}} {n}");
        }
    }
    let _ = writeln!(o, "# HELP towerctl_audit_dropped_total Audit records lost: the writer fell behind, or the disk refused them (full, read-only).\n# TYPE towerctl_audit_dropped_total counter\ntowerctl_audit_dropped_total {}", snap.audit_dropped);
    o
}

/// The metrics page, rendered off the runtime's threads (a snapshot reads
/// every member from the registry, which blocks) and once at a time:
/// scrapes that arrive while a rendering runs wait and get the next one
/// that starts after they asked, or share one started after them. A client
/// asking in a loop (anyone who reaches the port; 64 connections, each for
/// 10 s) made the hub, on one runtime thread, do nothing else.
#[derive(Default)]
struct Page {
    /// When the last rendering started, and what it made; held by the
    /// rendering itself, so a scrape that goes away (its client, the
    /// connection's 10 s) does not let another start beside it.
    last: Arc<tokio::sync::Mutex<Option<(std::time::Instant, Bytes)>>>,
}

impl Page {
    async fn get<F>(&self, snapshot: F) -> Bytes
    where
        F: Fn() -> Snapshot + Send + 'static,
    {
        let asked = std::time::Instant::now();
        let mut last = self.last.clone().lock_owned().await;
        if let Some((started, body)) = last.as_ref() {
            if *started >= asked {
                return body.clone();
            }
        }
        let started = std::time::Instant::now();
        let rendering = tokio::task::spawn_blocking(move || {
            let body = Bytes::from(render(&snapshot()));
            *last = Some((started, body.clone()));
            body
        });
        rendering
            .await
            .unwrap_or_else(|_| Bytes::from_static(b"# the metrics could not be gathered\n"))
    }
}

/// Connections the metrics listener holds at once (scrapers are few).
const METRICS_CAPS: super::admission::Caps = super::admission::Caps {
    total: 64,
    per_source: 16,
};

/// Serves `/metrics` until `cancel` fires; `snapshot` is taken per
/// rendering, scrapes arriving meanwhile sharing the next one ([`Page`]).
pub async fn serve<F>(
    listener: TcpListener,
    snapshot: F,
    cancel: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
) where
    F: Fn() -> Snapshot + Clone + Send + Sync + 'static,
{
    // Scrapers never authenticate, so every connection holds a ticket for
    // its whole life: at most METRICS_CAPS open, the oldest closed for a new
    // one (of its own source first), each for at most 10 s. Without a cap,
    // idle connections held the hub's descriptors until the gateway and
    // the tunnel listener could accept nothing.
    let admission = super::admission::Admission::new("metrics", METRICS_CAPS);
    let page = Arc::new(Page::default());
    while let Some((tcp, peer)) = super::accept_next(&listener, &cancel, "metrics").await {
        let snapshot = snapshot.clone();
        let page = page.clone();
        let ticket = admission.admit(peer.ip());
        tasks.spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let snapshot = snapshot.clone();
                    let page = page.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            let mut r = http::Response::new(Full::new(page.get(snapshot).await));
                            r.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("text/plain; version=0.0.4"),
                            );
                            r
                        } else {
                            let mut r = http::Response::new(Full::new(Bytes::from_static(
                                b"see /metrics\n",
                            )));
                            *r.status_mut() = http::StatusCode::NOT_FOUND;
                            r
                        };
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            let conn = tokio::time::timeout(
                Duration::from_secs(10),
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
            tokio::select! {
                _ = conn => {}
                () = ticket.evicted.cancelled() => {}
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let mut h = Histogram::default();
        h.observe(0.0004);
        h.observe(0.003);
        h.observe(9.0);
        assert_eq!(h.buckets[0], 1);
        assert_eq!(h.buckets[3], 2); // le=0.005
        assert_eq!(h.buckets[RTT_BUCKETS.len() - 1], 2);
        assert_eq!(h.count, 3);
    }

    #[test]
    fn renders_a_snapshot() {
        let mut rtt = Histogram::default();
        rtt.observe(0.002);
        let snap = Snapshot {
            members: vec![
                MemberStats {
                    name: "alpha".into(),
                    connected: true,
                    reachable: true,
                    rtt,
                    bytes_in: 10,
                    bytes_out: 20,
                    streams: 3,
                    windows: 1 << 20,
                    opened: 42,
                    reconnects: 1,
                },
                MemberStats {
                    name: "we\"ird\n".into(),
                    ..Default::default()
                },
                MemberStats {
                    name: "beta".into(),
                    reachable: true,
                    ..Default::default()
                },
            ],
            dial_failures: DialFailure::ALL.iter().map(|f| (*f, 0)).collect(),
            audit_dropped: 7,
            unauthenticated: vec![("tunnel", 2), ("gateway", 0)],
            registry: None,
        };
        let text = render(&snap);
        assert!(
            !text.contains("towerctl_registry_"),
            "no registry figures without a shared registry"
        );
        let text = render(&Snapshot {
            registry: Some(RegistryHealth {
                age_seconds: 4.25,
                max_stale_seconds: Some(3.0),
                refusing_operators: true,
                failures: vec![("unreachable", 5), ("no_space", 2), ("refused", 0)],
            }),
            ..snap
        });
        for line in [
            "towerctl_members 3",
            "towerctl_tunnel_up{cluster=\"beta\"} 0",
            "towerctl_member_reachable{cluster=\"beta\"} 1",
            "towerctl_member_reachable{cluster=\"alpha\"} 1",
            "towerctl_member_reachable{cluster=\"we\\\"ird\\n\"} 0",
            "towerctl_agents_connected 1",
            "towerctl_tunnel_up{cluster=\"alpha\"} 1",
            "towerctl_tunnel_up{cluster=\"we\\\"ird\\n\"} 0",
            "towerctl_tunnel_rtt_seconds_bucket{cluster=\"alpha\",le=\"0.0025\"} 1",
            "towerctl_tunnel_rtt_seconds_count{cluster=\"alpha\"} 1",
            "towerctl_tunnel_bytes_total{cluster=\"alpha\",direction=\"in\"} 10",
            "towerctl_tunnel_bytes_total{cluster=\"alpha\",direction=\"out\"} 20",
            "towerctl_tunnel_streams{cluster=\"alpha\"} 3",
            "towerctl_tunnel_stream_windows_bytes{cluster=\"alpha\"} 1048576",
            "towerctl_tunnel_streams_opened_total{cluster=\"alpha\"} 42",
            "towerctl_agent_reconnects_total{cluster=\"alpha\"} 1",
            "towerctl_dial_failures_total{reason=\"denied\"} 0",
            "towerctl_audit_dropped_total 7",
            "towerctl_unauthenticated_connections{listener=\"tunnel\"} 2",
            "towerctl_registry_age_seconds 4.250",
            "towerctl_registry_max_stale_seconds 3.000",
            "towerctl_registry_refusing_operators 1",
            "towerctl_registry_errors_total{kind=\"unreachable\"} 5",
            "towerctl_registry_errors_total{kind=\"no_space\"} 2",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line belongs to a declared metric family.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let name = l.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(text.contains(&format!("# TYPE {family} ")), "{l}");
        }
    }
}
