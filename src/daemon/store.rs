//! The hub's registry: members, token hashes, operator credentials.
//!
//! Behind the small [`Store`] trait so that a shared backend (Kubernetes
//! CRDs, etcd) can replace the embedded one for replicated hubs. The
//! embedded backend is redb: ACID with copy-on-write pages, so a hub killed
//! with `kill -9` in the middle of a write restarts with the last committed
//! state and nothing corrupted.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

const MEMBERS: TableDefinition<&str, &[u8]> = TableDefinition::new("members");
const OPERATORS: TableDefinition<&str, &[u8]> = TableDefinition::new("operators");
const SETTINGS: TableDefinition<&str, &[u8]> = TableDefinition::new("settings");

/// A member's labels, Kubernetes-style (`env=prod`); rules and selectors
/// are in `labels.rs`.
pub type Labels = std::collections::BTreeMap<String, String>;

/// A registered member cluster.
///
/// A record with a field this hub does not know (a newer hub's, such as a
/// new restriction) does not decode: that member is refused on this hub
/// (its reads fail closed) and its record is left as it is, never written
/// back without the field.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub name: String,
    /// Hash of the current join token (never the token itself).
    pub token_hash: String,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds of the last time an agent session ended.
    #[serde(default)]
    pub last_seen: Option<u64>,
    #[serde(default)]
    pub agent_version: Option<String>,
    /// Unix seconds after which the join token is refused; `None`: never.
    #[serde(default)]
    pub token_expires_at: Option<u64>,
    /// A single-use token is spent by the first successful join.
    #[serde(default = "yes")]
    pub single_use: bool,
    #[serde(default)]
    pub token_used: bool,
    /// The agent's public key (OpenSSH format), registered at its first
    /// join; reconnects authenticate with it.
    #[serde(default)]
    pub agent_key: Option<String>,
    /// Revoked members are refused until removed and added again.
    #[serde(default)]
    pub revoked: bool,
    /// The member allows impersonating operators (the agent also has to).
    #[serde(default)]
    pub impersonate: bool,
    /// Push mode: hub-side `HOST:PORT` the member's workloads may reach,
    /// by name.
    #[serde(default)]
    pub exposes: std::collections::BTreeMap<String, String>,
    /// Labels for selecting members (`towerctl kubectl -l env=prod`).
    #[serde(default)]
    pub labels: Labels,
    /// Fingerprints of the agent keys `cluster rotate --new-key` retired
    /// (the last [`RETIRED_KEYS`]): refused with a new join token too, or
    /// the member's next join registered the retired (perhaps copied) key
    /// again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired_keys: Vec<String>,
}

/// How many retired agent keys a member remembers.
pub const RETIRED_KEYS: usize = 16;

fn yes() -> bool {
    true
}

impl Member {
    /// No agent ever logged in to this record (no key registered, never
    /// seen): a new registration, whatever a hub still holds of an earlier
    /// member of the name (removed and added again).
    pub fn never_joined(&self) -> bool {
        self.agent_key.is_none() && self.last_seen.is_none()
    }

    pub fn new(name: &str, token_hash: String, created_at: u64) -> Member {
        Member {
            name: name.to_string(),
            token_hash,
            created_at,
            last_seen: None,
            agent_version: None,
            token_expires_at: None,
            single_use: true,
            token_used: false,
            agent_key: None,
            revoked: false,
            impersonate: false,
            exposes: Default::default(),
            labels: Default::default(),
            retired_keys: Vec::new(),
        }
    }
}

/// An operator allowed to use the gateway. As with [`Member`], a record
/// with a field this hub does not know does not decode: that operator's
/// token is refused here.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    pub name: String,
    pub token_hash: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub created_at: u64,
    /// For the local admin's rows: the hub whose `admin.token` this is
    /// ("local" alone, `HOST:GATEWAY_PORT` with several hubs), so that a
    /// hub replaces its own old admin token and no other hub's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `reason` ends with what to do about it ([`open_failure`]).
    #[error("the hub's store at '{path}' cannot be opened: {reason}")]
    Open { path: String, reason: String },
    #[error("the hub's store at '{path}' failed a write earlier (a full disk or another I/O error) and cannot be reopened: {reason}. Free space on that disk, then retry (the hub tries to reopen it at every operation) or restart the hub")]
    Reopen { path: String, reason: String },
    #[error("store operation failed: {0}")]
    Io(String),
    /// The shared registry (etcd) did not answer at all: worth waiting for.
    #[error("{0}")]
    Unreachable(String),
    #[error("a stored record is corrupt: {0}")]
    Corrupt(String),
}

