//! How the hub decides who an agent is: its registered key, or a join
//! token spent in the same registry transaction that registers the key.

use russh::keys::PublicKey;

use super::Hub;
use crate::daemon::control;
use crate::daemon::names::validate_name;
use crate::daemon::store::Member;
use crate::tunnel::server::{self, Verdict};
use crate::tunnel::{keys, AUTH_PREFIX, REVOKED_PREFIX};

impl server::Authenticator for Hub {
    fn exposed(&self, cluster: &str, name: &str) -> Option<String> {
        self.exposed_lookup(cluster, name)
    }

    fn registry_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        Hub::registry_changes(self)
    }

    fn check_key(&self, name: &str, key: &PublicKey) -> Verdict {
        if validate_name(name).is_err() {
            return Verdict::Reject(None);
        }
        let m = match self.store.get_member(name) {
            Ok(Some(m)) => m,
            Ok(None) => return Verdict::Reject(None),
            Err(e) => return Verdict::Unavailable(format!("the registry cannot be read: {e}")),
        };
        let offered = key.to_openssh().unwrap_or_default();
        match &m.agent_key {
            // Said only to the member's own key: told to anyone signing
            // with a key of their own, it showed which names were revoked.
            Some(k) if keys::ct_eq(k.trim(), offered.trim()) => match m.revoked {
                true => Verdict::Reject(Some(revoked_reason(name))),
                false => Verdict::Accept,
            },
            // Not (or no longer) registered: the agent may still present a token.
            _ => Verdict::Reject(None),
        }
    }

    fn check_token(&self, name: &str, token: &str, proven_key: Option<&PublicKey>) -> Verdict {
        // A name that cannot be registered is refused before the registry
        // is touched (and never echoed: it is the attacker's string).
        if validate_name(name).is_err() {
            return Verdict::Reject(Some(format!(
                "{AUTH_PREFIX}the cluster name is not valid (1-63 lowercase letters, digits and '-')"
            )));
        }
        // The towerctl agent proves its key before it shows a token. A
        // login with a token alone (another SSH client) is refused, the
        // same words for every name: such a session could not be told
        // apart from the next one, nor cut when a key is retired.
        let Some(proven_key) = proven_key else {
            return Verdict::Reject(Some(format!(
                "{AUTH_PREFIX}a join needs the agent's own key proven first; join with 'towerctl join'"
            )));
        };
        let hash = keys::token_hash(token);
        let now = control::now_unix();
        let offered = proven_key.to_openssh().ok();
        let print = keys::fingerprint(proven_key);
        // Read-only first: a refused attempt costs no write transaction.
        match self.store.get_member(name) {
            Ok(Some(m)) => {
                if let Err(v) = judge_token(&m, &hash, now) {
                    if respent(&m, &hash, offered.as_deref()) {
                        return Verdict::Accept;
                    }
                    return v;
                }
                if m.retired_keys.contains(&print) {
                    return Verdict::Reject(Some(format!(
                        "{AUTH_PREFIX}this agent's key was retired on the hub ('towerctl cluster rotate {name} --new-key'): give the agent a new key (remove its key file, which the agent names: agents/{name}.key in towerctl's config directory unless --key-file names another, and towerctl makes a new one; or pass a new --key-file), then run the join command again"
                    )));
                }
            }
            Ok(None) => return wrong_token(name),
            Err(e) => {
                return Verdict::Unavailable(format!(
                    "the registry cannot be read to check a join token: {e}"
                ));
            }
        }
        // The token would be accepted: spend it in one transaction that
        // checks again, so two hubs or two agents cannot both spend it.
        let mut verdict = wrong_token(name);
        let r = self
            .store
            .update_member(name, &mut |m| match judge_token(m, &hash, now) {
                Ok(()) if m.retired_keys.contains(&print) => {
                    verdict = wrong_token(name);
                    false
                }
                Ok(()) => {
                    m.token_used = true;
                    if let Some(k) = &offered {
                        m.agent_key = Some(k.clone());
                    }
                    verdict = Verdict::Accept;
                    true
                }
                Err(_) if respent(m, &hash, offered.as_deref()) => {
                    verdict = Verdict::Accept;
                    false
                }
                Err(v) => {
                    verdict = v;
                    false
                }
            });
        match r {
            Ok(Some(_)) => verdict,
            // Removed meanwhile (the write's compare failed on it, and the
            // decision made before does not stand).
            Ok(None) => wrong_token(name),
            // The token was right but could not be spent (with several
            // hubs: etcd may be unavailable): the agent tries again.
            Err(e) => Verdict::Unavailable(format!(
                "the join could not be recorded in the registry: {e}"
            )),
        }
    }
}

impl Hub {
    fn exposed_lookup(&self, cluster: &str, name: &str) -> Option<String> {
        self.store
            .get_member(cluster)
            .ok()
            .flatten()?
            .exposes
            .get(name)
            .cloned()
    }
}

