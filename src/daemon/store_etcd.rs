//! The registry in etcd, shared by several active hubs.
//!
//! Key layout under the prefix (default `/towerctl/`):
//!
//! ```text
//! members/<name>     Member (JSON)                     written by any hub
//! operators/<hash>   Operator (JSON)                   written by any hub
//! meta/ca            {"ca.key": …, "ca.crt": …}         created once (create-if-absent)
//! meta/host_key      {"host_key": …}                    created once
//! hubs/<hub id>      {"tunnel_url", "gateway_url"}      under the hub's lease
//! owners/<name>      {"hub", "peer", "session"}         under the owning hub's lease
//! settings/<key>     a hub-wide setting (access rules)  any hub
//! ```
//!
//! Every read comes from a cache of the whole prefix, loaded at start and
//! kept current by one watch stream (resynchronised after a break), so
//! requests never wait on etcd and keep working while it is away. Writes
//! go to etcd; `update_member` is a compare-and-swap on the key's
//! `mod_revision`, retried, so a single-use token is spent once whichever
//! hub sees it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::etcd::{self, Etcd, Event, Kv};
use super::store::{Member, Operator, Store, StoreError};

/// What changed under the prefix, for the hub to react to.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Member(String),
    Operators,
    Owner(String),
    Hubs,
    /// Hub-wide settings (the access rules).
    Settings,
    /// The cache was current as of this instant (every change reported
    /// before this one is in it): a read that needs etcd's quorum listed
    /// the prefix or showed nothing changed since the last event applied.
    /// Never sent for a watch's opening alone (a member of etcd cut off
    /// from its leader still opens one) nor for events delivered (when
    /// they were sent is unknown): every `silence` (the watch's) while
    /// etcd's quorum answers, busy or quiet. In [`boot_ms`].
    Confirmed(u64),
}

#[derive(Default)]
struct Cache {
    /// Keys relative to the prefix → (value, mod_revision).
    kvs: BTreeMap<String, (Vec<u8>, i64)>,
    /// Keys deleted → the revision of their deletion, so that a write
    /// older than it (this hub's own, cached as its answer comes back after
    /// the watch delivered the delete) does not bring the key back, and a
    /// delete does not drop a newer write the watch applied. Emptied by a
    /// full listing; at most [`MAX_TOMBSTONES`], the oldest forgotten.
    deleted: BTreeMap<String, i64>,
    /// The revision of the last full listing: a key it did not hold was
    /// not there then, so a write at or below it (an answer that comes back
    /// after the listing) does not bring it back.
    listed_at: i64,
}

const MAX_TOMBSTONES: usize = 4096;

impl Cache {
    fn put(&mut self, rel: &str, value: Vec<u8>, rev: i64) -> bool {
        let newest = self
            .kvs
            .get(rel)
            .map(|v| v.1)
            .into_iter()
            .chain(self.deleted.get(rel).copied())
            .max()
            .unwrap_or(0);
        if rev < newest || (newest == 0 && rev <= self.listed_at) {
            return false;
        }
        self.deleted.remove(rel);
        self.kvs.insert(rel.to_string(), (value, rev));
        true
    }

    fn delete(&mut self, rel: &str, rev: i64) -> bool {
        if self.kvs.get(rel).is_some_and(|v| v.1 > rev) {
            return false;
        }
        self.kvs.remove(rel);
        let t = self.deleted.entry(rel.to_string()).or_insert(rev);
        *t = (*t).max(rev);
        if self.deleted.len() > MAX_TOMBSTONES {
            // The oldest half goes: a write older than those deletions has
            // long come back.
            let mut revs: Vec<i64> = self.deleted.values().copied().collect();
            revs.sort_unstable();
            let cut = revs[revs.len() / 2];
            self.deleted.retain(|_, r| *r > cut);
        }
        true
    }
}

pub struct EtcdStore {
    pub etcd: Arc<Etcd>,
    pub prefix: String,
    cache: RwLock<Cache>,
    changes: Mutex<Option<tokio::sync::mpsc::UnboundedSender<Change>>>,
    /// The group's shared CA (`meta/ca`) as this hub first saw it: gone or
    /// another one later, the registry under the prefix is not the one the
    /// hub joined (etcd emptied, replaced, or restored from a backup older
    /// than the group).
    /// With the revision it was written at (never changed once written:
    /// written anew, it was gone meanwhile).
    first_ca: Mutex<Option<(Vec<u8>, i64)>>,
    lost_said: std::sync::atomic::AtomicBool,
}