fn io(e: impl std::fmt::Display) -> StoreError {
    StoreError::Io(e.to_string())
}

/// The registry interface the hub needs.
pub trait Store: Send + Sync + 'static {
    fn get_member(&self, name: &str) -> Result<Option<Member>, StoreError>;
    /// Read-modify-write of one member in a single transaction, so checks
    /// such as "this single-use token is unused" and marking it used
    /// cannot interleave with another writer. `f` returns `false` to leave
    /// the record unchanged. `None` when the member does not exist. `f`
    /// may be called more than once: a backend retries a transaction that
    /// failed before it committed.
    fn update_member(
        &self,
        name: &str,
        f: &mut dyn FnMut(&mut Member) -> bool,
    ) -> Result<Option<Member>, StoreError>;
    fn list_members(&self) -> Result<Vec<Member>, StoreError>;
    /// The members whose records this hub can read, and the names of
    /// those it cannot (logged, [`readable_member`]): what lists, metrics
    /// and stream rechecks go on with. One unreadable record (a newer
    /// hub's, a hand edit) emptied every list, and each recheck cut every
    /// operator's streams to every member.
    fn list_readable_members(&self) -> Result<(Vec<Member>, Vec<String>), StoreError> {
        Ok((self.list_members()?, Vec::new()))
    }
    /// Registers `m` unless a member of that name exists (then `false`), in
    /// one step against other writers: two `cluster add` of one name (on
    /// two hubs, or two at once on one) used to both succeed, the second
    /// overwriting the first, whose printed join token then failed.
    fn create_member(&self, m: &Member) -> Result<bool, StoreError>;
    fn delete_member(&self, name: &str) -> Result<bool, StoreError>;
    fn operator_by_token_hash(&self, hash: &str) -> Result<Option<Operator>, StoreError>;
    fn put_operator(&self, op: &Operator) -> Result<(), StoreError>;
    /// Adds `op` unless an operator of its name exists (then `false`), in
    /// one step against other writers: two `operator add` of one name at
    /// once (on two hubs, or on one over etcd) both succeeded, one name
    /// with two tokens of different groups. A record this hub cannot read
    /// is an error (the name may be in it).
    fn create_operator(&self, op: &Operator) -> Result<bool, StoreError>;
    fn list_operators(&self) -> Result<Vec<Operator>, StoreError>;
    /// The operators whose records this hub can read, the others logged
    /// and left out ([`readable_operator`]): what the hub authenticates
    /// with. Changes (a name taken, tokens removed) read the strict list,
    /// which fails on a record it cannot read.
    fn list_readable_operators(&self) -> Result<Vec<Operator>, StoreError> {
        self.list_operators()
    }
    /// Removes every operator token for which `doomed` holds (all of one
    /// operator's, or a local admin's old ones); returns how many.
    fn delete_operators(&self, doomed: &dyn Fn(&Operator) -> bool) -> Result<usize, StoreError>;
    /// A hub-wide setting (a JSON document such as the access rules).
    fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        let _ = key;
        Ok(None)
    }
    /// Writes a hub-wide setting.
    fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        let _ = (key, value);
        Err(StoreError::Io(
            "this registry backend cannot store hub settings".into(),
        ))
    }
    /// Read-modify-write of a hub-wide setting, whole against other
    /// writers (other hubs on a shared registry): `f` gets the current
    /// value and returns the new one, or a refusal that changes nothing
    /// (the inner `Err`). `f` may be called again with a newer value.
    /// Here a read then a write: a single hub's callers serialize
    /// themselves (the access rules' lock).
    fn update_setting(
        &self,
        key: &str,
        f: &mut dyn FnMut(Option<&str>) -> Result<String, String>,
    ) -> Result<Result<String, String>, StoreError> {
        let current = self.get_setting(key)?;
        match f(current.as_deref()) {
            Ok(v) => {
                self.put_setting(key, &v)?;
                Ok(Ok(v))
            }
            Err(e) => Ok(Err(e)),
        }
    }
}

/// Opens (or creates) the embedded database; called again to replace a
/// handle that an I/O error poisoned.
type Opener = Box<dyn Fn() -> Result<Database, redb::DatabaseError> + Send + Sync>;

/// What to do about a registry file that cannot be read as one.
const DAMAGED: &str = "Restore it from a backup; or, to start over with an empty registry (every member and operator added again), move it away";

