//! The open streams of the gateway, by operator and member, so that
//! revoking access reaches what is already flowing: removing an operator
//! (or narrowing what it may reach) cancels its watches, `logs -f`, exec,
//! port-forward and CONNECT streams at once, not at their next request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Every stream in flight through the gateway.
#[derive(Default)]
pub struct OpenStreams {
    next: AtomicU64,
    map: Mutex<HashMap<u64, (String, String, CancellationToken)>>,
    /// How many streams each `(operator, member)` has open.
    counts: Mutex<HashMap<(String, String), usize>>,
}

/// One stream's entry; dropping it (when the stream ends) removes it.
pub struct StreamGuard {
    streams: Arc<OpenStreams>,
    id: u64,
    /// Fires when the stream must end (its operator lost access).
    pub cut: CancellationToken,
}

impl OpenStreams {
    /// Registers a stream of `operator` to member `cluster`.
    pub fn open(self: &Arc<Self>, operator: &str, cluster: &str) -> StreamGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cut = CancellationToken::new();
        if let Ok(mut m) = self.map.lock() {
            m.insert(id, (operator.to_string(), cluster.to_string(), cut.clone()));
        }
        if let Ok(mut c) = self.counts.lock() {
            *c.entry((operator.to_string(), cluster.to_string()))
                .or_default() += 1;
        }
        StreamGuard {
            streams: self.clone(),
            id,
            cut,
        }
    }

    /// Cuts every stream for which `doomed(operator, cluster)` holds;
    /// returns how many.
    pub fn cut(&self, doomed: impl Fn(&str, &str) -> bool) -> usize {
        let Ok(m) = self.map.lock() else { return 0 };
        let mut n = 0;
        for (op, cluster, token) in m.values() {
            if doomed(op, cluster) {
                token.cancel();
                n += 1;
            }
        }
        n
    }

    /// Streams `operator` has open to member `cluster` (requests in
    /// flight, watches, exec, port-forward and CONNECT streams).
    pub fn count(&self, operator: &str, cluster: &str) -> usize {
        self.counts
            .lock()
            .ok()
            .and_then(|c| c.get(&(operator.to_string(), cluster.to_string())).copied())
            .unwrap_or(0)
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let Some((op, cluster, _)) = self
            .streams
            .map
            .lock()
            .ok()
            .and_then(|mut m| m.remove(&self.id))
        else {
            return;
        };
        if let Ok(mut c) = self.streams.counts.lock() {
            let key = (op, cluster);
            if let Some(n) = c.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    c.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_only_the_matching_streams_and_forgets_ended_ones() {
        let s = Arc::new(OpenStreams::default());
        let bob_a = s.open("bob", "alpha");
        let bob_b = s.open("bob", "beta");
        let eve_a = s.open("eve", "alpha");
        assert_eq!(s.cut(|op, _| op == "bob"), 2);
        assert!(bob_a.cut.is_cancelled() && bob_b.cut.is_cancelled());
        assert!(!eve_a.cut.is_cancelled());
        assert_eq!(s.cut(|op, c| op == "eve" && c == "beta"), 0);
        assert_eq!(s.count("bob", "alpha"), 1);
        let bob_a2 = s.open("bob", "alpha");
        assert_eq!(s.count("bob", "alpha"), 2);
        drop(bob_a);
        drop(bob_b);
        drop(bob_a2);
        assert_eq!(s.len(), 1);
        assert_eq!(s.count("bob", "alpha"), 0);
        assert_eq!(s.count("eve", "alpha"), 1);
    }
}