/// What a registry that lost its records makes of members' reads.
const REGISTRY_LOST: &str = "the shared registry in etcd is not the one this hub joined: its CA record (meta/ca) is gone or another (etcd emptied, replaced, or restored from a backup older than this hub group). Members are neither refused nor cut meanwhile (their agents would stop for good); operators it no longer lists are refused. Restore etcd from its backup, or restart the hubs to start afresh on what etcd holds now";

fn err(e: etcd::EtcdError) -> StoreError {
    StoreError::Io(e.to_string())
}

/// Milliseconds on `CLOCK_BOOTTIME`: unlike `Instant` (`CLOCK_MONOTONIC`)
/// it counts a suspend, so a hub woken after hours does not take its cache
/// for minutes old.
pub fn boot_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

fn change_of(rel: &str) -> Option<Change> {
    let (kind, name) = rel.split_once('/')?;
    match kind {
        "members" => Some(Change::Member(name.to_string())),
        "operators" => Some(Change::Operators),
        "owners" => Some(Change::Owner(name.to_string())),
        "hubs" => Some(Change::Hubs),
        "settings" => Some(Change::Settings),
        _ => None,
    }
}

impl EtcdStore {
    /// Connects, loads the whole prefix and starts the watch thread.
    /// Every `silence` (whether the watch is quiet or busy), the watch is
    /// opened again from its last revision after a quorum read confirms
    /// that nothing else changed meanwhile ([`Change::Confirmed`]).
    pub fn open(
        spec: &str,
        prefix: &str,
        tls: &etcd::StoreAccess,
        silence: Duration,
    ) -> Result<Arc<EtcdStore>, StoreError> {
        let etcd = Arc::new(Etcd::new(spec, tls).map_err(StoreError::Io)?);
        let mut prefix = prefix.to_string();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let (rev, kvs) = etcd.range_prefix(&prefix).map_err(|e| match e {
            etcd::EtcdError::Unreachable {
                endpoints,
                reason,
                tls_refused: true,
            } => StoreError::Io(format!(
                "etcd at {endpoints} refused the TLS handshake ({reason}): fix --store-ca, --store-cert and --store-key"
            )),
            etcd::EtcdError::Unreachable { endpoints, reason, .. } => StoreError::Unreachable(format!(
                "etcd at {endpoints} did not answer ({reason}): start etcd, or fix --store (and its TLS flags)"
            )),
            e => StoreError::Io(e.to_string()),
        })?;
        let s = Arc::new(EtcdStore {
            etcd,
            prefix,
            cache: RwLock::new(Cache::default()),
            changes: Mutex::new(None),
            first_ca: Mutex::new(None),
            lost_said: Default::default(),
        });
        s.replace_all(kvs, rev);
        let weak = Arc::downgrade(&s);
        std::thread::Builder::new()
            .name("etcd-watch".into())
            .spawn(move || watch_loop(weak, rev, silence))
            .map_err(|e| StoreError::Io(e.to_string()))?;
        Ok(s)
    }

    /// The cache was current as of `at` (see [`Change::Confirmed`]); not
    /// said of a cache whose lock was poisoned (a change may be missing).
    fn confirm(&self, at: u64) {
        if self.cache.is_poisoned() {
            return;
        }
        if let Ok(c) = self.changes.lock() {
            if let Some(tx) = c.as_ref() {
                let _ = tx.send(Change::Confirmed(at));
            }
        }
    }

    /// Whether nothing under the prefix changed after revision `rev` (the
    /// last event applied) and the cache holds as many keys as etcd: one
    /// linearizable read (only an etcd with its quorum answers) of the
    /// keys written since (etcd filters them by revision but counts every
    /// key in the range). A put since shows as a key, a delete without a
    /// put in the count.
    fn unchanged_since(&self, rev: i64) -> Result<bool, etcd::EtcdError> {
        let v = self.etcd.call(
            "/v3/kv/range",
            &serde_json::json!({
                "key": etcd::b64(self.prefix.as_bytes()),
                "range_end": etcd::b64(&etcd::prefix_end(&self.prefix)),
                "keys_only": true,
                "min_mod_revision": rev.saturating_add(1).to_string(),
            }),
        )?;
        let written = v["kvs"].as_array().is_some_and(|a| !a.is_empty());
        let cached = self.cache.read().map(|c| c.kvs.len() as i64).unwrap_or(-1);
        Ok(!written && etcd::int(&v["count"]) == cached)
    }