/// Why the registry could not be opened, and what to do about it.
fn open_failure(e: &redb::DatabaseError) -> String {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            format!("{e}. Is another hub running with the same data directory?")
        }
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(_)) => format!("{e}. {DAMAGED}"),
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            format!("{e} (the file is not a registry, or is damaged). {DAMAGED}")
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            format!("{e}. Check the owner and mode of the data directory and of this file: the hub runs as this user")
        }
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::StorageFull =>
        {
            format!("{e}. Free space on that disk, then start the hub again")
        }
        _ => e.to_string(),
    }
}

/// The embedded redb store.
///
/// redb refuses every operation after one failed write (`PreviousIo`:
/// "close and re-open the database"), so a single ENOSPC used to leave the
/// registry read-only until the hub restarted, and an operator could not
/// be revoked once space was freed. The handle therefore sits behind a
/// lock and is replaced when it reports that state: reads take the shared
/// side (an uncontended atomic), only a reopen takes the exclusive one.
pub struct RedbStore {
    path: std::path::PathBuf,
    open: Opener,
    db: std::sync::RwLock<Handle>,
}

struct Handle {
    /// `None` after a reopen failed: the next operation tries again.
    db: Option<Database>,
    /// Bumped at every reopen, so that operations that met the same
    /// poisoned handle reopen it once between them, not once each.
    generation: u64,
}

/// Why one attempt at an operation failed: redb's own errors are kept
/// whole so that the poisoned state is matched by its variant.
enum Fault {
    Redb(redb::Error),
    Store(StoreError),
}

impl Fault {
    fn poisoned(&self) -> bool {
        matches!(self, Fault::Redb(redb::Error::PreviousIo))
    }
}

impl From<Fault> for StoreError {
    fn from(f: Fault) -> StoreError {
        match f {
            Fault::Redb(e) => io(e),
            Fault::Store(e) => e,
        }
    }
}

impl From<StoreError> for Fault {
    fn from(e: StoreError) -> Fault {
        Fault::Store(e)
    }
}

/// Every redb error type an operation meets converts into `redb::Error`,
/// which keeps `PreviousIo` as a variant of its own.
macro_rules! redb_faults {
    ($($t:ty),*) => {$(
        impl From<$t> for Fault {
            fn from(e: $t) -> Fault {
                Fault::Redb(e.into())
            }
        }
    )*};
}
redb_faults!(
    redb::Error,
    redb::StorageError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError
);

fn decode<T: for<'de> Deserialize<'de>>(key: &str, bytes: &[u8]) -> Result<T, Fault> {
    serde_json::from_slice(bytes).map_err(|e| Fault::Store(StoreError::Corrupt(corrupt(key, &e))))
}

