//! A watch-fed cache of the Services that raw channels target, with their
//! EndpointSlices, so that a new forwarded connection is resolved without
//! two API reads.
//!
//! The first connection to a Service that exists starts watching it (the
//! Service by name, its EndpointSlices by the `kubernetes.io/service-name`
//! label) and is itself resolved with fresh reads. Once both watches are in sync, the
//! next connections read the cache; every change the API server reports
//! (a pod replaced, an endpoint no longer ready) replaces the snapshot at
//! once. While a watch is broken (reconnecting, or a server without
//! EndpointSlices), [`ServiceCache::get`] answers `None` and the caller
//! reads the API as before. A Service nobody connected to for
//! [`IDLE_EXPIRY`] is no longer watched.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A Service unused for this long stops being watched.
pub const IDLE_EXPIRY: Duration = Duration::from_secs(300);
/// Most Services watched at once; beyond it, connections read the API.
pub const MAX_WATCHED: usize = 256;
/// Server-side timeout of one watch request (kube allows up to 295 s);
/// the watch is then resumed from its last resourceVersion.
const WATCH_TIMEOUT: u32 = 240;
/// Most EndpointSlices one watched Service may have in the cache (100
/// endpoints each by default: far past any real Service). A member API
/// server reporting more is not followed: the copy is withdrawn (callers
/// read the API themselves) and read again after the retry pause; each
/// event copies the whole set into a new snapshot.
const MAX_SLICES: usize = 1000;
/// Pause before listing again after a watch failed, doubled on every
/// failure in a row (a server that forbids watching is not hammered).
const RETRY: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// What is known of one Service while its watches are in sync.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// `None`: the Service does not exist.
    pub service: Option<Service>,
    pub slices: Vec<EndpointSlice>,
}

#[derive(Default)]
struct Entry {
    /// `Some` only while both watches are in sync.
    snapshot: RwLock<Option<Arc<Snapshot>>>,
    last_used: Mutex<Option<Instant>>,
}

impl Entry {
    fn touch(&self) {
        if let Ok(mut l) = self.last_used.lock() {
            *l = Some(Instant::now());
        }
    }
    fn idle_for(&self) -> Duration {
        self.last_used
            .lock()
            .ok()
            .and_then(|l| *l)
            .map(|t| t.elapsed())
            .unwrap_or_default()
    }
    fn publish(&self, s: Option<Snapshot>) {
        if let Ok(mut w) = self.snapshot.write() {
            *w = s.map(Arc::new);
        }
    }
}

type Key = (String, String);

/// The agent's watched Services; cheap to clone.
#[derive(Clone)]
pub struct ServiceCache {
    client: kube::Client,
    entries: Arc<Mutex<HashMap<Key, Arc<Entry>>>>,
    pods: Arc<Mutex<HashMap<Key, PodAddrs>>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl ServiceCache {
    /// Watches run on `tasks` and stop with `cancel`.
    pub fn new(client: kube::Client, cancel: CancellationToken, tasks: TaskTracker) -> Self {
        ServiceCache {
            client,
            entries: Arc::default(),
            pods: Arc::default(),
            cancel,
            tasks,
        }
    }

    /// The Service `ns/name` and its EndpointSlices if they are watched and
    /// in sync; otherwise `None` (see [`ServiceCache::watch`]).
    pub fn get(&self, ns: &str, name: &str) -> Option<Arc<Snapshot>> {
        let key = (ns.to_string(), name.to_string());
        let entries = self.entries.lock().ok()?;
        let e = entries.get(&key)?;
        e.touch();
        let snapshot = e.snapshot.read().ok()?.clone();
        snapshot
    }

    /// Starts watching the Service `ns/name` for the next connections, if
    /// it is not watched yet. Called once a fresh read found the Service:
    /// a CONNECT to a name that does not exist must not start five minutes
    /// of watching (300 such names made the agent list and watch 600
    /// times in 30 s, and filled the cache).
    pub fn watch(&self, ns: &str, name: &str) {
        let key = (ns.to_string(), name.to_string());
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.contains_key(&key) || entries.len() >= MAX_WATCHED {
            return;
        }
        let entry = Arc::new(Entry::default());
        entry.touch();
        entries.insert(key.clone(), entry.clone());
        drop(entries);
        let (client, all, cancel) = (
            self.client.clone(),
            self.entries.clone(),
            self.cancel.clone(),
        );
        self.tasks.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = watch(client, &key.0, &key.1, &entry) => {}
            }
            if let Ok(mut m) = all.lock() {
                m.remove(&key);
            }
        });
    }

    /// The addresses of pod `ns/name` and whether it runs on its node's
    /// network, as read within [`POD_TTL`]; see [`ServiceCache::remember_pod`].
    pub fn pod(&self, ns: &str, name: &str) -> Option<PodAddrs> {
        let pods = self.pods.lock().ok()?;
        pods.get(&(ns.to_string(), name.to_string()))
            .filter(|p| p.read.elapsed() < POD_TTL)
            .cloned()
    }

    /// Keeps what a read of pod `ns/name` showed, for [`POD_TTL`], within
    /// [`MAX_PODS`] entries.
    pub fn remember_pod(&self, ns: &str, name: &str, addrs: PodAddrs) {
        let Ok(mut pods) = self.pods.lock() else {
            return;
        };
        if pods.len() >= MAX_PODS {
            pods.retain(|_, p| p.read.elapsed() < POD_TTL);
        }
        if pods.len() < MAX_PODS {
            pods.insert((ns.to_string(), name.to_string()), addrs);
        }
    }
}

