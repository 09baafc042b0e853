//! Several active hubs on one etcd: who holds which session, and carrying
//! a request that lands on the wrong hub to the one that holds it.
//!
//! Each hub holds an etcd lease (renewed every [`KEEPALIVE`]); its
//! `hubs/<id>` record and one `owners/<member>` key per session it holds
//! live under that lease, so a hub that dies loses them within
//! [`LEASE_TTL`]. The newest session of a member wins: its hub writes the
//! owner key last, and a hub whose own claim is older than the key cuts its
//! copy. A revoked or removed member's session is cut by whichever hub
//! holds it, as soon as the watch reports the change.
//!
//! Forwarding: a gateway request or CONNECT for a member held elsewhere is
//! sent to the owner's gateway over HTTPS, verified against the shared CA,
//! carrying the operator's own bearer token: the owner authenticates and
//! audits it against the same registry, so no hub-to-hub credential or
//! trusted identity header exists to be stolen or forged. A marker header
//! stops a request from being forwarded twice.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Hub, LiveSession};
use crate::daemon::http::{
    full, is_upgrade, status_response, strip_hop_by_hop, text_response, Body, KeptConns,
};
use crate::daemon::store::Store;
use crate::daemon::store_etcd::{boot_ms, Change, EtcdStore};

/// The claims' revision after a failed write (retried by the next reconcile).
const CLAIM_FAILED: i64 = -1;

/// Names with an operation in flight; [`InFlight::try_hold`] gives one a
/// guard that frees the name when dropped.
#[derive(Default)]
pub(super) struct InFlight(Mutex<std::collections::HashSet<String>>);

pub(super) struct InFlightGuard(Arc<InFlight>, String);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Ok(mut s) = self.0 .0.lock() {
            s.remove(&self.1);
        }
    }
}

impl InFlight {
    fn try_hold(self: &Arc<Self>, name: &str) -> Option<InFlightGuard> {
        let mut s = self.0.lock().ok()?;
        s.insert(name.to_string())
            .then(|| InFlightGuard(self.clone(), name.to_string()))
    }
}

/// How long a request carried to another hub waits for its answer's head
/// (the member's own request deadline, 120 s at the agent, and the
/// tunnel's margin; at 90 s, a request the member answered in 100 s was
/// served through its own hub and cut through another).
pub(super) const PEER_ANSWER_DEADLINE: Duration = Duration::from_secs(130);

/// How long a request may wait for its answer's head from the member:
/// [`PEER_ANSWER_DEADLINE`], plus what the request asks the member for
/// (`?timeout=`), up to an hour (`timeout=876000h` lifted the bound).
/// None for a request kube-apiserver lets take as long as it likes
/// (`http::long_running`: a node's `proxy/debug/pprof/profile?seconds=180`
/// answers its head when the profile is done), as the agent does.
pub(super) fn answer_deadline(path: &str, query: Option<&str>, upgrade: bool) -> Option<Duration> {
    if crate::daemon::http::long_running(path, query, upgrade) {
        return None;
    }
    Some(
        crate::daemon::http::asked_timeout(query)
            .map(|t| t.min(Duration::from_secs(3600)) + PEER_ANSWER_DEADLINE)
            .unwrap_or(PEER_ANSWER_DEADLINE),
    )
}
/// A hub's lease lives this long without renewal.
pub const LEASE_TTL: i64 = 10;
const KEEPALIVE: Duration = Duration::from_secs(3);
/// Marks a request one hub forwarded to another: never forwarded again.
pub const FORWARDED_HEADER: &str = "x-towerctl-forwarded-by";

/// `owners/<member>`: which hub holds the member's session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Owner {
    pub hub: String,
    /// The owner's gateway URL, where other hubs forward to.
    pub peer: String,
    pub session: u64,
}

/// `hubs/<id>`: a live hub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HubInfo {
    pub tunnel_url: String,
    pub gateway_url: String,
}

/// The id of another live hub that other hubs reach at `ours`'s gateway
/// URL (`--peer-url`), if one does: several hubs behind one load balancer
/// whose URL each gives as its own. URLs are compared as parsed (host
/// case, a default port written or not).
pub fn peer_url_taken(store: &EtcdStore, id: &str, ours: &HubInfo) -> Result<Option<String>> {
    let prefix = store.key("hubs/");
    let (_, kvs) = store.etcd.range_prefix(&prefix)?;
    let mine = super::normalized_url(&ours.gateway_url);
    Ok(kvs.into_iter().find_map(|kv| {
        let theirs: HubInfo = serde_json::from_slice(&kv.value).ok()?;
        let their_id = kv.key.strip_prefix(&prefix)?;
        (their_id != id && super::normalized_url(&theirs.gateway_url) == mine)
            .then(|| their_id.to_string())
    }))
}