/// Why the record at `key` does not decode, for a log line: the key and
/// serde's words (which quote the record's unknown field names) escaped.
pub(crate) fn corrupt(key: &str, e: &serde_json::Error) -> String {
    crate::tunnel::escape_for_log(&format!("{key}: {e}"), 400)
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, Fault> {
    serde_json::to_vec(v).map_err(|e| Fault::Store(io(e)))
}

/// Whether `f` has bytes and every one of them is zero: a registry file
/// created and never written. A registry redb wrote starts with its magic
/// number, so only such a file is read past its first block.
fn never_written(f: &std::fs::File) -> std::io::Result<bool> {
    use std::io::Read;
    if f.metadata()?.len() == 0 {
        return Ok(false);
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut r = f;
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            return Ok(true);
        }
        if buf[..n].iter().any(|b| *b != 0) {
            return Ok(false);
        }
    }
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let file = path.to_path_buf();
        RedbStore::open_with(
            path,
            Box::new(move || {
                // Made private from its first byte (the registry holds token
                // hashes): created with the umask and chmod'ed after, it was
                // readable for a moment where the data directory is not
                // private (a volume mounted by a pod).
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .read(true)
                    .write(true)
                    .mode(0o600)
                    .open(&file)?;
                // A first start on a full disk leaves the file redb sized
                // and never wrote: zeros, which it refuses as damaged on
                // every later start (a pod in CrashLoopBackOff once the
                // volume had room). It held nothing: made anew. Not where
                // a hub ran before (its host key, made after the registry
                // at the first start, is there): a registry that reads
                // back as zeros there was lost, and is refused as damaged
                // (a first version made it anew, every member and operator
                // gone with a line at info).
                let ran_here = file.with_file_name("host_key").exists();
                if !ran_here && never_written(&f)? {
                    tracing::info!(
                        "the registry file '{}' holds no data (a first start that failed, on a full disk say): creating it anew",
                        crate::tunnel::escape_for_log(&file.display().to_string(), 300)
                    );
                    f.set_len(0)?;
                }
                drop(f);
                Database::create(&file)
            }),
        )
    }

    /// [`RedbStore::open`] with the database opened by `open`, which the
    /// tests use to put a disk that fills up under it.
    fn open_with(path: &Path, open: Opener) -> Result<Self, StoreError> {
        // redb asserts on some damaged files (one cut short) instead of
        // answering an error: said as a damaged registry, not a daemon
        // that exited with code 101.
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(&open));
        let db = match opened {
            Ok(r) => r.map_err(|e| StoreError::Open {
                path: path.display().to_string(),
                reason: open_failure(&e),
            })?,
            Err(_) => {
                return Err(StoreError::Open {
                    path: path.display().to_string(),
                    reason: format!(
                        "the file is damaged (the database library stopped on it). {DAMAGED}"
                    ),
                })
            }
        };
        // The registry holds token hashes: keep it private.
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        let store = RedbStore {
            path: path.to_path_buf(),
            open,
            db: std::sync::RwLock::new(Handle {
                db: Some(db),
                generation: 0,
            }),
        };
        // Create the tables so that read transactions never meet a missing one.
        store.run(|db| {
            let tx = begin_write(db)?;
            tx.open_table(MEMBERS)?;
            tx.open_table(OPERATORS)?;
            tx.open_table(SETTINGS)?;
            tx.commit()?;
            Ok(())
        })?;
        Ok(store)
    }

    /// The handle, shared. A panic while it was held (in a caller's
    /// `update_member` closure) leaves nothing half-done: redb aborts a
    /// transaction that is dropped uncommitted, so the poison is ignored.
    fn handle(&self) -> std::sync::RwLockReadGuard<'_, Handle> {
        self.db
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `op` on the database; if the handle is poisoned by an earlier
    /// I/O error, reopens it and runs `op` once more. `op` runs whole
    /// under the shared lock, so no transaction outlives a handle.
    fn run<T>(&self, mut op: impl FnMut(&Database) -> Result<T, Fault>) -> Result<T, StoreError> {
        let seen = {
            let h = self.handle();
            if let Some(db) = &h.db {
                match op(db) {
                    Err(f) if f.poisoned() => {}
                    done => return done.map_err(|f| self.fault(f)),
                }
            }
            h.generation
        };
        self.reopen(seen)?;
        let h = self.handle();
        match &h.db {
            Some(db) => op(db).map_err(|f| self.fault(f)),
            // Another operation's reopen failed in between.
            None => Err(self.reopen_failed("another operation's attempt failed")),
        }
    }

    /// `f` as said to whoever asked: an I/O error names the file and
    /// what to do.
    fn fault(&self, f: Fault) -> StoreError {
        match f {
            Fault::Redb(redb::Error::Io(e)) => StoreError::Io(format!(
                "the hub's store at '{}' failed: {e}. Free space on that disk or fix the error, then retry",
                self.path.display()
            )),
            f => f.into(),
        }
    }

    /// Replaces the handle of generation `seen`, unless another operation
    /// already did.
    fn reopen(&self, seen: u64) -> Result<(), StoreError> {
        let mut h = self
            .db
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if h.generation != seen && h.db.is_some() {
            return Ok(());
        }
        // The old handle holds the file's lock: it goes first.
        h.db = None;
        h.generation += 1;
        match (self.open)() {
            Ok(db) => {
                tracing::warn!(
                    "the hub's store at '{}' was reopened after an earlier I/O error",
                    self.path.display()
                );
                h.db = Some(db);
                Ok(())
            }
            Err(e) => Err(self.reopen_failed(&e.to_string())),
        }
    }

    fn reopen_failed(&self, reason: &str) -> StoreError {
        StoreError::Reopen {
            path: self.path.display().to_string(),
            reason: reason.to_string(),
        }
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        v: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(v).map_err(io)?;
        self.run(|db| {
            let tx = begin_write(db)?;
            {
                let mut t = tx.open_table(table)?;
                t.insert(key, bytes.as_slice())?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn get<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.run(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(table)?;
            match t.get(key)? {
                Some(v) => decode(key, v.value()).map(Some),
                None => Ok(None),
            }
        })
    }

    /// Every row of `table`, each decoded or its error, to `f` with its
    /// key (the lenient lists keep what they can read). Handed over once
    /// read whole: `run` may read again after reopening the store.
    fn each<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        f: &mut dyn FnMut(&str, Result<T, StoreError>),
    ) -> Result<(), StoreError> {
        let rows = self.run(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(table)?;
            let mut rows = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                let r = decode::<T>(k.value(), v.value()).map_err(StoreError::from);
                rows.push((k.value().to_string(), r));
            }
            Ok(rows)
        })?;
        for (k, r) in rows {
            f(&k, r);
        }
        Ok(())
    }

    fn list<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        self.run(|db| {
            let tx = db.begin_read()?;
            let t = tx.open_table(table)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                out.push(decode(k.value(), v.value())?);
            }
            Ok(out)
        })
    }
}