    /// Where changes are reported (one receiver).
    pub fn subscribe(&self) -> tokio::sync::mpsc::UnboundedReceiver<Change> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        if let Ok(mut c) = self.changes.lock() {
            *c = Some(tx);
        }
        rx
    }

    fn notify(&self, rel: &str) {
        if let (Some(ch), Ok(c)) = (change_of(rel), self.changes.lock()) {
            if let Some(tx) = c.as_ref() {
                let _ = tx.send(ch);
            }
        }
    }

    pub fn key(&self, rel: &str) -> String {
        format!("{}{rel}", self.prefix)
    }

    fn rel<'a>(&self, key: &'a str) -> Option<&'a str> {
        key.strip_prefix(self.prefix.as_str())
    }

    /// Replaces the cache with a full listing, reporting what differs.
    fn replace_all(&self, kvs: Vec<Kv>, rev: i64) {
        let fresh: BTreeMap<String, (Vec<u8>, i64)> = kvs
            .into_iter()
            .filter_map(|kv| {
                self.rel(&kv.key)
                    .map(|r| (r.to_string(), (kv.value, kv.mod_revision)))
            })
            .collect();
        let changed: Vec<String> = {
            let Ok(mut c) = self.cache.write() else {
                return;
            };
            let mut changed: Vec<String> = c
                .kvs
                .iter()
                .filter(|(k, v)| fresh.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .collect();
            changed.extend(
                fresh
                    .iter()
                    .filter(|(k, v)| c.kvs.get(*k) != Some(*v))
                    .map(|(k, _)| k.clone()),
            );
            c.kvs = fresh;
            c.deleted.clear();
            c.listed_at = rev;
            changed
        };
        for k in changed {
            self.notify(&k);
        }
    }

    fn apply(&self, ev: Event) {
        let rel = match &ev {
            Event::Put(kv) => self.rel(&kv.key),
            Event::Delete { key, .. } => self.rel(key),
        };
        let Some(rel) = rel.map(str::to_string) else {
            return;
        };
        if let Ok(mut c) = self.cache.write() {
            match ev {
                Event::Put(kv) => {
                    c.put(&rel, kv.value, kv.mod_revision);
                }
                Event::Delete { revision, .. } => {
                    c.delete(&rel, revision);
                }
            }
        }
        self.notify(&rel);
    }

    /// Records our own write in the cache at once (read-your-writes).
    fn cached_put(&self, rel: &str, value: Vec<u8>, rev: i64) {
        if let Ok(mut c) = self.cache.write() {
            c.put(rel, value, rev);
        }
    }

    /// Records our own delete, made at revision `rev`.
    fn cached_delete(&self, rel: &str, rev: i64) {
        if let Ok(mut c) = self.cache.write() {
            c.delete(rel, rev);
        }
    }

    /// Why members' records cannot be trusted now: the registry is not
    /// the one this hub joined (see [`REGISTRY_LOST`]). Said in the log
    /// once each time it starts and ends.
    fn lost(&self) -> Option<StoreError> {
        use std::sync::atomic::Ordering;
        // On every member read: the record's revision first, its bytes
        // only when that moved (it never does while the group holds).
        let now_rev = self
            .cache
            .read()
            .ok()
            .and_then(|c| c.kvs.get("meta/ca").map(|v| v.1));
        let lost = match self.first_ca.lock() {
            Ok(mut first) => match (first.as_ref().map(|f| f.1), now_rev) {
                (Some(at), Some(rev)) if rev == at => false,
                (None, None) => false,
                (Some(_), None) => true,
                (None, Some(_)) => {
                    *first = self.cached("meta/ca");
                    false
                }
                (Some(_), Some(_)) => match self.cached("meta/ca") {
                    None => true,
                    Some((ca, _)) if first.as_ref().is_some_and(|f| f.0 != ca) => true,
                    // The same CA written anew: a hub of the group
                    // restarted on the emptied registry put back its copy.
                    // Still lost while no member is listed (a restore
                    // brings them back, and a new group's hubs, all
                    // restarted, never saw one).
                    Some(_) if self.cached_under(MEMBERS).is_empty() => true,
                    now => {
                        *first = now;
                        false
                    }
                },
            },
            Err(_) => false,
        };
        if lost != self.lost_said.swap(lost, Ordering::Relaxed) {
            if lost {
                tracing::error!("{REGISTRY_LOST}");
            } else {
                tracing::warn!("the shared registry's CA record is back: members are read again");
            }
        }
        lost.then(|| StoreError::Unreachable(REGISTRY_LOST.into()))
    }

    /// One cached value and its revision.
    pub fn cached(&self, rel: &str) -> Option<(Vec<u8>, i64)> {
        self.cache.read().ok()?.kvs.get(rel).cloned()
    }

    /// The operator records as etcd holds them now (relative key, value,
    /// revision).
    fn fresh_operators(&self) -> Result<Vec<(String, Vec<u8>, i64)>, StoreError> {
        let (_, kvs) = self.etcd.range_prefix(&self.key(OPERATORS)).map_err(err)?;
        Ok(kvs
            .into_iter()
            .filter_map(|kv| {
                let rel = self.rel(&kv.key)?.to_string();
                Some((rel, kv.value, kv.mod_revision))
            })
            .collect())
    }

    /// Every cached value under `rel_prefix`, by relative key.
    pub fn cached_under(&self, rel_prefix: &str) -> Vec<(String, Vec<u8>, i64)> {
        let Ok(c) = self.cache.read() else {
            return vec![];
        };
        c.kvs
            .range(rel_prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(rel_prefix))
            .map(|(k, v)| (k.clone(), v.0.clone(), v.1))
            .collect()
    }

    fn decode<T: for<'de> serde::Deserialize<'de>>(rel: &str, b: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(b).map_err(|e| StoreError::Corrupt(super::store::corrupt(rel, &e)))
    }

    /// Puts a key (under `lease`, 0 for none) and caches it.
    pub fn put_raw(&self, rel: &str, value: &[u8], lease: i64) -> Result<i64, StoreError> {
        let rev = self.etcd.put(&self.key(rel), value, lease).map_err(err)?;
        self.cached_put(rel, value.to_vec(), rev);
        Ok(rev)
    }

    /// Puts `rel` (under `lease`, 0 for none) unless a key is there, in one
    /// transaction, and caches the outcome: `Ok(revision)` where written,
    /// else what is there (`None`: deleted between the comparison and the
    /// read).
    fn put_if_absent(
        &self,
        rel: &str,
        value: &[u8],
        lease: i64,
    ) -> Result<Result<i64, Option<Kv>>, StoreError> {
        let key = self.key(rel);
        let (ok, rev, v) = self
            .etcd
            .txn(
                vec![etcd::absent(&key)],
                vec![etcd::op_put(&key, value, lease)],
                vec![etcd::op_get(&key)],
            )
            .map_err(err)?;
        if ok {
            self.cached_put(rel, value.to_vec(), rev);
            return Ok(Ok(rev));
        }
        let kv = etcd::txn_range(&v, 0);
        if let Some(kv) = &kv {
            self.cached_put(rel, kv.value.clone(), kv.mod_revision);
        }
        Ok(Err(kv))
    }

    /// Creates `rel` with `value` unless it exists; returns what is there
    /// afterwards (ours or the winner's).
    pub fn create_if_absent(&self, rel: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        match self.put_if_absent(rel, value, 0)? {
            Ok(_) => Ok(value.to_vec()),
            Err(Some(kv)) => Ok(kv.value),
            Err(None) => Err(StoreError::Io(format!(
                "{} vanished while being created",
                self.key(rel)
            ))),
        }
    }

    /// Puts `rel` (under `lease`) unless a key is there: its revision where
    /// written or already holding `value`; `None` where it holds another
    /// value, or none any more (tried again later).
    pub fn put_if_free(
        &self,
        rel: &str,
        value: &[u8],
        lease: i64,
    ) -> Result<Option<i64>, StoreError> {
        Ok(match self.put_if_absent(rel, value, lease)? {
            Ok(rev) => Some(rev),
            Err(kv) => kv.filter(|kv| kv.value == value).map(|kv| kv.mod_revision),
        })
    }

    /// Deletes `rel` if `absent` does not exist, in one transaction;
    /// whether it did.
    pub fn delete_while_absent(&self, rel: &str, absent: &str) -> Result<bool, StoreError> {
        self.delete_when(rel, etcd::absent(&self.key(absent)))
    }

    /// Deletes `rel` if it still holds `value`.
    pub fn delete_if(&self, rel: &str, value: &[u8]) -> Result<bool, StoreError> {
        self.delete_when(rel, etcd::value_is(&self.key(rel), value))
    }

    /// Deletes `rel` if `compare` (an etcd transaction comparison) holds,
    /// in one transaction; whether it did.
    fn delete_when(&self, rel: &str, compare: serde_json::Value) -> Result<bool, StoreError> {
        let (ok, rev, _) = self
            .etcd
            .txn(vec![compare], vec![etcd::op_delete(&self.key(rel))], vec![])
            .map_err(err)?;
        if ok {
            self.cached_delete(rel, rev);
        }
        Ok(ok)
    }

    fn put_json<T: serde::Serialize>(&self, rel: &str, v: &T) -> Result<(), StoreError> {
        let b = serde_json::to_vec(v).map_err(|e| StoreError::Io(e.to_string()))?;
        self.put_raw(rel, &b, 0).map(|_| ())
    }

    fn delete(&self, rel: &str) -> Result<bool, StoreError> {
        let v = self
            .etcd
            .call(
                "/v3/kv/deleterange",
                &serde_json::json!({"key": etcd::b64(self.key(rel).as_bytes())}),
            )
            .map_err(err)?;
        self.cached_delete(rel, etcd::int(&v["header"]["revision"]));
        Ok(etcd::int(&v["deleted"]) > 0)
    }
}