/// How long a pod's addresses, read to check an endpoint's pod reference,
/// are reused: a pod's IP does not move to another pod within seconds.
pub const POD_TTL: Duration = Duration::from_secs(10);
/// Most pods remembered at once.
pub const MAX_PODS: usize = 4096;

/// What a read of a pod showed: its addresses (`status.podIPs`) and
/// whether it runs on its node's network.
#[derive(Debug, Clone)]
pub struct PodAddrs {
    /// Running and not being deleted: a finished pod (a Job's) keeps its
    /// IP in its status after the network has given it to another pod.
    pub live: bool,
    pub ips: Vec<std::net::IpAddr>,
    pub host_network: bool,
    pub read: Instant,
}

/// Keeps `entry` in sync with the API server until the Service is idle.
async fn watch(client: kube::Client, ns: &str, name: &str, entry: &Entry) {
    let services = Api::<Service>::namespaced(client.clone(), ns);
    let slices = Api::<EndpointSlice>::namespaced(client, ns);
    let by_name = format!("metadata.name={name}");
    let by_label = format!("kubernetes.io/service-name={name}");
    let mut retry = RETRY;
    while entry.idle_for() < IDLE_EXPIRY {
        entry.publish(None);
        let started = Instant::now();
        match sync(&services, &slices, &by_name, &by_label, entry).await {
            Stop::Idle => return,
            // A watch that ends at once is a failure in disguise.
            Stop::Ended if started.elapsed() < RETRY_MAX => {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
            Stop::Ended => retry = RETRY,
            Stop::Unsupported => {
                // No EndpointSlices here: callers read core Endpoints. The
                // entry stays (empty) so that no connection starts a watch
                // again, until the Service is idle.
                tracing::debug!(
                    "not watching service {ns}/{name}: the API server has no EndpointSlices"
                );
                while entry.idle_for() < IDLE_EXPIRY {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
                return;
            }
            Stop::Failed => {
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
            }
        }
    }
}

enum Stop {
    /// Nobody used the Service for a while.
    Idle,
    /// A watch ended (server timeout); list and watch again.
    Ended,
    /// The server has no EndpointSlice API.
    Unsupported,
    Failed,
}

async fn sync(
    services: &Api<Service>,
    slices: &Api<EndpointSlice>,
    by_name: &str,
    by_label: &str,
    entry: &Entry,
) -> Stop {
    // Bounded on this side too: the server ends its watches at
    // `WATCH_TIMEOUT`, but one whose connection stays open after its API
    // server died (behind a load balancer) went silent with its copy still
    // published as current, and a list that never answered held its slot
    // for ever. Past the bound the copy is withdrawn and read again.
    let bound = Duration::from_secs(u64::from(WATCH_TIMEOUT) + 60);
    match tokio::time::timeout(
        bound,
        sync_inner(services, slices, by_name, by_label, entry),
    )
    .await
    {
        Ok(Ok(s) | Err(s)) => s,
        Err(_) => {
            tracing::debug!("the resolve cache's watch went silent past {bound:?}; listing again");
            Stop::Ended
        }
    }
}

async fn sync_inner(
    services: &Api<Service>,
    slices: &Api<EndpointSlice>,
    by_name: &str,
    by_label: &str,
    entry: &Entry,
) -> Result<Stop, Stop> {
    let svc_list = services
        .list(&ListParams::default().fields(by_name))
        .await
        .map_err(|e| {
            tracing::debug!(
                "service list for the resolve cache: {}",
                crate::daemon::fmt::kube_error(&e)
            );
            Stop::Failed
        })?;
    let slice_list = slices
        .list(&ListParams::default().labels(by_label))
        .await
        .map_err(|e| match e {
            kube::Error::Api(s) if s.code == 404 => Stop::Unsupported,
            e => {
                tracing::debug!(
                    "endpointslice list for the resolve cache: {}",
                    crate::daemon::fmt::kube_error(&e)
                );
                Stop::Failed
            }
        })?;
    let svc_rv = svc_list
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let slice_rv = slice_list
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    if slice_list.items.len() > MAX_SLICES {
        tracing::debug!(
            "the resolve cache does not follow a Service with more than {MAX_SLICES} EndpointSlices"
        );
        return Err(Stop::Failed);
    }
    let mut service = svc_list.items.into_iter().next();
    let mut by_slice: BTreeMap<String, EndpointSlice> = slice_list
        .items
        .into_iter()
        .map(|s| (s.metadata.name.clone().unwrap_or_default(), s))
        .collect();
    let wp = |sel: &str, label: bool| {
        let wp = WatchParams::default().timeout(WATCH_TIMEOUT);
        if label {
            wp.labels(sel)
        } else {
            wp.fields(sel)
        }
    };
    let svc_watch = services
        .watch(&wp(by_name, false), &svc_rv)
        .await
        .map_err(|_| Stop::Failed)?;
    let slice_watch = slices
        .watch(&wp(by_label, true), &slice_rv)
        .await
        .map_err(|_| Stop::Failed)?;
    futures_util::pin_mut!(svc_watch, slice_watch);
    let snapshot =
        |service: &Option<Service>, by_slice: &BTreeMap<String, EndpointSlice>| Snapshot {
            service: service.clone(),
            slices: by_slice.values().cloned().collect(),
        };
    entry.publish(Some(snapshot(&service, &by_slice)));
    let mut idle_check = tokio::time::interval(Duration::from_secs(30));
    idle_check.tick().await;
    loop {
        tokio::select! {
            ev = svc_watch.next() => match ev {
                Some(Ok(WatchEvent::Added(s) | WatchEvent::Modified(s))) => {
                    service = Some(s);
                }
                Some(Ok(WatchEvent::Deleted(_))) => {
                    service = None;
                }
                Some(Ok(WatchEvent::Bookmark(_))) => continue,
                None => return Ok(Stop::Ended),
                Some(Ok(WatchEvent::Error(_)) | Err(_)) => return Err(Stop::Failed),
            },
            ev = slice_watch.next() => match ev {
                Some(Ok(WatchEvent::Added(s) | WatchEvent::Modified(s))) => {
                    by_slice.insert(s.metadata.name.clone().unwrap_or_default(), s);
                    if by_slice.len() > MAX_SLICES {
                        tracing::debug!(
                            "the resolve cache does not follow a Service with more than {MAX_SLICES} EndpointSlices"
                        );
                        return Err(Stop::Failed);
                    }
                }
                Some(Ok(WatchEvent::Deleted(s))) => {
                    by_slice.remove(s.metadata.name.as_deref().unwrap_or_default());
                }
                Some(Ok(WatchEvent::Bookmark(_))) => continue,
                None => return Ok(Stop::Ended),
                Some(Ok(WatchEvent::Error(_)) | Err(_)) => return Err(Stop::Failed),
            },
            _ = idle_check.tick() => {
                if entry.idle_for() >= IDLE_EXPIRY {
                    return Ok(Stop::Idle);
                }
                continue;
            }
        }
        entry.publish(Some(snapshot(&service, &by_slice)));
    }
}