/// An operator record as read from a registry: one this hub cannot decode
/// (a newer hub's shape, a hand edit) is logged and left out, an operator
/// this hub does not know (fails closed for it alone). Failing the whole
/// list instead kept the list read before, in which an operator removed
/// since stayed valid.
pub(crate) fn readable_operator<E: std::fmt::Display>(r: Result<Operator, E>) -> Option<Operator> {
    match r {
        Ok(o) => Some(o),
        Err(e) => {
            // Read again at each reload: a few lines a minute.
            static UNREADABLE: crate::tunnel::LogBudget =
                crate::tunnel::LogBudget::new("unreadable operator records", 10);
            // A decoding error quotes the record's own field names.
            let e = crate::tunnel::escape_for_log(&e.to_string(), 300);
            if UNREADABLE.admit() {
                tracing::warn!("an operator record this hub cannot read is left out (its token is refused here; if it is this hub's own admin, its admin.token is refused until the record is written again): {e}");
            } else {
                tracing::debug!("an operator record this hub cannot read is left out: {e}");
            }
            None
        }
    }
}

/// A member record as read for a list: one this hub cannot decode is
/// logged (under a budget) and named in the second list, not served.
pub(crate) fn readable_member<E: std::fmt::Display>(
    name: &str,
    r: Result<Member, E>,
    unreadable: &mut Vec<String>,
) -> Option<Member> {
    match r {
        Ok(m) => Some(m),
        Err(e) => {
            static UNREADABLE: crate::tunnel::LogBudget =
                crate::tunnel::LogBudget::new("unreadable member records", 10);
            let e = crate::tunnel::escape_for_log(&e.to_string(), 300);
            if UNREADABLE.admit() {
                tracing::warn!("a member record this hub cannot read is left out (the member is refused here until the record is readable; a newer hub's record, or one edited by hand): {e}");
            } else {
                tracing::debug!("a member record this hub cannot read is left out: {e}");
            }
            unreadable.push(name.to_string());
            None
        }
    }
}

/// A write transaction with two-phase commit: the commit slot is written
/// and synced only after the data it points to, so recovery after a crash
/// (`kill -9` included) takes the newest commit by the god byte alone,
/// without redb's checksum-based choice between slots. With the default
/// one-phase commit, `e2e::registry_survives_kill_9_during_writes` saw an
/// acknowledged `cluster add` missing after a `kill -9` and a restart in 2
/// of ~10 runs (redb 3.1.3; not reproduced alone), 0 of 14 after.
/// Registry writes are rare; the extra sync is cheap.
fn begin_write(db: &Database) -> Result<redb::WriteTransaction, redb::TransactionError> {
    let mut tx = db.begin_write()?;
    tx.set_two_phase_commit(true);
    Ok(tx)
}