/// Why `session` may not go on with the key it logged in with, if the
/// registry no longer holds that key for its member: retired by `cluster
/// rotate --new-key`, or the member removed and added again, on any hub
/// (the hub holding the session only hears of it through the registry).
pub(super) fn key_retired(
    m: &crate::daemon::store::Member,
    session: &super::LiveSession,
) -> Option<String> {
    // A session without a key (a token alone, which hubs no longer take)
    // does not stand.
    let same = match (&m.agent_key, &session.key) {
        (Some(k), Some(s)) => keys::ct_eq(k.trim(), s.trim()),
        _ => false,
    };
    (!same).then(|| {
        format!(
            "{}the agent key of cluster '{}' is no longer registered on the hub (retired with 'towerctl cluster rotate {} --new-key', or the cluster removed and added again); join again with the new join token",
            crate::tunnel::AUTH_PREFIX,
            session.name,
            session.name
        )
    })
}

pub(super) fn revoked_reason(name: &str) -> String {
    format!("{REVOKED_PREFIX}cluster '{name}' was revoked on the hub; to let it back, run 'towerctl cluster rm {name}' and 'towerctl cluster add {name}' there and join again")
}

fn wrong_token(name: &str) -> Verdict {
    Verdict::Reject(Some(format!(
        "{AUTH_PREFIX}the join token is wrong or cluster '{name}' is not registered; run the join command printed by 'towerctl cluster add {name}' or 'towerctl cluster rotate {name}' on the hub"
    )))
}

/// Whether this is the agent that spent `m`'s single-use token presenting
/// it again: the same token and the key registered with it, proven in this
/// login. Its first attempt's answer was lost (the login deadline cut the
/// session, or etcd applied the transaction after the hub stopped waiting,
/// and this hub's view has not caught up): it is let in rather than
/// refused for good. The token alone, without that key, still is.
fn respent(m: &Member, hash: &str, offered: Option<&str>) -> bool {
    m.token_used
        && !m.revoked
        && keys::ct_eq(&m.token_hash, hash)
        && match (&m.agent_key, offered) {
            (Some(k), Some(o)) => keys::ct_eq(k.trim(), o.trim()),
            _ => false,
        }
}