/// Keeps the cache current: watch from `rev + 1`; after a break, list the
/// whole prefix again (reporting what changed meanwhile) and watch anew.
/// Confirmed current (see [`Change::Confirmed`]) by a quorum read every
/// `silence`, whether the watch is quiet or busy.
fn watch_loop(store: std::sync::Weak<EtcdStore>, mut rev: i64, silence: Duration) {
    // Whether to list the whole prefix again; whether after a break.
    let (mut resync, mut broke) = (false, false);
    // When the last quorum read (listing or check) was asked for, answered
    // or not: the next is due `silence` later.
    let checked = std::cell::Cell::new(boot_ms());
    let silence_ms = silence.as_millis() as u64;
    // Bounded by the store's life: the loop ends once the hub drops it.
    while let Some(s) = store.upgrade() {
        if resync {
            let asked = boot_ms();
            checked.set(asked);
            match s.etcd.range_prefix(&s.prefix) {
                Ok((r, kvs)) => {
                    rev = r;
                    s.replace_all(kvs, r);
                    s.confirm(asked);
                    if std::mem::take(&mut broke) {
                        tracing::info!("registry watch resumed at revision {rev}");
                    } else {
                        tracing::debug!("registry listed again at revision {rev}: it changed while being confirmed");
                    }
                }
                Err(e) => {
                    // Twice a second while etcd is out of reach: a line at
                    // warn now and then (an answer past its size cap is
                    // not out of reach, and fails every time).
                    static RESYNC: crate::tunnel::LogBudget =
                        crate::tunnel::LogBudget::new("registry resync failures", 1);
                    if RESYNC.admit() {
                        tracing::warn!("the registry could not be read again (operators are refused once the copy is older than --store-max-stale): {e}");
                    } else {
                        tracing::debug!("registry resync: {e}");
                    }
                    drop(s);
                    std::thread::sleep(Duration::from_millis(500));
                    continue;
                }
            }
        }
        let (etcd, prefix) = (s.etcd.clone(), s.prefix.clone());
        let weak = Arc::downgrade(&s);
        drop(s);
        // Events delivered never confirm the copy by themselves: when a
        // message was sent is unknown (a hub frozen, or starved of CPU,
        // finds a backlog in its socket on waking, whose first message
        // would have confirmed as current a copy still missing the rest,
        // an operator's removal perhaps, while requests queued meanwhile
        // were served). A busy registry is confirmed as a quiet one is: the
        // watch ends once `silence` has passed since the last quorum read.
        let left = || {
            Duration::from_millis(
                silence_ms.saturating_sub(boot_ms().saturating_sub(checked.get())),
            )
        };
        let r = etcd.watch(
            &prefix,
            rev.saturating_add(1),
            silence,
            left,
            |at, events| {
                let Some(s) = weak.upgrade() else {
                    return false;
                };
                for e in events {
                    s.apply(e);
                }
                rev = rev.max(at);
                true
            },
        );
        // Quiet for a while, a connection that died without a word, or a
        // confirmation due: watch again from the last revision seen (etcd
        // replays what came since), no listing needed. Confirmed by a
        // quorum read first: a watch served by a member of etcd cut off
        // from its leader is quiet too.
        if let Err(etcd::WatchError::Silent) = r {
            let Some(s) = store.upgrade() else { return };
            let asked = boot_ms();
            checked.set(asked);
            match s.unchanged_since(rev) {
                Ok(true) => {
                    s.confirm(asked);
                    resync = false;
                }
                // Something the watch did not bring (or not yet): list it
                // all again.
                Ok(false) => resync = true,
                // Tried again `silence` later (the watch, opened again, is
                // served meanwhile).
                Err(e) => {
                    tracing::debug!("registry unconfirmed: {e}");
                    resync = false;
                }
            }
            continue;
        }
        if let Err(etcd::WatchError::Failed(e)) = r {
            tracing::warn!("registry watch broke: {e}; retrying")
        }
        resync = true;
        broke = true;
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A registry watch that brings nothing for this long (at most; less when
/// `--store-max-stale` is under six times it) is opened again from its
/// last revision: a watch connection dropped without a FIN or RST (a NAT
/// or load balancer's idle timeout, a firewall change) otherwise left this
/// hub deaf to every later change, revocations included, while its other
/// etcd calls, each on a new connection, went on working. Changes reach a
/// hub within this bound even then.
pub const WATCH_SILENCE: Duration = Duration::from_secs(20);

const MEMBERS: &str = "members/";
const OPERATORS: &str = "operators/";
/// Beside each setting, the mark of the write that last changed it
/// ([`Store::update_setting`]).
const SETTING_WRITES: &str = "setting-writes/";
/// Claims of operator names ([`Store::create_operator`]).
const OPERATOR_NAMES: &str = "operator-names/";
/// Reads and checks of [`Store::create_operator`] before it gives up
/// (other adds of the name won each time).
const CREATE_ATTEMPTS: usize = 8;

impl Store for EtcdStore {
    fn get_member(&self, name: &str) -> Result<Option<Member>, StoreError> {
        if let Some(e) = self.lost() {
            return Err(e);
        }
        let rel = format!("{MEMBERS}{name}");
        self.cached(&rel)
            .map(|(b, _)| Self::decode(&rel, &b))
            .transpose()
    }
    fn create_member(&self, m: &Member) -> Result<bool, StoreError> {
        let rel = format!("{MEMBERS}{}", m.name);
        let key = self.key(&rel);
        let b = serde_json::to_vec(m).map_err(|e| StoreError::Io(e.to_string()))?;
        let (ok, rev, v) = self
            .etcd
            .txn(
                vec![etcd::absent(&key)],
                vec![etcd::op_put(&key, &b, 0)],
                vec![etcd::op_get(&key)],
            )
            .map_err(err)?;
        if ok {
            self.cached_put(&rel, b, rev);
            return Ok(true);
        }
        // Our own record, byte for byte (its join token's hash is new):
        // an earlier attempt of this very call was applied and its answer
        // lost (a leader change; the call went on to the next endpoint).
        // Said "already registered", the join token printed for it was
        // never shown.
        match etcd::txn_range(&v, 0) {
            Some(kv) if kv.value == b => {
                self.cached_put(&rel, kv.value, kv.mod_revision);
                Ok(true)
            }
            _ => Ok(false),
        }
    }
    fn update_member(
        &self,
        name: &str,
        f: &mut dyn FnMut(&mut Member) -> bool,
    ) -> Result<Option<Member>, StoreError> {
        let rel = format!("{MEMBERS}{name}");
        let key = self.key(&rel);
        // Compare-and-swap on the key's revision: a concurrent writer on
        // another hub makes the transaction fail, and we start over from
        // what it wrote.
        // Not as in `update_setting`: two hubs spending one single-use
        // token write the same bytes, and the second would take the first
        // one's write for its own; `f` decides again on what is there.
        for _ in 0..16 {
            // Absent: the watch brings its deletion to the cache (the
            // read's revision is not known here, and a later write the
            // watch applied must not be dropped).
            let Some(kv) = self.etcd.get(&key).map_err(err)? else {
                return Ok(None);
            };
            let mut m: Member = Self::decode(&rel, &kv.value)?;
            if !f(&mut m) {
                self.cached_put(&rel, kv.value, kv.mod_revision);
                return Ok(Some(m));
            }
            let b = serde_json::to_vec(&m).map_err(|e| StoreError::Io(e.to_string()))?;
            let (ok, rev, _) = self
                .etcd
                .txn(
                    vec![etcd::mod_is(&key, kv.mod_revision)],
                    vec![etcd::op_put(&key, &b, 0)],
                    vec![],
                )
                .map_err(err)?;
            if ok {
                self.cached_put(&rel, b, rev);
                return Ok(Some(m));
            }
        }
        Err(StoreError::Io(format!(
            "member '{name}' is being changed by other hubs; try again"
        )))
    }
    fn list_members(&self) -> Result<Vec<Member>, StoreError> {
        if let Some(e) = self.lost() {
            return Err(e);
        }
        self.cached_under(MEMBERS)
            .into_iter()
            .map(|(k, b, _)| Self::decode(&k, &b))
            .collect()
    }
    fn list_readable_members(&self) -> Result<(Vec<Member>, Vec<String>), StoreError> {
        if let Some(e) = self.lost() {
            return Err(e);
        }
        let (mut out, mut unreadable) = (Vec::new(), Vec::new());
        for (k, b, _) in self.cached_under(MEMBERS) {
            let name = k.strip_prefix(MEMBERS).unwrap_or(&k);
            if let Some(m) =
                super::store::readable_member(name, Self::decode(&k, &b), &mut unreadable)
            {
                out.push(m);
            }
        }
        Ok((out, unreadable))
    }
    fn delete_member(&self, name: &str) -> Result<bool, StoreError> {
        self.delete(&format!("{MEMBERS}{name}"))
    }
    fn operator_by_token_hash(&self, hash: &str) -> Result<Option<Operator>, StoreError> {
        let rel = format!("{OPERATORS}{hash}");
        self.cached(&rel)
            .map(|(b, _)| Self::decode(&rel, &b))
            .transpose()
    }
    fn put_operator(&self, op: &Operator) -> Result<(), StoreError> {
        self.put_json(&format!("{OPERATORS}{}", op.token_hash), op)
    }
    /// Operators are keyed by token hash: no record stands for the name.
    /// So the operators are read at revision R and the name checked, and
    /// the record is written together with a claim of the name
    /// (`operator-names/NAME`) only if that claim was not written after R
    /// (else read and check again): two adds of one name cannot both pass,
    /// adds of other names do not get in each other's way (a compare on
    /// every operator key failed a third of 36 adds of different names at
    /// once). A claim left by a removal (none is removed with its
    /// operator) stands for nothing: the read finds no record of the name.
    fn create_operator(&self, op: &Operator) -> Result<bool, StoreError> {
        let rel = format!("{OPERATORS}{}", op.token_hash);
        let key = self.key(&rel);
        let b = serde_json::to_vec(op).map_err(|e| StoreError::Io(e.to_string()))?;
        let prefix = self.key(OPERATORS);
        let claim = self.key(&format!("{OPERATOR_NAMES}{}", op.name));
        for _ in 0..CREATE_ATTEMPTS {
            let (rev, kvs) = self.etcd.range_prefix(&prefix).map_err(err)?;
            for kv in &kvs {
                let Some(k) = self.rel(&kv.key) else { continue };
                let other: Operator = Self::decode(k, &kv.value)?;
                if other.name == op.name {
                    // Our own record: an earlier attempt of this very call
                    // was applied and its answer lost (a leader change).
                    return Ok(other.token_hash == op.token_hash && kv.value == b);
                }
            }
            let (ok, at, _) = self
                .etcd
                .txn(
                    vec![etcd::not_written_since(&claim, rev)],
                    vec![
                        etcd::op_put(&claim, op.token_hash.as_bytes(), 0),
                        etcd::op_put(&key, &b, 0),
                    ],
                    vec![],
                )
                .map_err(err)?;
            if ok {
                self.cached_put(&rel, b, at);
                return Ok(true);
            }
        }
        Err(StoreError::Io(format!(
            "operator '{}' kept being added elsewhere at the same time ({CREATE_ATTEMPTS} attempts): see 'towerctl operator list', then try again",
            op.name
        )))
    }
    /// Read from etcd itself (a quorum read), not the cache: what changes
    /// read (`operator add`'s name check, `operator rm`) must see a token
    /// another hub wrote a moment ago, which this hub's watch may not have
    /// brought yet (its `rm` reported success and left that token valid).
    fn list_operators(&self) -> Result<Vec<Operator>, StoreError> {
        self.fresh_operators()?
            .into_iter()
            .map(|(k, b, _)| Self::decode(&k, &b))
            .collect()
    }
    fn list_readable_operators(&self) -> Result<Vec<Operator>, StoreError> {
        Ok(self
            .cached_under(OPERATORS)
            .into_iter()
            .filter_map(|(k, b, _)| super::store::readable_operator(Self::decode(&k, &b)))
            .collect())
    }
    fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .cached(&format!("settings/{key}"))
            .map(|(b, _)| String::from_utf8_lossy(&b).into_owned()))
    }
    /// A compare-and-swap on the setting's revision, as `update_member`:
    /// two hubs changing the access rules at once each applied its change
    /// to its own copy and wrote the whole document, so one change (a
    /// `deny`) was silently lost.
    fn update_setting(
        &self,
        key: &str,
        f: &mut dyn FnMut(Option<&str>) -> Result<String, String>,
    ) -> Result<Result<String, String>, StoreError> {
        let rel = format!("settings/{key}");
        let k = self.key(&rel);
        // Each attempt also writes a mark of its own beside the setting.
        // Found in place after its compare failed, the last attempt was
        // applied and its answer lost (the call went on to the next
        // endpoint, whose compare then failed on it): applied again,
        // `access allow` added its rule twice and `access rm` said "no
        // access rule" of the rule it had removed. The same bytes without
        // the mark are another hub's write of the same change (two `access
        // allow` of one rule at once): done again on them, not taken as
        // ours (each said "added" of one rule).
        let mark_key = self.key(&format!("{SETTING_WRITES}{key}"));
        let mut tried: Option<(String, String)> = None;
        for _ in 0..16 {
            let current = self.etcd.get(&k).map_err(err)?;
            if let (Some((t, mark)), Some(kv)) = (&tried, &current) {
                if kv.value == t.as_bytes()
                    && self
                        .etcd
                        .get(&mark_key)
                        .map_err(err)?
                        .is_some_and(|m| m.value == mark.as_bytes())
                {
                    self.cached_put(&rel, kv.value.clone(), kv.mod_revision);
                    return Ok(Ok(t.clone()));
                }
            }
            let text = current
                .as_ref()
                .map(|kv| String::from_utf8_lossy(&kv.value).into_owned());
            let next = match f(text.as_deref()) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            // Nothing to change (a rule that is there already): no write,
            // which would also replace a concurrent writer's mark.
            if let Some(kv) = current.as_ref().filter(|kv| kv.value == next.as_bytes()) {
                self.cached_put(&rel, kv.value.clone(), kv.mod_revision);
                return Ok(Ok(next));
            }
            let cmp = match &current {
                Some(kv) => etcd::mod_is(&k, kv.mod_revision),
                None => etcd::absent(&k),
            };
            let mark =
                crate::tunnel::keys::new_token("w_").map_err(|e| StoreError::Io(e.to_string()))?;
            let (ok, rev, _) = self
                .etcd
                .txn(
                    vec![cmp],
                    vec![
                        etcd::op_put(&k, next.as_bytes(), 0),
                        etcd::op_put(&mark_key, mark.as_bytes(), 0),
                    ],
                    vec![],
                )
                .map_err(err)?;
            if ok {
                self.cached_put(&rel, next.clone().into_bytes(), rev);
                return Ok(Ok(next));
            }
            tried = Some((next, mark));
        }
        Err(StoreError::Io(format!(
            "setting '{key}' is being changed by other hubs; try again"
        )))
    }
    fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.put_raw(&format!("settings/{key}"), value.as_bytes(), 0)
            .map(|_| ())
    }
    fn delete_operators(&self, doomed: &dyn Fn(&Operator) -> bool) -> Result<usize, StoreError> {
        let mut n = 0;
        // Those it can read: a record a newer hub wrote stays as it is (an
        // operator's removal checks the whole list first).
        // By the record's own key, which authentication looks tokens up
        // by: the hash inside a record (a hand edit) may name another key,
        // and its token stayed valid after `operator rm`.
        // As etcd has them now (see `list_operators`), each deleted only
        // as it was read.
        for (k, b, rev) in self.fresh_operators()? {
            let Some(op) = super::store::readable_operator(Self::decode::<Operator>(&k, &b)) else {
                continue;
            };
            if doomed(&op) && self.delete_when(&k, etcd::mod_is(&self.key(&k), rev))? {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod cache_tests {
    use super::Cache;

    /// A write's answer that comes back after the watch delivered a later
    /// delete does not bring the key back; a delete does not drop a later
    /// write; a full listing starts afresh.
    #[test]
    fn writes_and_deletes_apply_in_revision_order_whatever_order_they_come_in() {
        let mut c = Cache::default();
        assert!(c.put("owners/a", b"1".to_vec(), 10));
        assert!(c.delete("owners/a", 12));
        // This hub's own write at 11, cached after the delete at 12.
        assert!(!c.put("owners/a", b"2".to_vec(), 11));
        assert!(!c.kvs.contains_key("owners/a"));
        assert!(c.put("owners/a", b"3".to_vec(), 13));
        // A delete at 12 heard after the write at 13.
        assert!(!c.delete("owners/a", 12));
        assert_eq!(c.kvs["owners/a"], (b"3".to_vec(), 13));
        for i in 0..(super::MAX_TOMBSTONES as i64 + 10) {
            c.delete(&format!("k{i}"), 100 + i);
        }
        assert!(c.deleted.len() <= super::MAX_TOMBSTONES);
        // The newest deletions are those kept.
        assert!(c
            .deleted
            .contains_key(&format!("k{}", super::MAX_TOMBSTONES + 9)));
        // After a listing at 50 without the key, a write at 40 heard late
        // does not bring it back; one at 60 is new.
        c.deleted.clear();
        c.kvs.clear();
        c.listed_at = 50;
        assert!(!c.put("owners/b", b"1".to_vec(), 40));
        assert!(c.put("owners/b", b"2".to_vec(), 60));
    }
}