/// The other live hub that holds the id `id`, if one does.
///
/// `hubs/<id>` lives under its hub's lease. A record that reads as `ours`
/// is this hub's own from before a restart (taken over as it is). A
/// different one is either this hub's from before a restart at other
/// addresses, which goes within [`LEASE_TTL`] as nothing renews it, or a
/// live hub started from a copy of this one's data directory, which stays:
/// wait out one lease to tell them apart (only in this case).
pub fn held_elsewhere(store: &EtcdStore, id: &str, ours: &HubInfo) -> Result<Option<HubInfo>> {
    let key = store.key(&format!("hubs/{id}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(LEASE_TTL as u64 + 2);
    let mut waiting = false;
    loop {
        let Some(kv) = store.etcd.get(&key)? else {
            return Ok(None);
        };
        // Unreadable: not a hub this version can forward to, so not ours.
        let theirs: Option<HubInfo> = serde_json::from_slice(&kv.value).ok();
        if theirs.as_ref() == Some(ours) {
            return Ok(None);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(Some(theirs.unwrap_or(HubInfo {
                tunnel_url: "?".into(),
                gateway_url: "?".into(),
            })));
        }
        if !waiting {
            waiting = true;
            tracing::info!(
                "another hub record holds this hub's id '{id}'; waiting up to {} s for it to expire (this hub restarted at other addresses) before taking a new id (a copied data directory)",
                LEASE_TTL + 2
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A write of a member's owner key ([`Cluster::owner_write`]).
enum OwnerWrite {
    /// Session `session`'s claim (`if_free`: only where the key is free);
    /// `prior`, the revision its key was written at before, if any.
    Claim {
        session: Arc<LiveSession>,
        if_free: bool,
        prior: i64,
    },
    /// The key removed if it still holds `value` (a session that ended).
    Release { value: Vec<u8> },
}

pub struct Cluster {
    pub store: Arc<EtcdStore>,
    pub id: String,
    info: HubInfo,
    lease: AtomicI64,
    /// [`boot_ms`] when etcd last answered a grant or renewal of `lease`:
    /// the lease lives at most [`LEASE_TTL`] past it.
    renewed_ms: AtomicU64,
    /// Member → (our session id, revision our owner key was written at;
    /// 0 while the write is in flight, [`CLAIM_FAILED`] after it failed).
    claims: Mutex<HashMap<String, (u64, i64)>>,
    /// Owner-key writes per member: one in flight at a time, the latest
    /// waiting behind it replacing any earlier one ([`Cluster::owner_write`]).
    owner_writes: Mutex<HashMap<String, Option<OwnerWrite>>>,
    /// Owner keys whose removal is in flight (`drop_stale_owner_keys`).
    deleting: Arc<InFlight>,
    tls: tokio_rustls::TlsConnector,
    /// Kept-alive connections to other hubs' gateways, by peer URL, for the
    /// next forwarded request: a request routed to the hub that holds its
    /// member then pays no TCP and TLS handshake between the hubs.
    idle: Mutex<HashMap<String, KeptConns<Body, std::time::Instant>>>,
    /// The token hash of this hub's own admin row ([`Cluster::tend_admins`]).
    admin_hash: std::sync::OnceLock<String>,
    /// Hubs with admin rows and no live record, since when they were seen so.
    admins_gone: Mutex<HashMap<String, std::time::Instant>>,
    /// When [`Cluster::tend_admins`] last looked.
    admins_tended: Mutex<Option<std::time::Instant>>,
}

/// How long the admin row of a hub with no live record is kept before any
/// other hub removes it (`TOWERCTL_ADMIN_ORPHAN_AFTER`, seconds): a hub
/// whose data directory is not kept (an emptyDir in a pod) takes a new id
/// and a new admin token at every start, and the old token, a
/// `system:masters` credential, stayed valid for good.
fn admins_orphaned_after() -> Duration {
    static AFTER: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *AFTER.get_or_init(|| {
        Duration::from_secs(crate::tunnel::positive_env("TOWERCTL_ADMIN_ORPHAN_AFTER", 900) as u64)
    })
}

type PeerSender = hyper::client::conn::http1::SendRequest<Body>;

/// Most connections kept to one other hub; past it the oldest is let go
/// (it closes once its response is done).
const PEER_IDLE: usize = 32;

/// A kept connection unused for this long is let go rather than reused:
/// the other hub closes idle connections after its gateway's idle timeout
/// (120 s), and a request written just as that close crosses it would fail
/// with nothing safe to retry.
const PEER_IDLE_FOR: Duration = Duration::from_secs(60);

/// Puts the gateway CA and the SSH host key in etcd on the first hub's
/// start (create-if-absent) and writes the shared copies into `data`
/// before the hub loads them, so every hub serves the same ones.
pub fn share_secrets(
    store: &EtcdStore,
    data: &Path,
    write: impl Fn(&Path, &[u8], u32) -> Result<()>,
) -> Result<()> {
    let sets: [(&str, &[(&str, u32)]); 2] = [
        ("meta/ca", &[("ca.key", 0o600), ("ca.crt", 0o644)]),
        ("meta/host_key", &[("host_key", 0o600)]),
    ];
    for (rel, files) in sets {
        let shared = match store.cached(rel) {
            Some((v, _)) => v,
            None => {
                // Ours (existing or new) becomes everyone's, unless another
                // hub wins the race: then we take theirs.
                if rel == "meta/ca" {
                    crate::daemon::tls::load(data, &["localhost".into()], &write)?;
                } else {
                    crate::tunnel::keys::load_or_create_host_key(
                        &data.join("host_key"),
                        |p, b| write(p, b, 0o600),
                    )?;
                }
                let mut mine = serde_json::Map::new();
                for (f, _) in files {
                    let s = std::fs::read_to_string(data.join(f))
                        .with_context(|| format!("cannot read '{}'", data.join(f).display()))?;
                    mine.insert(f.to_string(), serde_json::Value::String(s));
                }
                let mine = serde_json::to_vec(&mine)?;
                store.create_if_absent(rel, &mine)?
            }
        };
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&shared)
            .with_context(|| format!("the shared {rel} in etcd is corrupt"))?;
        for (f, mode) in files {
            let s = v
                .get(*f)
                .and_then(|x| x.as_str())
                .with_context(|| format!("the shared {rel} in etcd lacks {f}"))?;
            match std::fs::read_to_string(data.join(f)) {
                Ok(local) if local == s => {}
                Ok(local) => {
                    // A hub that ran alone before joins the group: the
                    // group's CA and host key win (agents and kubeconfigs
                    // made against the old ones must be redone). Its own
                    // are kept beside them (`F.pre-group`, then
                    // `F.pre-group.2` …), never lost: a wrong --store is
                    // undone by putting them back.
                    let kept = (1..100)
                        .map(|n| match n {
                            1 => data.join(format!("{f}.pre-group")),
                            n => data.join(format!("{f}.pre-group.{n}")),
                        })
                        // A free name, or one holding this very copy; never
                        // one that cannot be read (it would pass for kept).
                        .find(|p| match std::fs::read_to_string(p) {
                            Ok(old) => old == local,
                            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
                        })
                        .with_context(|| format!("too many kept copies of {f} in '{}'", data.display()))?;
                    if !kept.exists() {
                        write(&kept, local.as_bytes(), 0o600)?;
                    }
                    tracing::warn!(
                        "replacing this hub's own {f} with the one shared in etcd (its own kept as '{}')",
                        kept.display()
                    );
                    write(&data.join(f), s.as_bytes(), *mode)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    write(&data.join(f), s.as_bytes(), *mode)?
                }
                // Unreadable: said, not overwritten unkept.
                Err(e) => {
                    return Err(anyhow::Error::new(e).context(format!(
                        "cannot read '{}' (to compare it with the group's in etcd); fix its permissions",
                        data.join(f).display()
                    )))
                }
            }
        }
    }
    Ok(())
}

impl Cluster {
    /// Takes a lease and announces this hub.
    pub fn start(
        store: Arc<EtcdStore>,
        id: String,
        info: HubInfo,
        ca_pem: &str,
    ) -> Result<Arc<Cluster>> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(c?)?;
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let c = Arc::new(Cluster {
            store,
            id,
            info,
            lease: AtomicI64::new(0),
            renewed_ms: AtomicU64::new(boot_ms()),
            claims: Mutex::new(HashMap::new()),
            owner_writes: Mutex::new(HashMap::new()),
            deleting: Default::default(),
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            idle: Mutex::new(HashMap::new()),
            admin_hash: std::sync::OnceLock::new(),
            admins_gone: Mutex::new(HashMap::new()),
            admins_tended: Mutex::new(None),
        });
        c.announce().context("cannot register this hub in etcd")?;
        Ok(c)
    }

    /// Takes a new lease and writes `hubs/<id>` under it.
    fn announce(&self) -> Result<()> {
        let lease = self.store.etcd.lease_grant(LEASE_TTL)?;
        self.lease.store(lease, Ordering::SeqCst);
        self.renewed_ms.store(boot_ms(), Ordering::SeqCst);
        self.store.put_raw(
            &format!("hubs/{}", self.id),
            &serde_json::to_vec(&self.info)?,
            lease,
        )?;
        Ok(())
    }

    /// Renews the lease; takes a new one when it was lost (etcd away for
    /// longer than the TTL). Runs on its own thread until `cancel`.
    /// While etcd stays away, its failure is logged at warn once, then once
    /// a minute (every try at debug): an outage of hours used to write a
    /// warning every few seconds.
    fn keep_lease(self: Arc<Self>, cancel: CancellationToken) {
        let mut failed: u64 = 0;
        let mut missing = 0u32;
        let every = (60 / KEEPALIVE.as_secs().max(1)).max(1);
        while !cancel.is_cancelled() {
            std::thread::sleep(KEEPALIVE);
            // Stopped while it slept: the shutdown revokes the lease, and
            // a renewal now would answer "expired" and announce this hub
            // again, a ghost record for the lease's life.
            if cancel.is_cancelled() {
                break;
            }
            let lease = self.lease.load(Ordering::SeqCst);
            let r = self.store.etcd.lease_keepalive(lease);
            if r.is_ok() && failed > 0 {
                tracing::info!(
                    "etcd answers this hub's lease renewals again, after {failed} failed tries"
                );
                failed = 0;
            }
            match r {
                Ok(true) => {
                    self.renewed_ms.store(boot_ms(), Ordering::SeqCst);
                    // The lease lives but our record is gone (a new lease
                    // taken whose write failed, or the key deleted): other
                    // hubs and agents no longer see this hub. Written again
                    // once it has been missing at two renewals in a row
                    // (not racing the watch that brings our own write).
                    let rel = format!("hubs/{}", self.id);
                    missing = match self.store.cached(&rel) {
                        Some(_) => 0,
                        None => missing + 1,
                    };
                    if missing >= 2 {
                        match serde_json::to_vec(&self.info) {
                            Ok(v) => match self.store.put_raw(&rel, &v, lease) {
                                Ok(_) => {
                                    tracing::warn!(
                                        "this hub's record in etcd was missing; written again"
                                    );
                                    missing = 0;
                                }
                                Err(e) => tracing::warn!(
                                    "cannot write this hub's record in etcd again: {e}"
                                ),
                            },
                            Err(e) => tracing::warn!("cannot encode this hub's record: {e}"),
                        }
                    }
                }
                Ok(false) => {
                    tracing::warn!("this hub's etcd lease expired; taking a new one and claiming its sessions again");
                    if let Err(e) = self.announce() {
                        tracing::warn!("cannot take a new etcd lease: {e}");
                    }
                }
                Err(e) => {
                    failed += 1;
                    if failed % every == 1 || every == 1 {
                        tracing::warn!("cannot renew this hub's etcd lease (failed try {failed}; said again once a minute while it fails): {e}");
                    } else {
                        tracing::debug!("cannot renew this hub's etcd lease: {e}");
                    }
                }
            }
        }
    }

    /// How long ago etcd last answered a grant or renewal of this hub's
    /// lease.
    pub fn lease_age(&self) -> Duration {
        Duration::from_millis(boot_ms().saturating_sub(self.renewed_ms.load(Ordering::SeqCst)))
    }

    /// How long ago this hub's lease expired in etcd, with its `hubs/<id>`
    /// record and its owner keys: other hubs no longer route to its
    /// sessions. `None` while the lease may live (renewed less than
    /// [`LEASE_TTL`] ago).
    fn lease_gone_for(&self) -> Option<Duration> {
        self.lease_age()
            .checked_sub(Duration::from_secs(LEASE_TTL as u64))
            .filter(|d| !d.is_zero())
    }

    /// Whether etcd answers a renewal of this hub's lease now (asked just
    /// before agents are handed off: etcd may have come back since the
    /// lease thread last tried, and the hub's own confirmation may lag the
    /// other hubs'). Asked on a thread of its own, past the client's "etcd
    /// is away" shortcut, and waited for as long as the call can take. A
    /// lease etcd no longer knows is taken anew by the lease thread.
    async fn answers_renewal(self: &Arc<Self>) -> bool {
        let me = self.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("etcd-probe".into())
            .spawn(move || {
                let r = me
                    .store
                    .etcd
                    .lease_keepalive_now(me.lease.load(Ordering::SeqCst));
                if let Ok(true) = r {
                    me.renewed_ms.store(boot_ms(), Ordering::SeqCst);
                }
                let _ = tx.send(r.is_ok());
            });
        if spawned.is_err() {
            return false;
        }
        let wait = self.store.etcd.longest_call() + Duration::from_secs(1);
        matches!(tokio::time::timeout(wait, rx).await, Ok(Ok(true)))
    }

    /// Remembers this hub's admin token hash, whose row
    /// [`Cluster::tend_admins`] writes again if it goes.
    pub fn keep_admin(&self, hash: String) {
        let _ = self.admin_hash.set(hash);
    }

    /// Every 10 s while this hub reaches etcd: writes its own admin row
    /// again if it is gone (removed by other hubs while this one was cut
    /// off from etcd past [`admins_orphaned_after`]), and removes the admin
    /// rows of hubs that have had no live record for that long. The writes
    /// go to etcd off the runtime's thread.
    fn tend_admins(self: &Arc<Self>, hub: &Arc<Hub>) {
        let now = std::time::Instant::now();
        {
            let Ok(mut last) = self.admins_tended.lock() else {
                return;
            };
            if last.is_some_and(|t| now.duration_since(t) < Duration::from_secs(10)) {
                return;
            }
            *last = Some(now);
        }
        let (me, hub) = (self.clone(), hub.clone());
        tokio::task::spawn_blocking(move || me.tend_admins_now(&hub, now));
    }

    fn tend_admins_now(&self, hub: &Hub, now: std::time::Instant) {
        // Only from a view of the registry that is current: a hub cut off
        // sees every other hub as gone.
        let Ok(mut gone) = self.admins_gone.lock() else {
            return;
        };
        if cut_off(hub, self).is_some() || hub.registry_age() > Duration::from_secs(30) {
            gone.clear();
            return;
        }
        // Those it can read: its own admin's record unreadable is missing,
        // and written again.
        let Ok(operators) = self.store.list_readable_operators() else {
            return;
        };
        let own = self.admin_hash.get().cloned();
        if let Some(hash) = own {
            if !operators.iter().any(|o| o.token_hash == hash) {
                let op = crate::daemon::store::Operator {
                    name: super::LOCAL_ADMIN.into(),
                    token_hash: hash,
                    groups: vec!["system:masters".into()],
                    created_at: crate::daemon::control::now_unix(),
                    hub: Some(self.id.clone()),
                };
                match self.store.put_operator(&op) {
                    Ok(()) => tracing::warn!(
                        "this hub's admin token was gone from the shared registry (removed while \
                         this hub was away from etcd); written again"
                    ),
                    Err(e) => tracing::warn!("cannot write this hub's admin token again: {e}"),
                }
            }
        }
        let live: std::collections::HashSet<String> = self
            .store
            .cached_under("hubs/")
            .into_iter()
            .map(|(k, _, _)| k.trim_start_matches("hubs/").to_string())
            .collect();
        let orphans: std::collections::HashSet<String> = operators
            .iter()
            .filter(|o| o.name == super::LOCAL_ADMIN)
            .filter_map(|o| o.hub.clone())
            .filter(|h| *h != self.id && !live.contains(h))
            .collect();
        gone.retain(|h, _| orphans.contains(h));
        for h in orphans {
            let since = *gone.entry(h.clone()).or_insert(now);
            if now.duration_since(since) < admins_orphaned_after() {
                continue;
            }
            // Each row in one transaction with the hub's record still
            // absent: a hub coming back at this moment keeps its row.
            let rows = operators
                .iter()
                .filter(|o| o.name == super::LOCAL_ADMIN && o.hub.as_deref() == Some(h.as_str()));
            let mut removed = Ok(0usize);
            for o in rows {
                let rel = format!("operators/{}", o.token_hash);
                match self.store.delete_while_absent(&rel, &format!("hubs/{h}")) {
                    Ok(true) => removed = removed.map(|n| n + 1),
                    Ok(false) => {}
                    Err(e) => removed = Err(e),
                }
            }
            match removed {
                Ok(n) if n > 0 => {
                    gone.remove(&h);
                    tracing::warn!(
                        "removed the admin token of hub '{}', which has had no live record for \
                         {} s (TOWERCTL_ADMIN_ORPHAN_AFTER): a hub that comes back writes its \
                         own again",
                        crate::tunnel::escape_for_log(&h, 100),
                        admins_orphaned_after().as_secs()
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("cannot remove a gone hub's admin token: {e}"),
            }
        }
    }

    /// Every live hub's tunnel URL, this one first.
    pub fn tunnel_urls(&self) -> Vec<String> {
        let mut v = vec![self.info.tunnel_url.clone()];
        for (_, b, _) in self.store.cached_under("hubs/") {
            if let Ok(h) = serde_json::from_slice::<HubInfo>(&b) {
                if !v.contains(&h.tunnel_url) {
                    v.push(h.tunnel_url);
                }
            }
        }
        v
    }

    /// The gateway URL of another live hub that reaches etcd, if one does:
    /// its `/readyz` says its registry was confirmed less than `within`
    /// ago ([`REGISTRY_AGE_HEADER`]). Each is given [`READY_DEADLINE`].
    async fn peer_reaching_etcd(&self, hub: &Hub, within: Duration) -> Option<String> {
        let mut peers: Vec<String> = self
            .store
            .cached_under("hubs/")
            .into_iter()
            .filter_map(|(_, b, _)| serde_json::from_slice::<HubInfo>(&b).ok())
            .map(|h| h.gateway_url)
            .filter(|u| *u != self.info.gateway_url)
            .collect();
        peers.sort();
        peers.dedup();
        for peer in peers {
            let shown = crate::tunnel::escape_for_log(&peer, 200);
            let ask = async {
                let mut sender = self.dial(hub, &peer).await.ok()?;
                let authority = url::Url::parse(&peer).ok().and_then(|u| {
                    Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?))
                })?;
                let req = Request::get("/readyz")
                    .header(header::HOST, authority)
                    .body(full(bytes::Bytes::new()))
                    .ok()?;
                let resp = sender.send_request(req).await.ok()?;
                let age = resp.headers().get(REGISTRY_AGE_HEADER)?.to_str().ok()?;
                let age = Duration::from_millis(age.parse().ok()?);
                (resp.status() == StatusCode::OK).then_some(age)
            };
            match tokio::time::timeout(READY_DEADLINE, ask).await {
                Ok(Some(age)) if age < within => return Some(peer),
                Ok(Some(age)) => tracing::debug!(
                    "hub at {shown} last reached etcd {age:?} ago: not taken for one that reaches it"
                ),
                _ => tracing::debug!("hub at {shown} does not answer ready"),
            }
        }
        None
    }

    /// The hub holding `name`'s session, and the owner key's revision.
    pub fn owner(&self, name: &str) -> Option<(Owner, i64)> {
        let (b, rev) = self.store.cached(&format!("owners/{name}"))?;
        serde_json::from_slice(&b).ok().map(|o| (o, rev))
    }

    fn owner_value(&self, s: &LiveSession) -> Vec<u8> {
        serde_json::to_vec(&Owner {
            hub: self.id.clone(),
            peer: self.info.gateway_url.clone(),
            session: s.id,
        })
        .unwrap_or_default()
    }

    /// Writes the owner key for a session (off the runtime thread): a new
    /// session's at once (the newest session of a member wins, wherever
    /// its older one was).
    fn claim(self: &Arc<Self>, hub: &Hub, s: &Arc<LiveSession>) {
        self.write_claim(hub, s, false);
    }

    /// Claims again a key found gone (lease expired) or never written
    /// (etcd away), only where it is still free in etcd, not as this hub's
    /// copy shows it: a hub resumed from a freeze reads the removal of its
    /// lease's keys before the claim another hub made since for the
    /// member's new session, which a blind write overwrote (that hub then
    /// cut the healthy session as replaced). Held by another, or failing,
    /// a claim that had been written keeps its earlier revision, so the
    /// newer claim cuts this session; one never written stays failed (no
    /// revision to compare: its session ends by its own keepalives if the
    /// agent left, and the key is claimed once free if it did not).
    fn claim_again(self: &Arc<Self>, hub: &Hub, s: &Arc<LiveSession>) {
        self.write_claim(hub, s, true);
    }

    fn write_claim(self: &Arc<Self>, hub: &Hub, s: &Arc<LiveSession>, if_free: bool) {
        let mut prior = 0;
        if let Ok(mut c) = self.claims.lock() {
            let old = c.insert(s.name.clone(), (s.id, 0));
            prior = old.filter(|o| o.0 == s.id).map_or(0, |o| o.1);
        }
        self.owner_write(
            hub,
            &s.name,
            OwnerWrite::Claim {
                session: s.clone(),
                if_free,
                prior,
            },
        );
    }

    /// Queues `w` for member `name`'s owner key: written now when no write
    /// of that member is in flight, else after it, in place of any write
    /// still waiting (the latest says what the key must be). A member whose
    /// key holder logs in and out without pause made one etcd write per
    /// login and one per logout on the shared blocking threads, which token
    /// checks, other members' claims and the control socket wait on.
    fn owner_write(self: &Arc<Self>, hub: &Hub, name: &str, w: OwnerWrite) {
        {
            let Ok(mut m) = self.owner_writes.lock() else {
                return;
            };
            match m.get_mut(name) {
                // In flight: this one waits, replacing one waiting.
                Some(waiting) => {
                    *waiting = Some(w);
                    return;
                }
                None => {
                    m.insert(name.to_string(), None);
                }
            }
        }
        let (me, name) = (self.clone(), name.to_string());
        hub.tasks.spawn(async move {
            let mut next = Some(w);
            while let Some(w) = next {
                match w {
                    OwnerWrite::Claim {
                        session,
                        if_free,
                        prior,
                    } => me.claim_now(session, if_free, prior).await,
                    OwnerWrite::Release { value } => {
                        let (st, rel) = (me.store.clone(), format!("owners/{name}"));
                        let _ = tokio::task::spawn_blocking(move || {
                            let _ = st.delete_if(&rel, &value);
                        })
                        .await;
                    }
                }
                next = match me.owner_writes.lock() {
                    Ok(mut m) => match m.get_mut(&name).and_then(Option::take) {
                        Some(w) => Some(w),
                        None => {
                            m.remove(&name);
                            None
                        }
                    },
                    Err(_) => None,
                };
            }
        });
    }

    /// Writes session `s`'s owner key (see [`Cluster::write_claim`]).
    async fn claim_now(self: &Arc<Self>, s: Arc<LiveSession>, if_free: bool, prior: i64) {
        let value = self.owner_value(&s);
        let lease = self.lease.load(Ordering::SeqCst);
        let (st, rel) = (self.store.clone(), format!("owners/{}", s.name));
        let r = tokio::task::spawn_blocking(move || match if_free {
            false => st.put_raw(&rel, &value, lease).map(Some),
            true => st.put_if_free(&rel, &value, lease),
        })
        .await;
        // Written: its revision. Held by another hub, or failed: a claim
        // that had been written keeps its earlier revision (a newer
        // claim elsewhere cuts this session; a missing key is claimed
        // again), else it is failed, retried by the next reconcile (one
        // in flight is not: re-sending those on every registry event
        // multiplied the writes tenfold when 1,000 agents logged in at
        // once). A result landing after another write began is left.
        let (rev, in_flight_only) = match r {
            Ok(Ok(Some(rev))) => (rev, false),
            other => {
                if let Ok(Err(e)) = other {
                    // Retried every second for every member held: under
                    // an etcd out of space, a line per member a second.
                    static FAILED_CLAIMS: crate::tunnel::LogBudget =
                        crate::tunnel::LogBudget::new("failed owner records", 10);
                    if FAILED_CLAIMS.admit() {
                        tracing::warn!(cluster = %s.name, "cannot record this hub as the session's owner in etcd: {e}; retrying");
                    } else {
                        tracing::debug!(cluster = %s.name, "cannot record this hub as the session's owner in etcd: {e}; retrying");
                    }
                }
                (if prior > 0 { prior } else { CLAIM_FAILED }, true)
            }
        };
        if let Ok(mut c) = self.claims.lock() {
            if let Some(cl) = c
                .get_mut(&s.name)
                .filter(|cl| cl.0 == s.id && (cl.1 == 0 || !in_flight_only))
            {
                cl.1 = rev;
            }
        }
    }

    /// The session ended here: drop the owner key if it is still ours,
    /// and record when the member was last seen.
    /// `seen`: whether to write the session's end into the member's
    /// record as its last sighting (not into a member added again since).
    pub(super) fn release(self: &Arc<Self>, hub: &Hub, s: &LiveSession, now: u64, seen: bool) {
        if let Ok(mut c) = self.claims.lock() {
            if c.get(&s.name).is_some_and(|cl| cl.0 == s.id) {
                c.remove(&s.name);
            }
        }
        let value = self.owner_value(s);
        self.owner_write(hub, &s.name, OwnerWrite::Release { value });
        if seen {
            hub.record_last_seen(&s.name, now);
        }
    }

    /// Brings ownership in line with the registry: claims new sessions,
    /// claims again keys lost with an expired lease, cuts sessions replaced
    /// on another hub, revoked or removed.
    fn reconcile(self: &Arc<Self>, hub: &Hub) {
        let local: Vec<Arc<LiveSession>> = hub.live_sessions();
        for s in local {
            match hub.store.get_member(&s.name) {
                Ok(Some(m)) if m.revoked => {
                    let reason = super::auth::revoked_reason(&s.name);
                    cut(hub, &s, reason);
                    continue;
                }
                Ok(None) => {
                    cut(hub, &s, "the cluster was removed from the hub".into());
                    continue;
                }
                Ok(Some(m)) => {
                    // `cluster rotate --new-key` (or `rm` and `add`) on
                    // another hub: the key this session proved is gone.
                    if let Some(why) = super::auth::key_retired(&m, &s) {
                        cut(hub, &s, why);
                        continue;
                    }
                    // `cluster set --impersonate` on another hub: this hub
                    // must stop routing with the agent's identity at once.
                    if hub.set_impersonation(&s, m.impersonate) {
                        tracing::info!(
                            cluster = %s.name,
                            impersonate = m.impersonate,
                            "identity mode changed in the shared registry"
                        );
                    }
                }
                Err(_) => {}
            }
            let claim = self
                .claims
                .lock()
                .ok()
                .and_then(|c| c.get(&s.name).copied());
            let owner = self.owner(&s.name);
            match (claim, owner) {
                (Some((id, _)), _) if id != s.id => self.claim(hub, &s),
                (None, _) => self.claim(hub, &s),
                (Some((_, 0)), None) => {} // claim in flight
                (Some(_), None) => self.claim_again(hub, &s),
                (Some((_, mine)), Some((o, rev))) => {
                    if o.hub == self.id && o.session == s.id {
                        // Ours, as the registry shows it: its revision is
                        // the claim's, also when the write was reported as
                        // failed but applied (a leader change under it),
                        // so that a newer session on another hub still
                        // replaces it and it is not written again.
                        if mine <= 0 {
                            if let Ok(mut c) = self.claims.lock() {
                                if let Some(cl) = c.get_mut(&s.name).filter(|cl| cl.0 == s.id) {
                                    cl.1 = rev;
                                }
                            }
                        }
                        continue;
                    }
                    // A key of this hub naming another session: an ended
                    // one, whose claim landed after the live session's (a
                    // hub holds one session per member). Claimed again; it
                    // used to cut the live session as "replaced by a newer
                    // session on" this very hub.
                    if o.hub == self.id {
                        self.claim(hub, &s);
                        continue;
                    }
                    if mine > 0 && rev > mine {
                        cut(
                            hub,
                            &s,
                            // Registry text: escaped (it goes to the log,
                            // the agent and the dashboard).
                            format!(
                                "replaced by a newer session on hub {}",
                                crate::tunnel::escape_for_log(&o.hub, 200)
                            ),
                        );
                    }
                }
            }
        }
        // Failed claims (etcd away) are retried.
        let pending: Vec<String> = self
            .claims
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|(_, v)| v.1 == CLAIM_FAILED)
                    .map(|(k, _)| k.clone())
                    .collect()
            })
            .unwrap_or_default();
        for name in pending {
            if let Some(s) = hub.session(&name) {
                // Only where nobody holds the key: a newer session on another
                // hub may have claimed it meanwhile, and must keep it.
                if self.owner(&name).is_none() {
                    self.claim_again(hub, &s);
                }
            }
        }
        self.drop_stale_owner_keys(hub);
    }

    /// Owner keys naming a session of this hub that is no longer here (its
    /// release failed with etcd away, or landed before its claim): other
    /// hubs showed the member connected and sent its requests here, to be
    /// answered 503, for as long as this hub lived. Removed only if they
    /// still hold that value (a newer claim wins).
    fn drop_stale_owner_keys(self: &Arc<Self>, hub: &Hub) {
        for (rel, value, _) in self.store.cached_under("owners/") {
            let Ok(o) = serde_json::from_slice::<Owner>(&value) else {
                continue;
            };
            let name = rel.trim_start_matches("owners/");
            if o.hub != self.id || hub.session(name).is_some_and(|s| s.id == o.session) {
                continue;
            }
            // One removal in flight per key: with etcd away each takes
            // seconds, and reconciling (every second) spawned one more
            // each time, for every such key, into the 16 blocking threads
            // the control socket and logins need too.
            let Some(in_flight) = self.deleting.try_hold(&rel) else {
                continue;
            };
            let st = self.store.clone();
            hub.tasks.spawn(async move {
                let _in_flight = in_flight;
                let name = rel.trim_start_matches("owners/").to_string();
                match tokio::task::spawn_blocking(move || st.delete_if(&rel, &value)).await {
                    Ok(Ok(true)) => {
                        tracing::info!(cluster = %name, "removed this hub's owner key of a session that ended")
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(cluster = %name, "cannot remove a stale owner key yet: {e}")
                    }
                    _ => {}
                }
            });
        }
    }

    /// Where a request for `name`, which has no session here, should go.
    fn route(&self, name: &str, headers: &http::HeaderMap) -> Option<Owner> {
        if headers.contains_key(FORWARDED_HEADER) {
            return None;
        }
        self.owner(name)
            .map(|(o, _)| o)
            .filter(|o| o.hub != self.id)
    }

    /// A kept connection to `peer` ready for a request, if there is one.
    /// Closed ones (the peer's idle timeout, a restart) are dropped; busy
    /// ones (still sending a response) are skipped.
    fn take_idle(&self, peer: &str) -> Option<PeerSender> {
        let mut idle = self.idle.lock().ok()?;
        let kept = idle.get_mut(peer)?;
        let now = std::time::Instant::now();
        kept.prune(|at| now.saturating_duration_since(*at) < PEER_IDLE_FOR);
        let found = kept.take(|_| true);
        if kept.is_empty() {
            idle.remove(peer);
        }
        found
    }

    fn keep(&self, peer: &str, s: PeerSender) {
        if let Ok(mut idle) = self.idle.lock() {
            // Hubs that went away leave nothing behind for long: their
            // connections close and are dropped here.
            // One clock read for all of them.
            let now = std::time::Instant::now();
            idle.retain(|_, kept| {
                kept.prune(|at| now.saturating_duration_since(*at) < PEER_IDLE_FOR);
                !kept.is_empty()
            });
            idle.entry(peer.to_string())
                .or_insert_with(|| KeptConns::new(PEER_IDLE))
                .put(s, now);
        }
    }

    async fn dial(&self, hub: &Hub, peer: &str) -> Result<PeerSender, String> {
        let u = url::Url::parse(peer).map_err(|e| e.to_string())?;
        let host = u.host_str().ok_or("no host")?.to_string();
        let port = u.port_or_known_default().unwrap_or(443);
        let fut = async {
            // Every address of the name, families in turn (one that
            // drops packets took the whole deadline).
            let tcp = crate::tunnel::dial::connect(&host, port)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            // A stream carried to a hub that vanished (a crash, a
            // partition: no FIN, no RST) is found dead by the probes; a
            // watch only read would otherwise wait on it for ever.
            crate::daemon::keepalive(&tcp);
            let name = crate::tunnel::tls::server_name(&host).map_err(|e| e.to_string())?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
            hub.tasks.spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            Ok::<_, String>(sender)
        };
        tokio::time::timeout(Duration::from_secs(5), fut)
            .await
            .map_err(|_| "no answer within 5s".to_string())?
    }
}

fn cut(hub: &Hub, s: &Arc<LiveSession>, why: String) {
    // Once per session: the tick would otherwise repeat it until it ends.
    if s.close_reason.lock().map(|r| r.is_some()).unwrap_or(true) {
        return;
    }
    tracing::info!(cluster = %s.name, "{why}");
    hub.event(&s.name, why.clone());
    let s = s.clone();
    hub.tasks.spawn(async move { s.close(&why).await });
}

/// Reacts to registry changes until `cancel`: operators reload, members
/// and owners reconcile; a tick retries what failed while etcd was away.
pub async fn run(
    hub: Arc<Hub>,
    cluster: Arc<Cluster>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
    cancel: CancellationToken,
) {
    {
        let (c, cancel) = (cluster.clone(), cancel.clone());
        let _ = std::thread::Builder::new()
            .name("etcd-lease".into())
            .spawn(move || c.keep_lease(cancel));
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut hand_off = HandOff::default();
    // Changes that could not be applied yet (their reload failed): retried
    // with every later change, and until then nothing confirms the copy.
    let (mut unapplied_operators, mut unapplied_settings) = (false, false);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                // Leaving: other hubs see our sessions gone at once instead
                // of after the lease's TTL.
                let c = cluster.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    c.store.etcd.lease_revoke(c.lease.load(Ordering::SeqCst))
                })
                .await;
                return;
            }
            ch = changes.recv() => {
                let Some(ch) = ch else { return };
                let mut operators = ch == Change::Operators;
                let mut settings = ch == Change::Settings;
                // A member's labels may have changed on another hub.
                let mut members = matches!(ch, Change::Member(_));
                let confirmed = |c: &Change| match c {
                    Change::Confirmed(at) => Some(*at),
                    _ => None,
                };
                let mut current = confirmed(&ch);
                let mut only_confirmations = current.is_some();
                // Take what else is queued, then act once.
                while let Ok(more) = changes.try_recv() {
                    operators |= more == Change::Operators;
                    settings |= more == Change::Settings;
                    members |= matches!(more, Change::Member(_));
                    only_confirmations &= matches!(more, Change::Confirmed(_));
                    current = confirmed(&more).or(current);
                }
                operators |= unapplied_operators;
                settings |= unapplied_settings;
                unapplied_operators = operators && !hub.reload_operators();
                if settings {
                    // Access rules changed on another hub.
                    unapplied_settings = match hub.load_access() {
                        Ok(()) => false,
                        Err(e) => {
                            tracing::warn!(
                                "cannot load the access rules from etcd: {}",
                                crate::tunnel::escape_for_log(&format!("{e:#}"), 500)
                            );
                            true
                        }
                    };
                }
                if operators || settings || members {
                    hub.recheck_streams();
                }
                // Only now: every change reported before it is applied. A
                // change that could not be applied (an operator list or
                // access rules unreadable: etcd failing, or rules written by
                // a newer hub) leaves the copy unconfirmed, so that past
                // --store-max-stale this hub refuses operators rather than
                // serve them by rules it no longer has.
                if let (Some(at), false) = (current, unapplied_operators || unapplied_settings) {
                    hub.registry_confirmed(at);
                }
                if !only_confirmations {
                    cluster.reconcile(&hub);
                }
            }
            _ = tick.tick() => {
                hub.check_stale();
                hand_off.tick(&hub, &cluster);
                cluster.tend_admins(&hub);
                announce_hub_list(&hub);
                cluster.reconcile(&hub);
            }
        }
    }
}