/// Whether `hash` is member `m`'s join token and may be spent now.
pub(super) fn judge_token(m: &Member, hash: &str, now: u64) -> Result<(), Verdict> {
    let name = &m.name;
    if !keys::ct_eq(&m.token_hash, hash) {
        return Err(wrong_token(name));
    }
    if m.revoked {
        return Err(Verdict::Reject(Some(revoked_reason(name))));
    }
    if m.single_use && m.token_used {
        return Err(Verdict::Reject(Some(format!(
            "{AUTH_PREFIX}the join token of cluster '{name}' was already used (tokens are single-use; a joined agent reconnects with its key); run 'towerctl cluster rotate {name}' on the hub for a new one"
        ))));
    }
    if let Some(exp) = m.token_expires_at {
        if now >= exp {
            return Err(Verdict::Reject(Some(format!(
                "{AUTH_PREFIX}the join token of cluster '{name}' expired at {}; run 'towerctl cluster rotate {name}' on the hub for a new one",
                crate::daemon::fmt::fmt_unix(exp)
            ))));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    use super::*;
    use crate::daemon::admission::Caps;
    use crate::daemon::store::{MemStore, Store};
    use crate::tunnel::server::Authenticator;

    fn hub(dir: &std::path::Path) -> (Arc<MemStore>, Hub) {
        let store = Arc::new(MemStore::default());
        let hub = Hub::new(
            store.clone(),
            crate::daemon::audit::Auditor::start(dir.join("audit.log")),
            String::new(),
            Caps::from_fd_limit(1024),
        );
        (store, hub)
    }

    fn member(store: &MemStore, name: &str, token: &str, single_use: bool) {
        let mut m = Member::new(name, keys::token_hash(token), control::now_unix());
        m.single_use = single_use;
        assert!(store.create_member(&m).unwrap());
    }

    fn key() -> PublicKey {
        russh::keys::PrivateKey::random(&mut rand::rng(), russh::keys::Algorithm::Ed25519)
            .unwrap()
            .public_key()
            .clone()
    }

    fn refused_with(v: Verdict, needle: &str) {
        match v {
            Verdict::Reject(Some(r)) => assert!(r.contains(needle), "{r}"),
            other => panic!("expected a refusal saying {needle:?}, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_single_use_token_is_spent_once_and_registers_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let (store, hub) = hub(dir.path());
        member(&store, "alpha", "tj_good", true);
        let k = key();
        assert_eq!(hub.check_key("alpha", &k), Verdict::Reject(None));
        assert_eq!(
            hub.check_token("alpha", "tj_good", Some(&k)),
            Verdict::Accept
        );
        // The key now logs in alone; the token is spent.
        assert_eq!(hub.check_key("alpha", &k), Verdict::Accept);
        refused_with(
            hub.check_token("alpha", "tj_good", Some(&key())),
            "already used",
        );
        // A token without a proven key: refused, whatever the name.
        refused_with(
            hub.check_token("alpha", "tj_good", None),
            "key proven first",
        );
        refused_with(hub.check_token("nobody", "tj_x", None), "key proven first");
        // The agent that spent it, presenting it again with its key (its
        // first answer was lost): let in, nothing written.
        let writes = store.writes.load(Ordering::Relaxed);
        assert_eq!(
            hub.check_token("alpha", "tj_good", Some(&k)),
            Verdict::Accept
        );
        assert_eq!(store.writes.load(Ordering::Relaxed), writes);
        assert!(store.get_member("alpha").unwrap().unwrap().token_used);
    }

    /// A registry that cannot be read decides nothing: the login is left
    /// undecided (the connection closed unanswered), not refused, since
    /// agents take a refusal as final and stop for good over the hub's
    /// own fault.
    #[tokio::test]
    async fn a_registry_that_cannot_be_read_refuses_no_agent_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let (store, hub) = hub(dir.path());
        member(&store, "alpha", "tj_good", true);
        let k = key();
        store.failing.store(true, Ordering::SeqCst);
        for v in [
            hub.check_key("alpha", &k),
            hub.check_token("alpha", "tj_good", Some(&k)),
            hub.check_token("alpha", "tj_wrong", Some(&k)),
        ] {
            assert!(matches!(v, Verdict::Unavailable(_)), "{v:?}");
        }
        store.failing.store(false, Ordering::SeqCst);
        assert_eq!(
            hub.check_token("alpha", "tj_good", Some(&k)),
            Verdict::Accept
        );
        assert_eq!(hub.check_key("alpha", &k), Verdict::Accept);
    }

    #[tokio::test]
    async fn refused_tokens_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, hub) = hub(dir.path());
        member(&store, "alpha", "tj_good", true);
        let before = store.writes.load(Ordering::SeqCst);
        refused_with(hub.check_token("alpha", "tj_wrong", Some(&key())), "wrong");
        refused_with(
            hub.check_token("nobody", "tj_good", Some(&key())),
            "not registered",
        );
        // A hostile name is refused without being read or echoed.
        let hostile = format!("a\nFAKE LOG LINE{}", "x".repeat(100_000));
        match hub.check_token(&hostile, "tj_good", Some(&key())) {
            Verdict::Reject(Some(r)) => assert!(!r.contains("FAKE") && r.len() < 200, "{r}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(hub.check_key(&hostile, &key()), Verdict::Reject(None));
        assert_eq!(
            store.writes.load(Ordering::SeqCst),
            before,
            "a refusal wrote to the registry"
        );
    }

    #[tokio::test]
    async fn expired_reusable_and_revoked_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let (store, hub) = hub(dir.path());
        member(&store, "reuse", "tj_r", false);
        assert_eq!(
            hub.check_token("reuse", "tj_r", Some(&key())),
            Verdict::Accept
        );
        assert_eq!(
            hub.check_token("reuse", "tj_r", Some(&key())),
            Verdict::Accept
        );

        member(&store, "old", "tj_o", true);
        store
            .update_member("old", &mut |m| {
                m.token_expires_at = Some(1);
                true
            })
            .unwrap();
        refused_with(hub.check_token("old", "tj_o", Some(&key())), "expired");

        member(&store, "gone", "tj_g", true);
        let k = key();
        assert_eq!(hub.check_token("gone", "tj_g", Some(&k)), Verdict::Accept);
        store
            .update_member("gone", &mut |m| {
                m.revoked = true;
                true
            })
            .unwrap();
        refused_with(hub.check_key("gone", &k), "revoked");
        // Anyone else's key learns nothing of the revocation.
        assert_eq!(hub.check_key("gone", &key()), Verdict::Reject(None));
        // Revoked with no key registered (revoked before any join, or
        // after `rotate --new-key`): a key of anyone's learns nothing.
        store
            .update_member("gone", &mut |m| {
                m.agent_key = None;
                true
            })
            .unwrap();
        assert_eq!(hub.check_key("gone", &key()), Verdict::Reject(None));
    }

    /// A key retired by `rotate --new-key` is refused with the new token
    /// too (the member's next join registered it again, and a copy of it
    /// worked again), naming the fix; another key joins.
    #[tokio::test]
    async fn a_retired_key_cannot_join_again() {
        let dir = tempfile::tempdir().unwrap();
        let (store, hub) = hub(dir.path());
        member(&store, "alpha", "tj_1", true);
        let old = key();
        assert_eq!(
            hub.check_token("alpha", "tj_1", Some(&old)),
            Verdict::Accept
        );
        // What `cluster rotate alpha --new-key` writes.
        store
            .update_member("alpha", &mut |m| {
                let k = russh::keys::PublicKey::from_openssh(m.agent_key.take().unwrap().trim())
                    .unwrap();
                m.retired_keys.push(keys::fingerprint(&k));
                m.token_hash = keys::token_hash("tj_2");
                m.token_used = false;
                true
            })
            .unwrap();
        assert_eq!(hub.check_key("alpha", &old), Verdict::Reject(None));
        refused_with(
            hub.check_token("alpha", "tj_2", Some(&old)),
            "give the agent a new key",
        );
        assert_eq!(
            hub.check_token("alpha", "tj_2", Some(&key())),
            Verdict::Accept
        );
    }
}
