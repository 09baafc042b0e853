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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
}

fn yes() -> bool {
    true
}

impl Member {
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
        }
    }
}

/// An operator allowed to use the gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    #[error("the hub's store at '{path}' cannot be opened: {reason}. Is another hub running with the same data directory?")]
    Open { path: String, reason: String },
    #[error("store operation failed: {0}")]
    Io(String),
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
    /// the record unchanged. `None` when the member does not exist.
    fn update_member(
        &self,
        name: &str,
        f: &mut dyn FnMut(&mut Member) -> bool,
    ) -> Result<Option<Member>, StoreError>;
    fn list_members(&self) -> Result<Vec<Member>, StoreError>;
    /// Registers `m` unless a member of that name exists (then `false`), in
    /// one step against other writers: two `cluster add` of one name (on
    /// two hubs, or two at once on one) used to both succeed, the second
    /// overwriting the first, whose printed join token then failed.
    fn create_member(&self, m: &Member) -> Result<bool, StoreError>;
    fn delete_member(&self, name: &str) -> Result<bool, StoreError>;
    fn operator_by_token_hash(&self, hash: &str) -> Result<Option<Operator>, StoreError>;
    fn put_operator(&self, op: &Operator) -> Result<(), StoreError>;
    fn list_operators(&self) -> Result<Vec<Operator>, StoreError>;
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

/// The embedded redb store.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // The registry holds token hashes: keep it private.
        let _ = std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600));
        // Create the tables so that read transactions never meet a missing one.
        let tx = db.begin_write().map_err(io)?;
        tx.open_table(MEMBERS).map_err(io)?;
        tx.open_table(OPERATORS).map_err(io)?;
        tx.open_table(SETTINGS).map_err(io)?;
        tx.commit().map_err(io)?;
        Ok(RedbStore { db })
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        v: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(v).map_err(io)?;
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut t = tx.open_table(table).map_err(io)?;
            t.insert(key, bytes.as_slice()).map_err(io)?;
        }
        tx.commit().map_err(io)
    }

    fn get<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let t = tx.open_table(table).map_err(io)?;
        match t.get(key).map_err(io)? {
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("{key}: {e}"))),
            None => Ok(None),
        }
    }

    fn list<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let t = tx.open_table(table).map_err(io)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(io)? {
            let (k, v) = row.map_err(io)?;
            out.push(
                serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(format!("{}: {e}", k.value())))?,
            );
        }
        Ok(out)
    }
}

impl Store for RedbStore {
    fn get_member(&self, name: &str) -> Result<Option<Member>, StoreError> {
        self.get(MEMBERS, name)
    }
    fn list_members(&self) -> Result<Vec<Member>, StoreError> {
        self.list(MEMBERS)
    }
    fn create_member(&self, m: &Member) -> Result<bool, StoreError> {
        let bytes = serde_json::to_vec(m).map_err(io)?;
        let tx = self.db.begin_write().map_err(io)?;
        {
            let mut t = tx.open_table(MEMBERS).map_err(io)?;
            if t.get(m.name.as_str()).map_err(io)?.is_some() {
                return Ok(false);
            }
            t.insert(m.name.as_str(), bytes.as_slice()).map_err(io)?;
        }
        tx.commit().map_err(io)?;
        Ok(true)
    }
    fn update_member(
        &self,
        name: &str,
        f: &mut dyn FnMut(&mut Member) -> bool,
    ) -> Result<Option<Member>, StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        let result = {
            let mut t = tx.open_table(MEMBERS).map_err(io)?;
            let current: Option<Member> = match t.get(name).map_err(io)? {
                Some(v) => Some(
                    serde_json::from_slice(v.value())
                        .map_err(|e| StoreError::Corrupt(format!("{name}: {e}")))?,
                ),
                None => None,
            };
            match current {
                None => None,
                Some(mut m) => {
                    if f(&mut m) {
                        let bytes = serde_json::to_vec(&m).map_err(io)?;
                        t.insert(name, bytes.as_slice()).map_err(io)?;
                    }
                    Some(m)
                }
            }
        };
        tx.commit().map_err(io)?;
        Ok(result)
    }
    fn delete_member(&self, name: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        let existed = {
            let mut t = tx.open_table(MEMBERS).map_err(io)?;
            let r = t.remove(name).map_err(io)?;
            r.is_some()
        };
        tx.commit().map_err(io)?;
        Ok(existed)
    }
    fn operator_by_token_hash(&self, hash: &str) -> Result<Option<Operator>, StoreError> {
        self.get(OPERATORS, hash)
    }
    fn put_operator(&self, op: &Operator) -> Result<(), StoreError> {
        self.put(OPERATORS, &op.token_hash, op)
    }
    fn list_operators(&self) -> Result<Vec<Operator>, StoreError> {
        self.list(OPERATORS)
    }
    fn delete_operators(&self, doomed: &dyn Fn(&Operator) -> bool) -> Result<usize, StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        let n = {
            let mut t = tx.open_table(OPERATORS).map_err(io)?;
            let mut keys = Vec::new();
            for row in t.iter().map_err(io)? {
                let (k, v) = row.map_err(io)?;
                if let Ok(op) = serde_json::from_slice::<Operator>(v.value()) {
                    if doomed(&op) {
                        keys.push(k.value().to_string());
                    }
                }
            }
            for k in &keys {
                t.remove(k.as_str()).map_err(io)?;
            }
            keys.len()
        };
        tx.commit().map_err(io)?;
        Ok(n)
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
}

#[cfg(test)]
impl MemStore {
    fn wrote(&self) {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[cfg(test)]
impl Store for MemStore {
    fn get_member(&self, name: &str) -> Result<Option<Member>, StoreError> {
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
}
