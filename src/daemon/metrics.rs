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

use super::hub::Hub;

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

/// Why the gateway could not reach a member, for `towerctl_dial_failures_total`.
#[derive(Default)]
pub struct DialFailures {
    pub not_connected: AtomicU64,
    pub unknown_cluster: AtomicU64,
    pub channel_refused: AtomicU64,
    pub agent_error: AtomicU64,
    /// The agent's dial policy refused the target.
    pub denied: AtomicU64,
    /// The target could not be resolved or dialed in the member.
    pub target_failed: AtomicU64,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics page.
pub fn render(hub: &Hub) -> String {
    let mut o = String::new();
    let stats = hub.metrics_snapshot();
    let connected = stats.iter().filter(|c| c.connected).count();
    let _ = writeln!(o, "# HELP towerctl_members Registered member clusters.\n# TYPE towerctl_members gauge\ntowerctl_members {}", stats.len());
    let _ = writeln!(o, "# HELP towerctl_agents_connected Members with a live tunnel.\n# TYPE towerctl_agents_connected gauge\ntowerctl_agents_connected {connected}");
    let _ = writeln!(o, "# HELP towerctl_tunnel_up Whether the member's tunnel is up.\n# TYPE towerctl_tunnel_up gauge");
    for c in &stats {
        let _ = writeln!(
            o,
            "towerctl_tunnel_up{{cluster=\"{}\"}} {}",
            esc(&c.name),
            u8::from(c.connected)
        );
    }
    let _ = writeln!(o, "# HELP towerctl_tunnel_rtt_seconds Round-trip time of tunnel keepalives.\n# TYPE towerctl_tunnel_rtt_seconds histogram");
    for c in &stats {
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
    for c in &stats {
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
    let _ = writeln!(o, "# HELP towerctl_tunnel_streams Open tunnel channels (upstream connections).\n# TYPE towerctl_tunnel_streams gauge");
    for c in &stats {
        let _ = writeln!(
            o,
            "towerctl_tunnel_streams{{cluster=\"{}\"}} {}",
            esc(&c.name),
            c.streams
        );
    }
    let _ = writeln!(o, "# HELP towerctl_agent_reconnects_total Agent sessions after the first since the hub started.\n# TYPE towerctl_agent_reconnects_total counter");
    for c in &stats {
        let _ = writeln!(
            o,
            "towerctl_agent_reconnects_total{{cluster=\"{}\"}} {}",
            esc(&c.name),
            c.reconnects
        );
    }
    let f = &hub.dial_failures;
    let _ = writeln!(o, "# HELP towerctl_dial_failures_total Gateway requests that could not reach their member, by reason.\n# TYPE towerctl_dial_failures_total counter");
    for (reason, v) in [
        ("not_connected", &f.not_connected),
        ("unknown_cluster", &f.unknown_cluster),
        ("channel_refused", &f.channel_refused),
        ("agent_error", &f.agent_error),
        ("denied", &f.denied),
        ("target_failed", &f.target_failed),
    ] {
        let _ = writeln!(
            o,
            "towerctl_dial_failures_total{{reason=\"{reason}\"}} {}",
            v.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(o, "# HELP towerctl_audit_dropped_total Audit records dropped because the writer fell behind.\n# TYPE towerctl_audit_dropped_total counter\ntowerctl_audit_dropped_total {}", hub.auditor.dropped.load(Ordering::Relaxed));
    o
}

pub async fn serve(listener: TcpListener, hub: Arc<Hub>, cancel: CancellationToken) {
    while let Some((tcp, _)) = super::accept_next(&listener, &cancel, "metrics").await {
        let hub = hub.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let hub = hub.clone();
                    async move {
                        let resp = if req.uri().path() == "/metrics" {
                            let mut r = http::Response::new(Full::new(Bytes::from(render(&hub))));
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
            let _ = tokio::time::timeout(
                Duration::from_secs(30),
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            )
            .await;
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
}