/// How often a hub cut off from etcd ([`HandOff`]) asks the other hubs
/// whether one of them reaches etcd: the first answer after it is cut off
/// is most often "not since you" (the others confirm their registry
/// every sixth of their limit), and members wait for the next.
const HAND_OFF_EVERY: Duration = Duration::from_secs(2);

/// Longest wait for one other hub's answer to `/readyz`.
const READY_DEADLINE: Duration = Duration::from_secs(2);

/// Rounds in a row without another hub that reaches etcd before a hub
/// handing its agents off takes them again: one slow answer (the other
/// hub busy taking the agents) does not bounce them back.
const HAND_OFF_MISSES: u32 = 5;

/// Times one member's agent is sent on during one hand-off: an agent that
/// reaches no other hub (its join command names only this one, or the
/// others are out of its reach) comes back, and is kept after that.
const HAND_OFF_TRIES: u32 = 3;

/// The header of the gateway's `/readyz` answer on a hub on etcd: how long
/// ago it last surely reached etcd, its registry confirmed current and its
/// lease renewed ([`Hub::etcd_age`]), in milliseconds.
pub const REGISTRY_AGE_HEADER: &str = "x-towerctl-registry-age-ms";

/// Moves a cut-off hub's agents to a hub that reaches etcd.
///
/// A hub is cut off from etcd once its lease has expired there (no
/// renewal answered for [`LEASE_TTL`]): its `hubs/<id>` record and owner
/// keys are gone with it, so the other hubs no longer route to the members
/// whose agents it holds, and those members are out of reach of every
/// operator not on this hub. Past `--store-max-stale` it also refuses
/// operators ([`Hub::stale_refusal`]), and with them every request other
/// hubs would forward. So while cut off, it asks the other hubs' gateways
/// for `/readyz` every [`HAND_OFF_EVERY`], and takes one for a hub that
/// reaches etcd only if that hub confirmed its registry, and had its own
/// lease renewed, after this one was cut off (its [`REGISTRY_AGE_HEADER`]
/// is below the time since then): in an outage of etcd for all, each hub's
/// last confirmation predates that (hubs renew every [`KEEPALIVE`] and
/// confirm their registry every sixth of their limit), so the first hub
/// to lose its lease does not move its agents to hubs about to lose theirs
/// too. Before it starts, it tries one renewal of its lease itself: etcd
/// may be back, and after a long outage for all, the first hub to hear
/// from it again is found by the others before they confirm their own
/// registries. While it hands off, this hub closes its agents'
/// sessions (not as revoked: each dials the next hub of its join command,
/// or its load balancer again), sends on each agent logging in, at most
/// [`HAND_OFF_TRIES`] times per member (an agent that reaches no other hub
/// comes back and is kept), and answers 503 on its tunnel listener's
/// `/readyz` so that a load balancer sends agents elsewhere. After
/// [`HAND_OFF_MISSES`] rounds without such a hub, or once it reaches etcd
/// again, it takes agents as before.
#[derive(Default)]
struct HandOff {
    next: Option<tokio::time::Instant>,
    asking: Arc<std::sync::atomic::AtomicBool>,
    misses: Arc<std::sync::atomic::AtomicU32>,
}