impl Store for RedbStore {
    fn get_member(&self, name: &str) -> Result<Option<Member>, StoreError> {
        self.get(MEMBERS, name)
    }
    fn list_members(&self) -> Result<Vec<Member>, StoreError> {
        self.list(MEMBERS)
    }
    fn list_readable_members(&self) -> Result<(Vec<Member>, Vec<String>), StoreError> {
        let (mut out, mut unreadable) = (Vec::new(), Vec::new());
        self.each::<Member>(MEMBERS, &mut |k, m| {
            out.extend(readable_member(k, m, &mut unreadable));
        })?;
        Ok((out, unreadable))
    }
    fn create_member(&self, m: &Member) -> Result<bool, StoreError> {
        let bytes = serde_json::to_vec(m).map_err(io)?;
        self.run(|db| {
            let tx = begin_write(db)?;
            {
                let mut t = tx.open_table(MEMBERS)?;
                if t.get(m.name.as_str())?.is_some() {
                    return Ok(false);
                }
                t.insert(m.name.as_str(), bytes.as_slice())?;
            }
            tx.commit()?;
            Ok(true)
        })
    }
    fn update_member(
        &self,
        name: &str,
        f: &mut dyn FnMut(&mut Member) -> bool,
    ) -> Result<Option<Member>, StoreError> {
        self.run(|db| {
            let tx = begin_write(db)?;
            let result = {
                let mut t = tx.open_table(MEMBERS)?;
                let current: Option<Member> = match t.get(name)? {
                    Some(v) => Some(decode(name, v.value())?),
                    None => None,
                };
                match current {
                    None => None,
                    Some(mut m) => {
                        if f(&mut m) {
                            t.insert(name, encode(&m)?.as_slice())?;
                        }
                        Some(m)
                    }
                }
            };
            tx.commit()?;
            Ok(result)
        })
    }
    fn delete_member(&self, name: &str) -> Result<bool, StoreError> {
        self.run(|db| {
            let tx = begin_write(db)?;
            let existed = tx.open_table(MEMBERS)?.remove(name)?.is_some();
            tx.commit()?;
            Ok(existed)
        })
    }
    fn operator_by_token_hash(&self, hash: &str) -> Result<Option<Operator>, StoreError> {
        self.get(OPERATORS, hash)
    }
    fn put_operator(&self, op: &Operator) -> Result<(), StoreError> {
        self.put(OPERATORS, &op.token_hash, op)
    }
    fn create_operator(&self, op: &Operator) -> Result<bool, StoreError> {
        let bytes = serde_json::to_vec(op).map_err(io)?;
        self.run(|db| {
            let tx = begin_write(db)?;
            {
                let mut t = tx.open_table(OPERATORS)?;
                for row in t.iter()? {
                    let (k, v) = row?;
                    let other: Operator = decode(k.value(), v.value())?;
                    if other.name == op.name {
                        return Ok(false);
                    }
                }
                t.insert(op.token_hash.as_str(), bytes.as_slice())?;
            }
            tx.commit()?;
            Ok(true)
        })
    }
    fn list_operators(&self) -> Result<Vec<Operator>, StoreError> {
        self.list(OPERATORS)
    }
    fn list_readable_operators(&self) -> Result<Vec<Operator>, StoreError> {
        let mut out = Vec::new();
        self.each::<Operator>(OPERATORS, &mut |_, o| {
            out.extend(readable_operator(o));
        })?;
        Ok(out)
    }
    fn delete_operators(&self, doomed: &dyn Fn(&Operator) -> bool) -> Result<usize, StoreError> {
        self.run(|db| {
            let tx = begin_write(db)?;
            let n = {
                let mut t = tx.open_table(OPERATORS)?;
                let mut keys = Vec::new();
                for row in t.iter()? {
                    let (k, v) = row?;
                    if let Ok(op) = serde_json::from_slice::<Operator>(v.value()) {
                        if doomed(&op) {
                            keys.push(k.value().to_string());
                        }
                    }
                }
                for k in &keys {
                    t.remove(k.as_str())?;
                }
                keys.len()
            };
            tx.commit()?;
            Ok(n)
        })
    }
    fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.get::<String>(SETTINGS, key)
    }
    fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.put(SETTINGS, key, &value.to_string())
    }
}

