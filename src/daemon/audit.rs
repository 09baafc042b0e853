//! The hub's audit log: one JSON line per gateway request (who reached which
//! cluster, what, the outcome, how long, how many bytes), size-bounded and
//! rotated. Records travel to a single writer task over a bounded channel,
//! so the request path never waits on the disk; if the disk cannot keep up,
//! records are dropped and counted rather than slowing kubectl down.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Rotate when the current file passes this size.
pub const MAX_BYTES: u64 = 10 * 1024 * 1024;
/// Rotated files kept besides the current one (`audit.log.1` … `.3`).
pub const KEEP: usize = 3;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Record {
    /// RFC 3339, UTC.
    pub time: String,
    pub operator: String,
    pub cluster: String,
    /// Kubernetes verb (get, list, watch, create, update, patch, delete, …).
    pub verb: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub duration_ms: u64,
    /// Response body bytes sent to the operator.
    pub bytes: u64,
    /// The access rule that let the operator reach the member (or refused
    /// it): `local admin`, `#3 allow group:payments 'team=payments'`, …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
}

/// The Kubernetes verb of a request, from its method and path.
pub fn verb(method: &str, path: &str, query: Option<&str>) -> &'static str {
    let watch = query.is_some_and(|q| {
        q.split('&')
            .any(|kv| kv == "watch=true" || kv == "watch=1" || kv == "watch")
    });
    // Segments after /api/v1 or /apis/GROUP/VERSION: an odd count names a
    // collection (`namespaces/ns/pods`), an even one an object.
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let rest = match segs.first() {
        Some(&"api") => segs.len().saturating_sub(2),
        Some(&"apis") => segs.len().saturating_sub(3),
        _ => 0,
    };
    let collection = rest % 2 == 1;
    match method {
        "GET" | "HEAD" if watch => "watch",
        "GET" | "HEAD" if collection => "list",
        "GET" | "HEAD" => "get",
        "POST" => "create",
        "PUT" => "update",
        "PATCH" => "patch",
        "DELETE" if collection => "deletecollection",
        "DELETE" => "delete",
        _ => "other",
    }
}

#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Record>,
    pub dropped: Arc<AtomicU64>,
}

impl Auditor {
    /// Starts the writer task for `path`.
    pub fn start(path: PathBuf) -> Auditor {
        let (tx, mut rx) = mpsc::channel::<Record>(4096);
        tokio::task::spawn_blocking(move || {
            let mut file = open(&path);
            while let Some(rec) = rx.blocking_recv() {
                let Some(f) = file.as_mut() else {
                    file = open(&path);
                    continue;
                };
                if let Ok(mut line) = serde_json::to_vec(&rec) {
                    line.push(b'\n');
                    let _ = f.write_all(&line);
                }
                if f.metadata().map(|m| m.len()).unwrap_or(0) >= MAX_BYTES {
                    rotate(&path);
                    file = open(&path);
                }
            }
        });
        Auditor {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn record(&self, r: Record) {
        if self.tx.try_send(r).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn open(path: &Path) -> Option<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| tracing::warn!("cannot open the audit log '{}': {e}", path.display()))
        .ok()
}

fn rotate(path: &Path) {
    let name = |i: usize| {
        let mut s = path.as_os_str().to_owned();
        s.push(format!(".{i}"));
        PathBuf::from(s)
    };
    let _ = std::fs::remove_file(name(KEEP));
    for i in (1..KEEP).rev() {
        let _ = std::fs::rename(name(i), name(i + 1));
    }
    let _ = std::fs::rename(path, name(1));
}

/// The audit log files, oldest first.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = (1..=KEEP)
        .rev()
        .map(|i| {
            let mut s = path.as_os_str().to_owned();
            s.push(format!(".{i}"));
            PathBuf::from(s)
        })
        .filter(|p| p.exists())
        .collect();
    if path.exists() {
        v.push(path.to_path_buf());
    }
    v
}

/// A response body that writes the request's audit record when it ends
/// (or is dropped: the client went away), so streamed responses are
/// recorded with their real duration and size.
pub struct Audited<B> {
    inner: B,
    record: Option<Record>,
    start: Instant,
    auditor: Auditor,
}

impl<B> Audited<B> {
    pub fn new(inner: B, record: Record, start: Instant, auditor: Auditor) -> Self {
        Audited {
            inner,
            record: Some(record),
            start,
            auditor,
        }
    }

    fn finish(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.duration_ms = self.start.elapsed().as_millis() as u64;
            self.auditor.record(r);
        }
    }
}

impl<B> Drop for Audited<B> {
    fn drop(&mut self) {
        self.finish();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Audited<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(d), Some(rec)) = (f.data_ref(), self.record.as_mut()) {
                    rec.bytes += d.len() as u64;
                }
            }
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs() {
        assert_eq!(verb("GET", "/api/v1/namespaces", None), "list");
        assert_eq!(verb("GET", "/api/v1/namespaces/default", None), "get");
        assert_eq!(
            verb(
                "GET",
                "/api/v1/namespaces/default/configmaps",
                Some("watch=true")
            ),
            "watch"
        );
        assert_eq!(
            verb("GET", "/apis/apps/v1/namespaces/x/deployments/web", None),
            "get"
        );
        assert_eq!(
            verb("POST", "/api/v1/namespaces/x/configmaps", None),
            "create"
        );
        assert_eq!(
            verb("DELETE", "/api/v1/namespaces/x/configmaps", None),
            "deletecollection"
        );
        assert_eq!(
            verb("PATCH", "/api/v1/namespaces/x/configmaps/a", None),
            "patch"
        );
    }

    #[test]
    fn rotation_keeps_a_bounded_number_of_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("audit.log");
        for i in 0..6 {
            std::fs::write(&p, format!("{i}\n")).unwrap();
            rotate(&p);
        }
        std::fs::write(&p, "current\n").unwrap();
        let f = files(&p);
        assert_eq!(f.len(), KEEP + 1, "{f:?}");
        assert_eq!(std::fs::read_to_string(&f[0]).unwrap(), "3\n");
        assert_eq!(
            std::fs::read_to_string(f.last().unwrap()).unwrap(),
            "current\n"
        );
    }
}