/// Why a hub hands its agents off ([`HandOff`]).
#[derive(Debug, Clone, Copy, PartialEq)]
struct CutOff {
    /// How long ago it was cut off: a hub that reaches etcd confirmed its
    /// registry more recently than that.
    since: Duration,
    /// Past `--store-max-stale` (it refuses operators), not only without
    /// its lease.
    stale: bool,
}

/// Whether, and since when, `hub` is cut off from etcd (see [`HandOff`]).
fn cut_off(hub: &Hub, cluster: &Cluster) -> Option<CutOff> {
    let stale = hub
        .max_stale
        .filter(|_| hub.stale_refusal().is_some())
        .map(|max| hub.registry_age().saturating_sub(max));
    let lease = cluster.lease_gone_for();
    if stale.is_none() && lease.is_none() {
        return None;
    }
    Some(CutOff {
        since: stale.unwrap_or_default().max(lease.unwrap_or_default()),
        stale: stale.is_some(),
    })
}

impl HandOff {
    fn tick(&mut self, hub: &Arc<Hub>, cluster: &Arc<Cluster>) {
        let now = tokio::time::Instant::now();
        let Some(cut) = cut_off(hub, cluster) else {
            self.next = None;
            if end_hand_off(hub) {
                tracing::warn!("this hub reaches etcd again: taking agents as before");
            }
            return;
        };
        if self.next.is_some_and(|t| now < t) || self.asking.swap(true, Ordering::SeqCst) {
            return;
        }
        self.next = Some(now + HAND_OFF_EVERY);
        // Cleared however the task ends.
        struct Asking(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Asking {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let asking = Asking(self.asking.clone());
        let (hub, cluster, misses) = (hub.clone(), cluster.clone(), self.misses.clone());
        tokio::spawn(async move {
            let _asking = asking;
            match cluster.peer_reaching_etcd(&hub, cut.since).await {
                Some(peer) => {
                    misses.store(0, Ordering::SeqCst);
                    // Not yet handing off: only if this hub cannot reach
                    // etcd itself now (in an outage for all, the other
                    // hubs may be heard from again first).
                    if !hub.handing_off() && cluster.answers_renewal().await {
                        return;
                    }
                    hand_off(&hub, &cluster, &peer);
                }
                // Ended only after a few rounds without one.
                None if misses.fetch_add(1, Ordering::SeqCst) + 1 >= HAND_OFF_MISSES
                    && end_hand_off(&hub) =>
                {
                    tracing::warn!(
                        "no other hub reaches etcd now: taking agents as before (their members \
                         are reachable through this hub only, and by its own admin only past \
                         --store-max-stale, until it reaches etcd again)"
                    );
                }
                None => {}
            }
        });
    }
}

/// Ends a hand-off; whether one was under way.
fn end_hand_off(hub: &Hub) -> bool {
    let mut handed = hub.handed_off.lock().unwrap_or_else(|e| e.into_inner());
    handed.clear();
    hub.handing_off.swap(false, Ordering::SeqCst)
}

/// Sends this hub's agents to the others, `peer` reaching etcd (see
/// [`HandOff`]).
fn hand_off(hub: &Hub, cluster: &Cluster, peer: &str) {
    let first = {
        let _turn = hub.handed_off.lock().unwrap_or_else(|e| e.into_inner());
        // Reached etcd again while the others were asked: nothing to hand
        // off.
        if cut_off(hub, cluster).is_none() {
            return;
        }
        !hub.handing_off.swap(true, Ordering::SeqCst)
    };
    // After the flag: a session registered from now on sends itself on.
    let sessions: Vec<Arc<LiveSession>> = hub.live_sessions();
    let mut n = 0;
    for s in sessions {
        if s.close_reason.lock().map(|r| r.is_some()).unwrap_or(true) {
            continue;
        }
        if let Some(why) = hand_off_refusal(hub, &s.name) {
            n += 1;
            hub.tasks.spawn(async move { s.close(&why).await });
        }
    }
    if first {
        tracing::warn!(
            "this hub cannot reach etcd (its lease there last renewed {:.1}s ago) and the hub at \
             {} can: handing {n} agents to the other hubs (each sent on up to \
             {HAND_OFF_TRIES} times, then kept)",
            cluster.lease_age().as_secs_f64(),
            crate::tunnel::escape_for_log(peer, 200)
        );
    } else if n > 0 {
        tracing::info!("handing {n} more agents to the other hubs");
    }
}

/// Why the session of member `name` is closed while this hub hands its
/// agents to other hubs ([`HandOff`]): `None` when it is not, or when the
/// member was sent on [`HAND_OFF_TRIES`] times already (its agent reaches
/// no other hub: kept).
pub(super) fn hand_off_refusal(hub: &Hub, name: &str) -> Option<String> {
    if !hub.handing_off() {
        return None;
    }
    let mut handed = hub.handed_off.lock().ok()?;
    if !hub.handing_off() {
        return None;
    }
    // Bounded by the members this hub holds sessions of.
    let tries = handed.entry(name.to_string()).or_insert(0);
    if *tries >= HAND_OFF_TRIES {
        return None;
    }
    *tries += 1;
    let why = if hub.stale_refusal().is_some() {
        "this towerctl hub cannot reach etcd and refuses operators \
         (--store-max-stale): reconnect to another hub of the group"
    } else {
        "this towerctl hub cannot reach etcd (its lease there expired, so the other hubs \
         no longer route to it): reconnect to another hub of the group"
    }
    .to_string();
    hub.event(name, why.clone());
    Some(why)
}

/// Sends `hubs`, the hub group's tunnel URLs, to the agent of `s` if it
/// takes them ([`crate::tunnel::TARGET_HUBS`]); nothing without.
pub(super) fn send_hub_list(hub: &Hub, s: &LiveSession, hubs: Vec<String>) {
    if !s.takes_hub_list || hubs.is_empty() {
        return;
    }
    let handle = s.handle.clone();
    hub.tasks.spawn(async move {
        let open =
            handle.channel_open_forwarded_tcpip(crate::tunnel::TARGET_HUBS, 0, hubs.join(" "), 0);
        // The agent refuses this open once it has the list; one that
        // confirms it (a key holder) gets it closed, not kept for good.
        if let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(10), open).await {
            let _ = tokio::time::timeout(Duration::from_secs(1), ch.close()).await;
        }
    });
}

/// On the tick: when the hub group changed (a hub started or left), every
/// agent that takes the list gets the new one, so that one that joined
/// before a hub existed, and stays connected, fails over to it when its
/// own hub dies. Not while this hub's registry is unconfirmed: its view of
/// the group may be old.
fn announce_hub_list(hub: &Hub) {
    if hub.stale_refusal().is_some() {
        return;
    }
    let hubs = hub.group_tunnel_urls();
    {
        let Ok(mut sent) = hub.hub_list_sent.lock() else {
            return;
        };
        if *sent == hubs {
            return;
        }
        sent.clone_from(&hubs);
    }
    let sessions: Vec<Arc<LiveSession>> = hub.live_sessions();
    for s in sessions {
        send_hub_list(hub, &s, hubs.clone());
    }
}

/// Hook for [`Hub::register`].
pub(super) fn registered(hub: &Hub, s: &Arc<LiveSession>) {
    if let Some(c) = hub.cluster.get() {
        c.claim(hub, s);
    }
}

/// Whether requests for `name` through this hub reach its agent on
/// another hub: an owner other than this hub, in a registry view this hub
/// still serves from (its own owner keys may outlive a hand-off it could
/// not record while cut off from etcd).
pub(super) fn reachable_elsewhere(hub: &Hub, name: &str) -> bool {
    hub.stale_refusal().is_none()
        && hub
            .cluster
            .get()
            .is_some_and(|c| c.route(name, &http::HeaderMap::new()).is_some())
}

/// The hub id holding `name` (this hub's own id when it is here).
pub(super) fn holder(hub: &Hub, name: &str) -> Option<String> {
    let c = hub.cluster.get()?;
    if hub.session(name).is_some() {
        return Some(c.id.clone());
    }
    c.owner(name).map(|(o, _)| o.hub)
}

fn unreachable_owner(name: &str, o: &Owner, e: &str) -> String {
    // Registry text (the owner record), shown to operators and logged.
    format!(
        "cluster '{name}' is connected to hub {} ({}), which did not answer this hub: {e}; its agent reconnects to a live hub within one backoff, retry in a few seconds",
        crate::tunnel::printable(&o.hub, 200),
        crate::tunnel::printable(&o.peer, 200)
    )
}

/// Gateway hook: a request for a member held by another hub, carried there.
///
/// `held` is this hub's hold on the request: its stream registration (cut
/// here too when the operator's access is withdrawn, whatever the owner
/// does) and, for an upgrade, its end record, written when the spliced
/// stream ends with the bytes that crossed (it used to be written at once,
/// as 101 with no bytes).
pub(super) async fn forward(
    hub: &Hub,
    name: &str,
    upstream_path: &str,
    mut req: Request<Incoming>,
    held: super::gateway::Held,
) -> Result<Response<Body>, Request<Incoming>> {
    let Some(c) = hub.cluster.get() else {
        return Err(req);
    };
    let Some(owner) = c.route(name, req.headers()) else {
        return Err(req);
    };
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    // The token this hub authenticated, wherever the client put it, is the
    // one the owner authenticates: from `Proxy-Authorization` (a hop-by-hop
    // header) it was lost on the way (401 there), and an `Authorization`
    // the client named in `Connection` was dropped, so the owner took
    // another token from the WebSocket subprotocol (two hubs acting for
    // two operators on one request).
    let token = super::gateway::bearer(req.headers()).map(|t| format!("Bearer {t}"));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    parts.headers.remove(header::AUTHORIZATION);
    parts.headers.remove(header::PROXY_AUTHORIZATION);
    if let Some(v) = token.and_then(|t| HeaderValue::from_str(&t).ok()) {
        parts.headers.insert(header::AUTHORIZATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&c.id) {
        parts.headers.insert(FORWARDED_HEADER, v);
    }
    let authority = url::Url::parse(&owner.peer)
        .ok()
        .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
        .unwrap_or_default();
    if let Ok(v) = HeaderValue::from_str(&authority) {
        parts.headers.insert(header::HOST, v);
    }
    parts.version = http::Version::HTTP_11;
    // Routed by path at the owner, whether the client named the member by
    // path or by TLS server name here.
    let watch = crate::daemon::http::query_flag(parts.uri.query(), "watch");
    let pq = match parts.uri.query() {
        Some(q) => format!("/clusters/{name}{upstream_path}?{q}"),
        None => format!("/clusters/{name}{upstream_path}"),
    };
    match pq.parse() {
        Ok(u) => parts.uri = u,
        Err(_) => {
            return Ok(status_response(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "invalid request path",
            ))
        }
    }
    let unreachable = |e: &str| {
        status_response(
            StatusCode::BAD_GATEWAY,
            "ServiceUnavailable",
            &unreachable_owner(name, &owner, e),
        )
    };
    // The owner may stop holding the member while this waits or streams
    // (frozen past its lease, cut off from etcd: the agent goes to another
    // hub): the request is answered, or the stream ended, then, instead of
    // waiting on a hub that says nothing (an upgrade is cut with it).
    let (mut guard, end) = held;
    let moved = watch_owner(c, name, &owner, &mut guard, upgrade);
    // An upgraded connection is spliced for good: it gets its own.
    let kept = if upgrade {
        None
    } else {
        c.take_idle(&owner.peer)
    };
    let reused = kept.is_some();
    let mut sender = match kept {
        Some(s) => s,
        None => match c.dial(hub, &owner.peer).await {
            Ok(s) => s,
            Err(e) => return Ok(unreachable(&e)),
        },
    };
    let body = body.map_err(|e| Box::new(e) as _).boxed_unsync();
    // Bounded: a kept connection to a hub frozen or cut off since has no
    // other deadline (a partition held the request ~15 minutes, until TCP
    // gave up). Watches, logs and upgrades answer their head at once; a
    // request the member is slow on has the agent's own deadline inside.
    // A request asking the member for longer (`?timeout=`) is given it,
    // up to an hour (`timeout=876000h` lifted the bound).
    let deadline = answer_deadline(upstream_path, parts.uri.query(), upgrade);
    let answered = crate::daemon::http::within(deadline, async {
        match sender
            .try_send_request(Request::from_parts(parts, body))
            .await
        {
            Ok(r) => Ok(r),
            Err(mut e) => match (reused, e.take_message()) {
                // The kept connection was closed under us before the
                // request went out: safe to send it again on a new one,
                // whatever its method.
                (true, Some(req)) => {
                    sender = match c.dial(hub, &owner.peer).await {
                        Ok(s) => s,
                        Err(e) => return Err(e),
                    };
                    sender.send_request(req).await.map_err(|e| e.to_string())
                }
                _ => Err(e.error().to_string()),
            },
        }
    });
    let answered = tokio::select! {
        a = answered => a,
        () = moved.fired.cancelled() => return Ok(moved.answer()),
    };
    let resp = match answered {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Ok(unreachable(&e)),
        Err(_) => {
            return Ok(unreachable(&format!(
                "no answer within {}s",
                deadline.unwrap_or_default().as_secs()
            )))
        }
    };
    if !upgrade {
        c.keep(&owner.peer, sender);
    }
    // The owner registers the stream too and cuts it when access is
    // revoked there; this hub's registration cuts it when revoked here.
    let resp = resp.map(|body| EndsWhenMoved {
        inner: body,
        moved: Some(Box::pin(moved.fired.clone().cancelled_owned())),
        why: moved.why.clone(),
        ended: false,
    });
    Ok(super::gateway::held_response(
        hub,
        client_upgrade,
        resp,
        (guard, end),
        watch.then_some(name),
    ))
}

/// How often a request or stream carried to the hub holding its member
/// looks whether that hub still holds it (the registry's view, kept by
/// its watch: a lookup in memory).
const OWNER_CHECK: Duration = Duration::from_secs(1);

/// Fires when the hub a request or stream was carried to no longer holds
/// its member's session, with the words for the client.
struct Moved {
    fired: CancellationToken,
    why: Arc<std::sync::OnceLock<String>>,
}

impl Moved {
    /// The answer to a request still waiting: 503 with `Retry-After`, so
    /// that client-go sends it again (to the hub holding the member now).
    fn answer(&self) -> Response<Body> {
        let mut resp = status_response(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            self.why.get().map_or("", String::as_str),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        resp
    }
}

/// Watches, for as long as the stream of `guard` lives, whether `owner`
/// still holds `name`'s session as the registry shows it: a hub frozen,
/// or cut off from etcd, past its lease loses its keys and the agent goes
/// to another hub, but the connection to it stays open and silent (a
/// frozen process's kernel still answers TCP), so a watch carried there
/// saw nothing for as long as it was frozen, and a request waited up to
/// its deadline. With `cut`, the stream's own cut fires too (an upgraded
/// stream, which has no body to end).
fn watch_owner(
    c: &Arc<Cluster>,
    name: &str,
    owner: &Owner,
    guard: &mut crate::daemon::streams::StreamGuard,
    cut: bool,
) -> Moved {
    let moved = Moved {
        fired: CancellationToken::new(),
        why: Default::default(),
    };
    let done = CancellationToken::new();
    guard.tie(done.clone());
    let cut = cut.then(|| guard.cut.clone());
    let (c, name, owner) = (c.clone(), name.to_string(), owner.clone());
    let (fired, why) = (moved.fired.clone(), moved.why.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = done.cancelled() => {}
            now = moved_from(&c, &name, &owner) => {
                let _ = why.set(moved_words(&name, &owner, now.as_deref()));
                fired.cancel();
                if let Some(cut) = cut {
                    cut.cancel();
                }
            }
        }
    });
    moved
}

/// Resolves when `name`'s owner key no longer names `owner`'s session,
/// with the hub that holds it now, if one does.
async fn moved_from(c: &Cluster, name: &str, owner: &Owner) -> Option<String> {
    let mut tick = tokio::time::interval(OWNER_CHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match c.owner(name) {
            Some((o, _)) if o.hub == owner.hub && o.session == owner.session => {}
            Some((o, _)) => return Some(o.hub),
            None => return None,
        }
    }
}

fn moved_words(name: &str, owner: &Owner, now: Option<&str>) -> String {
    let was = crate::tunnel::printable(&owner.hub, 200);
    match now {
        Some(now) => format!(
            "cluster '{name}' is no longer held by hub '{was}', which carried this (it stopped answering, lost etcd, or its agent reconnected): its agent is now on hub '{}'; run the command again",
            crate::tunnel::printable(now, 200)
        ),
        None => format!(
            "cluster '{name}' is no longer held by hub '{was}', which carried this (it stopped answering, lost etcd, or its agent left): run the command again once the member is connected ('towerctl cluster list')"
        ),
    }
}

/// A body from the hub holding the member, ended with an error when that
/// hub no longer holds it ([`Moved`]): the gateway then tells a watch
/// that its stream broke on the way, and the client starts it again.
struct EndsWhenMoved<B> {
    inner: B,
    moved: Option<std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    why: Arc<std::sync::OnceLock<String>>,
    ended: bool,
}

impl<B> http_body::Body for EndsWhenMoved<B>
where
    B: http_body::Body<Data = bytes::Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = bytes::Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, std::io::Error>>> {
        use std::future::Future;
        let this = &mut *self;
        if this.ended {
            return std::task::Poll::Ready(None);
        }
        if let Some(m) = this.moved.as_mut() {
            if m.as_mut().poll(cx).is_ready() {
                this.moved = None;
                this.ended = true;
                let why = this.why.get().cloned().unwrap_or_default();
                return std::task::Poll::Ready(Some(Err(std::io::Error::other(why))));
            }
        }
        std::pin::Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(std::io::Error::other)))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Why a request for a member held by another hub was not carried there