/// An in-memory [`Store`] for unit tests of the hub's registry logic; it
/// counts writes, so a test can assert that a path writes nothing.
#[cfg(test)]
#[derive(Default)]
pub struct MemStore {
    members: std::sync::Mutex<std::collections::BTreeMap<String, Member>>,
    operators: std::sync::Mutex<std::collections::BTreeMap<String, Operator>>,
    settings: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    pub writes: std::sync::atomic::AtomicUsize,
    /// Set, member reads and writes fail (a registry that cannot be read).
    pub failing: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl MemStore {
    fn wrote(&self) {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Io("the test made the store fail".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
impl Store for MemStore {
    fn get_member(&self, name: &str) -> Result<Option<Member>, StoreError> {
        self.check()?;
        Ok(self.members.lock().unwrap().get(name).cloned())
    }
    fn create_member(&self, m: &Member) -> Result<bool, StoreError> {
        let mut members = self.members.lock().unwrap();
        if members.contains_key(&m.name) {
            return Ok(false);
        }
        self.wrote();
        members.insert(m.name.clone(), m.clone());
        Ok(true)
    }
    fn update_member(
        &self,
        name: &str,
        f: &mut dyn FnMut(&mut Member) -> bool,
    ) -> Result<Option<Member>, StoreError> {
        self.check()?;
        let mut all = self.members.lock().unwrap();
        let Some(m) = all.get_mut(name) else {
            return Ok(None);
        };
        let mut copy = m.clone();
        if f(&mut copy) {
            self.wrote();
            *m = copy.clone();
        }
        Ok(Some(copy))
    }
    fn list_members(&self) -> Result<Vec<Member>, StoreError> {
        Ok(self.members.lock().unwrap().values().cloned().collect())
    }
    fn delete_member(&self, name: &str) -> Result<bool, StoreError> {
        self.wrote();
        Ok(self.members.lock().unwrap().remove(name).is_some())
    }
    fn operator_by_token_hash(&self, hash: &str) -> Result<Option<Operator>, StoreError> {
        Ok(self.operators.lock().unwrap().get(hash).cloned())
    }
    fn put_operator(&self, op: &Operator) -> Result<(), StoreError> {
        self.wrote();
        self.operators
            .lock()
            .unwrap()
            .insert(op.token_hash.clone(), op.clone());
        Ok(())
    }
    fn create_operator(&self, op: &Operator) -> Result<bool, StoreError> {
        let mut ops = self.operators.lock().unwrap();
        if ops.values().any(|o| o.name == op.name) {
            return Ok(false);
        }
        self.wrote();
        ops.insert(op.token_hash.clone(), op.clone());
        Ok(true)
    }
    fn list_operators(&self) -> Result<Vec<Operator>, StoreError> {
        Ok(self.operators.lock().unwrap().values().cloned().collect())
    }
    fn delete_operators(&self, doomed: &dyn Fn(&Operator) -> bool) -> Result<usize, StoreError> {
        self.wrote();
        let mut ops = self.operators.lock().unwrap();
        let before = ops.len();
        ops.retain(|_, o| !doomed(o));
        Ok(before - ops.len())
    }
    fn get_setting(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.settings.lock().unwrap().get(key).cloned())
    }
    fn put_setting(&self, key: &str, value: &str) -> Result<(), StoreError> {
        self.wrote();
        self.settings
            .lock()
            .unwrap()
            .insert(key.to_string(), value.to_string());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            let m = Member::new("alpha", "sha256:00".into(), 1);
            assert!(s.create_member(&m).unwrap());
            assert!(!s.create_member(&m).unwrap(), "created twice");
            assert_eq!(s.get_member("alpha").unwrap(), Some(m));
            assert_eq!(s.get_member("beta").unwrap(), None);
        }
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.list_members().unwrap().len(), 1);
        let m = s.update_member("alpha", &mut |m| {
            m.token_used = true;
            true
        });
        assert!(m.unwrap().unwrap().token_used);
        assert!(s.get_member("alpha").unwrap().unwrap().token_used);
        assert!(s.update_member("nope", &mut |_| true).unwrap().is_none());
        assert!(s.delete_member("alpha").unwrap());
        assert!(!s.delete_member("alpha").unwrap());
        assert!(s.list_members().unwrap().is_empty());
    }

    /// A file on a disk that can fill up: writes fail with ENOSPC, as they
    /// do on a real full disk, while `full` is set.
    #[derive(Debug)]
    struct Disk {
        file: redb::backends::FileBackend,
        full: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Disk {
        fn check(&self) -> std::io::Result<()> {
            if self.full.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
            }
            Ok(())
        }
    }

    impl redb::StorageBackend for Disk {
        fn len(&self) -> std::io::Result<u64> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            if len > self.file.len()? {
                self.check()?;
            }
            self.file.set_len(len)
        }
        fn sync_data(&self) -> std::io::Result<()> {
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            self.check()?;
            self.file.write(offset, data)
        }
        fn close(&self) -> std::io::Result<()> {
            self.file.close()
        }
    }

    /// Opens `path` on a [`Disk`] that is full while `full` is set.
    fn on_disk(path: &Path, full: &std::sync::Arc<std::sync::atomic::AtomicBool>) -> Opener {
        let (path, full) = (path.to_path_buf(), full.clone());
        Box::new(move || {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            Database::builder().create_with_backend(Disk {
                file: redb::backends::FileBackend::new(file)?,
                full: full.clone(),
            })
        })
    }

