//! The open streams of the gateway, by operator and member, so that
//! revoking access reaches what is already flowing: removing an operator
//! (or narrowing what it may reach) cancels its watches, `logs -f`, exec,
//! port-forward and CONNECT streams at once, not at their next request.

use super::fasthash::FastMap as HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Every stream in flight through the gateway, by operator and member.
///
/// Every request through the gateway registers here and leaves again, so
/// the names are looked up by `&str` and shared (`Arc<str>`) with the
/// guard, not copied: a request costs no allocation here but its
/// cancellation token, as long as its operator and member have a stream
/// in flight or were used lately ([`KEEP_EMPTY`]).
#[derive(Default)]
pub struct OpenStreams {
    next: AtomicU64,
    registry: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    by_operator: HashMap<Arc<str>, Operator>,
    /// `(operator, member)` entries, with or without streams.
    pairs: usize,
}

/// One operator's streams, by member.
struct Operator {
    name: Arc<str>,
    members: HashMap<Arc<str>, Member>,
}

/// One operator's streams to one member, by id.
struct Member {
    name: Arc<str>,
    streams: HashMap<u64, CancellationToken>,
}

/// Most `(operator, member)` pairs kept with no stream in flight, so that
/// the next request of a pair in use finds its entry. Past this, an entry
/// goes as its last stream ends (member names come from request paths:
/// the registry must not grow with every name a client makes up).
const KEEP_EMPTY: usize = 256;

/// One stream's entry; dropping it (when the stream ends) removes it.
pub struct StreamGuard {
    streams: Arc<OpenStreams>,
    id: u64,
    operator: Arc<str>,
    member: Arc<str>,
    /// Fires when the stream must end (its operator lost access).
    pub cut: CancellationToken,
    /// Dropped with the stream: what watches it on the side ends with it.
    tied: Option<tokio_util::sync::DropGuard>,
}

impl StreamGuard {
    /// Cancels `done` when the stream ends, whichever way.
    pub fn tie(&mut self, done: CancellationToken) {
        self.tied = Some(done.drop_guard());
    }
}

impl OpenStreams {
    /// Registers a stream of `operator` to member `cluster`.
    pub fn open(self: &Arc<Self>, operator: &str, cluster: &str) -> StreamGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cut = CancellationToken::new();
        let mut reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let reg = &mut *reg;
        let (op, _) = named(&mut reg.by_operator, operator, |name| Operator {
            name,
            members: HashMap::default(),
        });
        let (member, added) = named(&mut op.members, cluster, |name| Member {
            name,
            streams: HashMap::default(),
        });
        if added {
            reg.pairs += 1;
        }
        member.streams.insert(id, cut.clone());
        StreamGuard {
            streams: self.clone(),
            id,
            operator: op.name.clone(),
            member: member.name.clone(),
            cut,
            tied: None,
        }
    }

    /// Cuts every stream for which `doomed(operator, cluster)` holds;
    /// returns how many.
    pub fn cut(&self, doomed: impl Fn(&str, &str) -> bool) -> usize {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mut n = 0;
        for op in reg.by_operator.values() {
            for member in op.members.values() {
                if doomed(&op.name, &member.name) {
                    for token in member.streams.values() {
                        token.cancel();
                        n += 1;
                    }
                }
            }
        }
        n
    }

    /// Streams `operator` has open to member `cluster` (requests in
    /// flight, watches, exec, port-forward and CONNECT streams).
    pub fn count(&self, operator: &str, cluster: &str) -> usize {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        reg.by_operator
            .get(operator)
            .and_then(|op| op.members.get(cluster))
            .map_or(0, |m| m.streams.len())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        reg.by_operator
            .values()
            .flat_map(|op| op.members.values())
            .map(|m| m.streams.len())
            .sum()
    }

    /// `(operator, member)` entries held, with or without streams.
    #[cfg(test)]
    fn entries(&self) -> usize {
        let reg = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let n = reg.by_operator.values().map(|op| op.members.len()).sum();
        assert_eq!(n, reg.pairs);
        n
    }
}

/// The entry named `name`, made with `make` (given the name as the key's
/// `Arc`) if there is none, and whether it was made: looked up by `&str`,
/// so that an existing entry costs no allocation.
fn named<'a, V>(
    map: &'a mut HashMap<Arc<str>, V>,
    name: &str,
    make: impl FnOnce(Arc<str>) -> V,
) -> (&'a mut V, bool) {
    let added = !map.contains_key(name);
    if added {
        let key: Arc<str> = Arc::from(name);
        map.insert(key.clone(), make(key));
    }
    match map.get_mut(name) {
        Some(v) => (v, added),
        None => unreachable!("inserted above"),
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut reg = self
            .streams
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let reg = &mut *reg;
        let Some(op) = reg.by_operator.get_mut(&*self.operator) else {
            return;
        };
        let Some(member) = op.members.get_mut(&*self.member) else {
            return;
        };
        member.streams.remove(&self.id);
        if member.streams.is_empty() && reg.pairs > KEEP_EMPTY {
            op.members.remove(&*self.member);
            reg.pairs -= 1;
            if op.members.is_empty() {
                reg.by_operator.remove(&*self.operator);
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
        drop(eve_a);
        assert_eq!(s.len(), 0);
        // Entries without streams are kept for the next request, up to a
        // bound: made-up member names do not make the registry grow.
        assert_eq!(s.entries(), 3);
        for i in 0..2 * KEEP_EMPTY {
            drop(s.open("eve", &format!("made-up-{i}")));
        }
        assert!(s.entries() <= KEEP_EMPTY + 1, "{}", s.entries());
        let kept = s.open("bob", "alpha");
        assert_eq!(s.count("bob", "alpha"), 1);
        assert_eq!(s.cut(|op, c| op == "bob" && c == "alpha"), 1);
        assert!(kept.cut.is_cancelled());
    }
}