/// because it came marked as carried already: sent by a client with the
/// marker (which would otherwise read "not connected"), or by a hub whose
/// view was behind while the session moved.
pub(super) fn not_forwarded_again(
    hub: &Hub,
    name: &str,
    headers: &http::HeaderMap,
) -> Option<String> {
    let c = hub.cluster.get()?;
    let (owner, _) = c.owner(name).filter(|(o, _)| o.hub != c.id)?;
    headers.contains_key(FORWARDED_HEADER).then(|| {
        format!(
            "cluster '{name}' is connected to hub '{}', and this request carries {FORWARDED_HEADER} (it was carried between hubs already), so it is not carried again: retry it (without that header, which only hubs send)",
            crate::tunnel::printable(&owner.hub, 200)
        )
    })
}

/// Gateway hook: a CONNECT for a member held by another hub, carried there
/// as a CONNECT with the same token, then spliced.
///
/// `held` keeps the stream registered and audited on this hub while it
/// runs (it used to be neither: no record here, and only the owner's
/// revocation cut it); `active` keeps a multiplexed client connection from
/// counting as idle. `held` comes back when there is no owner to carry to.
/// `early`: how many of the client's first bytes came with the CONNECT
/// (`wire::EARLY_HEADER`, carried on with it).
pub(super) async fn forward_connect(
    hub: &Hub,
    name: &str,
    req: Request<Incoming>,
    held: super::gateway::Carried,
    active: Arc<()>,
    early: u64,
) -> Result<Response<Body>, super::gateway::Carried> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .or_else(|| req.headers().get(header::PROXY_AUTHORIZATION))
        .cloned();
    let (resp, owner) = match connect_owner(hub, name, req.uri(), auth, req.headers()).await {
        None => return Err(held),
        Some(Err(resp)) => {
            held.finish(Some(resp.status()));
            return Ok(resp);
        }
        Some(Ok(r)) => r,
    };
    let mut held = held;
    // Ended when that hub no longer holds the member (see `watch_owner`).
    let moved = match hub.cluster.get() {
        Some(c) => watch_owner(c, name, &owner, held.guard_mut(), false).fired,
        None => CancellationToken::new(),
    };
    // The client's first bytes that came with the CONNECT (`early` of
    // them) went on with it (`connect_owner`): what that hub took, at most
    // those, is said to the client, which sends the rest on the stream.
    let taken = resp
        .headers()
        .get(crate::daemon::wire::EARLY_TAKEN_HEADER)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(|n| n.min(early));
    hub.tasks.spawn(async move {
        let _active = active;
        match tokio::try_join!(hyper::upgrade::on(req), hyper::upgrade::on(resp)) {
            Ok((a, b)) => {
                let mut held = held;
                held.opened();
                held.sent_ahead(taken.unwrap_or(0));
                held.splice(TokioIo::new(a), TokioIo::new(b), moved).await;
            }
            Err(e) => {
                tracing::debug!("forwarded CONNECT failed: {e}");
                // The bytes that went ahead reached the target all the same.
                let mut held = held;
                held.sent_ahead(taken.unwrap_or(0));
                held.finish(Some(StatusCode::BAD_GATEWAY));
            }
        }
    });
    let mut ours = Response::new(full(Default::default()));
    if let Some(n) = taken {
        ours.headers_mut().insert(
            crate::daemon::wire::EARLY_TAKEN_HEADER,
            HeaderValue::from(n),
        );
    }
    Ok(ours)
}