    fn operator(name: &str) -> Operator {
        Operator {
            name: name.into(),
            token_hash: format!("sha256:{name}"),
            groups: vec![],
            created_at: 1,
            hub: None,
        }
    }

    #[test]
    fn a_damaged_registry_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        drop(RedbStore::open(&path).unwrap());
        let len = std::fs::metadata(&path).unwrap().len();
        // Cut short (redb stops on an assertion), then not a registry.
        let cut = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        cut.set_len(len / 2).unwrap();
        drop(cut);
        for round in 0..2 {
            let e = RedbStore::open(&path).err().expect("refused").to_string();
            assert!(
                e.contains(&path.display().to_string())
                    && e.contains("Restore it from a backup")
                    && !e.contains("another hub"),
                "round {round}: {e}"
            );
            std::fs::write(&path, vec![0x5a; 3000]).unwrap();
        }
    }

    /// A first start on a full disk leaves a file of zeros (redb sized it
    /// and wrote nothing): the next start makes it anew. It was refused as
    /// damaged on every start after.
    #[test]
    fn a_registry_file_never_written_is_made_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        std::fs::write(&path, vec![0u8; 1_056_768]).unwrap();
        let s = RedbStore::open(&path).expect("a file of zeros is made anew");
        assert!(s
            .create_member(&Member::new("alpha", "sha256:00".into(), 1))
            .unwrap());
        drop(s);
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.list_members().unwrap().len(), 1);
        // One byte that is not zero: not a file redb never wrote.
        let mut bytes = vec![0u8; 1_056_768];
        bytes[500_000] = 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(RedbStore::open(&path).is_err());
        // Zeros where a hub ran before (its host key beside it): a
        // registry lost, refused as damaged, never emptied in silence.
        // (Another directory: redb's lock of the refused file above
        // stays with this process.)
        let ran = dir.path().join("ran");
        std::fs::create_dir(&ran).unwrap();
        std::fs::write(ran.join("host_key"), "key").unwrap();
        let path = ran.join("hub.redb");
        std::fs::write(&path, vec![0u8; 1_056_768]).unwrap();
        let e = RedbStore::open(&path).err().expect("refused").to_string();
        assert!(e.contains("Restore it from a backup"), "{e}");
    }

    /// An operator name is added once: another token of that name is
    /// refused, another name is not.
    #[test]
    fn an_operator_name_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("hub.redb")).unwrap();
        assert!(s.create_operator(&operator("alice")).unwrap());
        let mut again = operator("alice");
        again.token_hash = "sha256:other".into();
        assert!(!s.create_operator(&again).unwrap());
        assert!(s.create_operator(&operator("bob")).unwrap());
        assert_eq!(s.list_operators().unwrap().len(), 2);
    }

    #[test]
    fn an_operator_can_be_revoked_once_a_full_disk_has_space_again() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.redb");
        let full = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = RedbStore::open_with(&path, on_disk(&path, &full)).unwrap();
        s.put_operator(&operator("alice")).unwrap();
        assert!(s
            .create_member(&Member::new("alpha", "sha256:00".into(), 1))
            .unwrap());

        full.store(true, SeqCst);
        let e = s.put_operator(&operator("bob")).unwrap_err().to_string();
        assert!(e.contains("No space left on device"), "{e}");
        // The first failure names the file and what to do too.
        assert!(
            e.contains(&path.display().to_string()) && e.contains("Free space"),
            "{e}"
        );
        // Still full: the poisoned handle cannot be replaced, and the
        // error says what to do.
        let e = s.delete_operators(&|o| o.name == "alice").unwrap_err();
        assert!(matches!(e, StoreError::Reopen { .. }), "{e}");
        let e = e.to_string();
        assert!(
            e.contains("Free space") && e.contains("restart the hub"),
            "{e}"
        );

        // Space is back: the next write goes through, without a restart.
        full.store(false, SeqCst);
        assert_eq!(s.delete_operators(&|o| o.name == "alice").unwrap(), 1);
        s.put_operator(&operator("carol")).unwrap();
        let names: Vec<String> = s
            .list_operators()
            .unwrap()
            .into_iter()
            .map(|o| o.name)
            .collect();
        assert_eq!(names, ["carol"], "bob's failed write left nothing");
        assert!(s.get_member("alpha").unwrap().is_some());

        // And it is on the disk.
        drop(s);
        let s = RedbStore::open(&path).unwrap();
        assert_eq!(s.list_operators().unwrap(), [operator("carol")]);
        assert_eq!(s.list_members().unwrap().len(), 1);
    }
}