/// A raw stream to `authority` in member `name` through the hub that holds
/// its session, as the operator of `token` (that hub checks it again), for
/// the hub's local forwards. The error names the cause.
pub(super) async fn connect_via_owner(
    hub: &Hub,
    name: &str,
    authority: &str,
    token: &str,
    held: &mut super::gateway::Carried,
) -> Result<TokioIo<hyper::upgrade::Upgraded>, String> {
    let uri: http::Uri = authority.parse().map_err(|e| format!("{e}"))?;
    let auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| e.to_string())?;
    match connect_owner(hub, name, &uri, Some(auth), &http::HeaderMap::new()).await {
        None => Err(super::gateway::no_session(hub, name).2),
        Some(Err(resp)) => {
            let status = resp.status();
            // The reason, bounded: at most the first 4 KiB of it, within
            // 15 s (a hub that sends the head and stalls its body held the
            // local connection), shown printable (it reaches the
            // operator's terminal).
            let mut body = resp.into_body();
            let mut text = Vec::new();
            let read = async {
                while let Some(Ok(frame)) = body.frame().await {
                    if let Ok(d) = frame.into_data() {
                        text.extend_from_slice(&d);
                    }
                    if text.len() >= 4096 {
                        text.truncate(4096);
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(15), read).await;
            Err(format!(
                "{status}: {}",
                crate::tunnel::printable(String::from_utf8_lossy(&text).trim(), 500)
            ))
        }
        Some(Ok((resp, owner))) => {
            // Cut when that hub no longer holds the member (see
            // `watch_owner`), as the gateway's carried streams are.
            if let Some(c) = hub.cluster.get() {
                watch_owner(c, name, &owner, held.guard_mut(), true);
            }
            hyper::upgrade::on(resp)
                .await
                .map(TokioIo::new)
                .map_err(|e| {
                    format!("cluster '{name}': the hub holding it did not switch to a stream: {e}")
                })
        }
    }
}

/// Sends a CONNECT for `uri` to the hub that holds `name`'s session: `None`
/// when no other hub holds it, an answer to pass on when that hub refused
/// or could not be reached, or its 200 answer. `headers` are those of the
/// request being carried (a request another hub forwarded is never
/// forwarded again).
async fn connect_owner(
    hub: &Hub,
    name: &str,
    uri: &http::Uri,
    auth: Option<HeaderValue>,
    headers: &http::HeaderMap,
) -> Option<Result<(Response<Incoming>, Owner), Response<Body>>> {
    let c = hub.cluster.get()?;
    let owner = c.route(name, headers)?;
    let mut out = Request::connect(uri.clone());
    if let Some(a) = auth {
        out = out.header(header::AUTHORIZATION, a);
    }
    if let Some(a) = uri.authority() {
        out = out.header(header::HOST, a.as_str());
    }
    // The client's first bytes (checked by this hub already) go with it.
    if let Some(v) = headers.get(crate::daemon::wire::EARLY_HEADER) {
        let mut v = v.clone();
        v.set_sensitive(true);
        out = out.header(crate::daemon::wire::EARLY_HEADER, v);
    }
    let out = match out
        .header(FORWARDED_HEADER, c.id.as_str())
        .body(full(Default::default()))
    {
        Ok(r) => r,
        Err(e) => return Some(Err(text_response(StatusCode::BAD_REQUEST, &e.to_string()))),
    };
    let mut sender = match c.dial(hub, &owner.peer).await {
        Ok(s) => s,
        Err(e) => {
            return Some(Err(text_response(
                StatusCode::BAD_GATEWAY,
                &unreachable_owner(name, &owner, &e),
            )))
        }
    };
    let resp = match sender.send_request(out).await {
        Ok(r) => r,
        Err(e) => {
            return Some(Err(text_response(
                StatusCode::BAD_GATEWAY,
                &unreachable_owner(name, &owner, &e.to_string()),
            )))
        }
    };
    if resp.status() != StatusCode::OK {
        let (parts, body) = resp.into_parts();
        return Some(Err(Response::from_parts(
            parts,
            body.map_err(|e| Box::new(e) as _).boxed_unsync(),
        )));
    }
    Some(Ok((resp, owner)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_agent_is_sent_on_a_bounded_number_of_times_per_hand_off() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::new(
            Arc::new(crate::daemon::store::MemStore::default()),
            crate::daemon::audit::Auditor::start(dir.path().join("audit.log")),
            String::new(),
            crate::daemon::admission::Caps::from_fd_limit(1024),
        );
        assert_eq!(hand_off_refusal(&hub, "alpha"), None, "not handing off");
        hub.handing_off.store(true, Ordering::SeqCst);
        for n in 1..=HAND_OFF_TRIES {
            let why = hand_off_refusal(&hub, "alpha").unwrap_or_else(|| panic!("try {n}"));
            assert!(why.contains("reconnect to another hub"), "{why}");
        }
        assert_eq!(hand_off_refusal(&hub, "alpha"), None, "kept after that");
        assert!(
            hand_off_refusal(&hub, "beta").is_some(),
            "counted per member"
        );
        assert!(end_hand_off(&hub));
        assert_eq!(hand_off_refusal(&hub, "alpha"), None);
        // A new hand-off counts from zero.
        hub.handing_off.store(true, Ordering::SeqCst);
        assert!(hand_off_refusal(&hub, "alpha").is_some());
        assert!(end_hand_off(&hub));
        assert!(!end_hand_off(&hub), "ended once");
    }
}
