//! The hub's side of the control socket: one request in, one answer out.

use tokio_util::sync::CancellationToken;

use super::auth::revoked_reason;
use super::Hub;
use crate::daemon::control::{self, ClusterAdded, HubStatus, Request, Response};
use crate::daemon::names::{group_problem, validate_name, validate_name_of};
use crate::daemon::store::{Member, Operator};
use crate::tunnel::keys;

pub(super) fn handle(
    hub: &Hub,
    base: &HubStatus,
    cancel: &CancellationToken,
    req: Request,
) -> Response {
    match req {
        // Answered by `control::serve` before it gets here.
        Request::Ping => Response::ok(serde_json::Value::Null),
        // Served by `forward::serve`, which takes the connection over.
        Request::Forward { .. } => Response::err("a forward needs its own connection"),
        Request::Status | Request::Watch { .. } => {
            let mut s = base.clone();
            s.clusters = hub.cluster_statuses();
            s.refusing_operators = hub.stale_refusal();
            Response::ok(s)
        }
        Request::ClusterAdd {
            name,
            ttl_secs,
            reusable,
            impersonate,
            exposes,
            labels,
        } => {
            if let Err(e) = validate_name(&name).and_then(|_| crate::daemon::labels::check(&labels)) {
                return Response::err(e);
            }
            match hub.store.get_member(&name) {
                Ok(Some(m)) if m.revoked => {
                    return Response::err(format!("cluster '{name}' is revoked; run 'towerctl cluster rm {name}' first to register it anew"))
                }
                Ok(Some(_)) => {
                    return Response::err(format!("cluster '{name}' is already registered; 'towerctl cluster rotate {name}' issues a new join token"))
                }
                Ok(None) => {}
                Err(e) => return Response::err(e.to_string()),
            }
            let token = match keys::new_token("tj_") {
                Ok(t) => t,
                Err(e) => return Response::err(e.to_string()),
            };
            let now = control::now_unix();
            let mut m = Member::new(&name, keys::token_hash(&token), now);
            m.token_expires_at = (ttl_secs > 0).then(|| now + ttl_secs);
            m.single_use = !reusable;
            m.impersonate = impersonate;
            m.exposes = exposes.iter().cloned().collect();
            m.labels = labels;
            match hub.store.create_member(&m) {
                Ok(true) => {}
                // Registered meanwhile (another hub, another `cluster add`).
                Ok(false) => return Response::err(format!("cluster '{name}' is already registered; 'towerctl cluster rotate {name}' issues a new join token")),
                Err(e) => return Response::err(e.to_string()),
            }
            tracing::info!(cluster = %name, "member registered");
            hub.event(&name, "registered".into());
            Response::ok(join_info(hub, base, &m, token))
        }
        Request::ClusterRotate {
            name,
            ttl_secs,
            reusable,
            new_key,
        } => {
            let token = match keys::new_token("tj_") {
                Ok(t) => t,
                Err(e) => return Response::err(e.to_string()),
            };
            let now = control::now_unix();
            let hash = keys::token_hash(&token);
            let r = hub.store.update_member(&name, &mut |m| {
                if m.revoked {
                    return false;
                }
                m.token_hash = hash.clone();
                m.token_used = false;
                m.single_use = !reusable;
                m.token_expires_at = (ttl_secs > 0).then(|| now + ttl_secs);
                if new_key {
                    // A possibly compromised agent key is of no use from now
                    // on: the agent must join again with the new token,
                    // and with another key (this one is remembered).
                    if let Some(k) = m.agent_key.take() {
                        if let Ok(k) = russh::keys::PublicKey::from_openssh(k.trim()) {
                            m.retired_keys.push(crate::tunnel::keys::fingerprint(&k));
                            let over = m
                                .retired_keys
                                .len()
                                .saturating_sub(crate::daemon::store::RETIRED_KEYS);
                            m.retired_keys.drain(..over);
                        }
                    }
                }
                true
            });
            match r {
                Ok(Some(m)) if m.revoked => Response::err(format!("cluster '{name}' is revoked; run 'towerctl cluster rm {name}' and 'towerctl cluster add {name}' to register it anew")),
                Ok(Some(m)) => {
                    tracing::info!(cluster = %name, new_key, "join token rotated");
                    hub.event(
                        &name,
                        if new_key {
                            "join token rotated, agent key retired".into()
                        } else {
                            "join token rotated".into()
                        },
                    );
                    if new_key {
                        if let Some(s) = hub.session(&name) {
                            let why = format!("{}the agent key of cluster '{name}' was retired on the hub ('towerctl cluster rotate {name} --new-key'); join again with the new join token", crate::tunnel::AUTH_PREFIX);
                            hub.tasks.spawn(async move { s.close(&why).await });
                        }
                    }
                    Response::ok(join_info(hub, base, &m, token))
                }
                Ok(None) => Response::err(format!("cluster '{name}' is not registered on this hub; register it with 'towerctl cluster add {name}'")),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::ClusterExpose { name, add, remove } => {
            let r = hub.store.update_member(&name, &mut |m| {
                for n in &remove {
                    m.exposes.remove(n);
                }
                for (n, t) in &add {
                    m.exposes.insert(n.clone(), t.clone());
                }
                true
            });
            // Open push connections to what was removed end now.
            hub.registry_changed();
            match r {
                Ok(Some(m)) => Response::ok(m.exposes),
                Ok(None) => {
                    Response::err(format!("cluster '{name}' is not registered on this hub"))
                }
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::ClusterSet { name, impersonate } => {
            let r = hub.store.update_member(&name, &mut |m| {
                if let Some(i) = impersonate {
                    m.impersonate = i;
                }
                true
            });
            match r {
                Ok(Some(m)) => {
                    if let Some(s) = hub.session(&name) {
                        hub.set_impersonation(&s, m.impersonate);
                    }
                    let mode = if m.impersonate {
                        "impersonation required"
                    } else {
                        "agent identity"
                    };
                    tracing::info!(cluster = %name, "member settings changed: {mode}");
                    hub.event(&name, format!("settings changed: {mode}"));
                    Response::ok(serde_json::json!({ "impersonate": m.impersonate }))
                }
                Ok(None) => Response::err(format!(
                    "cluster '{name}' is not registered on this hub"
                )),
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::ClusterLabel { name, set, remove } => {
            match crate::daemon::labels::apply(hub.store.as_ref(), &name, set, &remove) {
                Ok(l) => {
                    // Rules that select by label may now refuse streams
                    // already open to this member.
                    let cut = hub.recheck_streams();
                    if cut > 0 {
                        tracing::info!(cluster = %name, "labels changed; {cut} open streams cut");
                    }
                    Response::ok(l)
                }
                Err(e) => Response::err(e),
            }
        }
        Request::ClusterRevoke { name } => {
            // The key stays registered, refused: its agent is told why (and
            // only its agent: another key is refused without a word).
            let r = hub.store.update_member(&name, &mut |m| {
                m.revoked = true;
                true
            });
            match r {
                Ok(Some(_)) => {
                    if let Some(s) = hub.session(&name) {
                        let reason = revoked_reason(&name);
                        hub.tasks.spawn(async move { s.close(&reason).await });
                    }
                    tracing::info!(cluster = %name, "member revoked");
                    hub.event(&name, "revoked".into());
                    Response::ok(serde_json::json!({}))
                }
                Ok(None) => {
                    Response::err(format!("cluster '{name}' is not registered on this hub"))
                }
                Err(e) => Response::err(e.to_string()),
            }
        }
        Request::ClusterRemove { name } => match hub.store.delete_member(&name) {
            Ok(true) => {
                hub.forget_member(&name);
                if let Some(s) = hub.session(&name) {
                    hub.tasks.spawn(async move {
                        s.close("the cluster was removed from the hub").await;
                    });
                }
                tracing::info!(cluster = %name, "member removed");
                Response::ok(serde_json::json!({}))
            }
            Ok(false) => Response::err(format!("cluster '{name}' is not registered on this hub")),
            Err(e) => Response::err(e.to_string()),
        },
        Request::OperatorAdd { name, groups } => {
            if let Err(e) = validate_name_of("operator", &name) {
                return Response::err(e);
            }
            if let Some(e) = groups.iter().find_map(|g| group_problem(g)) {
                return Response::err(e);
            }
            // Each goes to the member as a header line of its own.
            if groups.len() > MAX_GROUPS {
                return Response::err(format!(
                    "{} groups: an operator may have at most {MAX_GROUPS}; grant the rest through fewer, wider groups in the member's RBAC",
                    groups.len()
                ));
            }
            if name == super::LOCAL_ADMIN {
                return Response::err(format!("'{name}' is the hub's own local operator (admin.token on the hub's machine): give another name"));
            }
            let existing = match hub.store.list_operators() {
                Ok(ops) => ops,
                // Not known to be free: never a second operator of a name.
                Err(e) => return Response::err(e.to_string()),
            };
            if existing.iter().any(|o| o.name == name) {
                return Response::err(format!("operator '{name}' already exists; remove it first with 'towerctl operator rm {name}'"));
            }
            let token = match keys::new_token("top_") {
                Ok(t) => t,
                Err(e) => return Response::err(e.to_string()),
            };
            let op = Operator {
                name: name.clone(),
                token_hash: keys::token_hash(&token),
                groups,
                created_at: control::now_unix(),
                hub: None,
            };
            // Checked above for a clear answer; here in one step against
            // another add of the name (on this hub or another).
            match hub.store.create_operator(&op) {
                Ok(true) => {}
                Ok(false) => return Response::err(format!("operator '{name}' already exists; remove it first with 'towerctl operator rm {name}'")),
                Err(e) => return Response::err(e.to_string()),
            }
            hub.reload_operators();
            tracing::info!(operator = %name, "operator added");
            // What the rules already there give it: a group with rules, or
            // a rule left by an operator of the name removed before.
            let reaches = hub.store.list_members().ok().map(|ms| {
                ms.iter()
                    .filter(|m| hub.decide_labeled(&op, &m.name, &m.labels).allowed)
                    .map(|m| m.name.clone())
                    .collect()
            });
            Response::ok(control::OperatorAdded {
                reaches,
                name,
                token: crate::tunnel::Secret::new(token),
                gateway_url: base.gateway_url.clone(),
                ca_hash: crate::daemon::tls::ca_hash(&base.ca_pem),
            })
        }
        Request::AccessAdd {
            effect,
            subject,
            clusters,
        } => {
            let subject = match crate::daemon::access::Subject::parse(&subject) {
                Ok(s) => s,
                Err(e) => return Response::err(e),
            };
            change_access(hub, |p| p.add(effect, subject.clone(), &clusters))
        }
        Request::AccessRemove { id } => change_access(hub, |p| {
            p.remove(id).ok_or_else(|| {
                format!("no access rule #{id}; 'towerctl access list' shows them")
            })
        }),
        Request::AccessList => match hub.access.read() {
            Ok(p) => match p.unreadable_reason() {
                Some(why) => Response::err(why),
                None => Response::ok(p.rules.clone()),
            },
            Err(_) => Response::err("the access rules are unavailable"),
        },
        Request::OperatorList => match hub.store.list_operators() {
            Ok(ops) => Response::ok(
                ops.into_iter()
                    .map(|o| control::OperatorInfo {
                        name: o.name,
                        groups: o.groups,
                        created_at: o.created_at,
                    })
                    .collect::<Vec<_>>(),
            ),
            Err(e) => Response::err(e.to_string()),
        },
        Request::OperatorRemove { name } if name == super::LOCAL_ADMIN => Response::err(format!(
            "'{name}' is the hub's local admin: it is what 'towerctl use' on the hub machine runs as, and it is recreated from the hub's admin.token at every start, so it cannot be removed; give other people their own operators ('towerctl operator add NAME') instead. To replace its token (it leaked), stop the hub, delete '{}' and start the hub again: the old token stops working", crate::paths::data_dir().join("admin.token").display()
        )),
        // Read whole first: a record this hub cannot read (a newer hub's)
        // may be one of this operator's tokens, which removing the others
        // would leave valid there.
        Request::OperatorRemove { name } => match hub
            .store
            .list_operators()
            .and_then(|_| hub.store.delete_operators(&|o| o.name == name))
        {
            Ok(0) => Response::err(format!(
                "no operator named '{name}'; 'towerctl operator list' shows them"
            )),
            Ok(_) => {
                // Out of the cache first: its token stops working here even
                // if the reload below fails (it would keep the cache).
                let gone = hub.forget_operators(|o| o.name == name);
                hub.reload_operators();
                // Access ends now, not at the operator's next request: its
                // open watches, exec, port-forward and CONNECT streams go
                // (registered by token).
                let cut = hub.streams.cut(|token, _| gone.iter().any(|h| h == token));
                tracing::info!(operator = %name, "operator removed; {cut} open streams cut");
                // Rules by subject outlive the operator (a token is
                // replaced by rm and add again): said, so that a name
                // given to someone else later is not granted unawares.
                let rules: Vec<u64> = hub
                    .access
                    .read()
                    .map(|p| {
                        p.rules
                            .iter()
                            .filter(|r| {
                                matches!(&r.subject, crate::daemon::access::Subject::Operator(n) if *n == name)
                            })
                            .map(|r| r.id)
                            .collect()
                    })
                    .unwrap_or_default();
                Response::ok(serde_json::json!({ "streamsCut": cut, "rulesNaming": rules }))
            }
            Err(e) => Response::err(e.to_string()),
        },
        Request::Disconnect { name } => match hub.session(&name) {
            Some(s) => {
                tracing::info!(cluster = %name, "session cut by an operator");
                hub.tasks
                    .spawn(async move { s.close(control::DISCONNECT_REASON).await });
                Response::ok(serde_json::json!({}))
            }
            None => match hub.store.get_member(&name) {
                Ok(Some(_)) => Response::err(format!("cluster '{name}' is not connected")),
                Ok(None) => {
                    Response::err(format!("cluster '{name}' is not registered on this hub"))
                }
                Err(e) => Response::err(e.to_string()),
            },
        },
        Request::Shutdown => {
            // Stopped first: nothing said after it can keep the hub up.
            cancel.cancel();
            tracing::info!("shutdown requested over the control socket");
            Response::ok(serde_json::json!({}))
        }
    }
}

/// Groups an operator may have (with a client's own `--as-group`s they
/// stay well under the header lines a hop takes, `http::MAX_HEADER_LINES`).
const MAX_GROUPS: usize = 128;

/// Changes the access rules: in the registry, applied to what it holds
/// now (a compare-and-swap: another hub's change made meanwhile is kept,
/// not overwritten by this hub's older copy), then in memory; then cuts the
/// open streams the new rules no longer allow. A failed write changes
/// nothing.
fn change_access(
    hub: &Hub,
    mut f: impl FnMut(&mut crate::daemon::access::Policy) -> Result<crate::daemon::access::Rule, String>,
) -> Response {
    // The registry write (round trips to etcd, retried) happens under the
    // change lock only: requests keep reading the current rules meanwhile.
    let Ok(_changing) = hub.access_change.lock() else {
        return Response::err("the access rules are unavailable");
    };
    let mut applied = None;
    let mut unchanged = false;
    let written = hub.store.update_setting(crate::daemon::access::SETTING, &mut |current| {
        let mut next: crate::daemon::access::Policy = match current {
            Some(json) => serde_json::from_str(json).map_err(|e| {
                format!("the access rules in the registry are unreadable ({e}); nothing was changed")
            })?,
            None => Default::default(),
        };
        let before = serde_json::to_string(&next).map_err(|e| e.to_string())?;
        let rule = f(&mut next)?;
        let json = serde_json::to_string(&next).map_err(|e| e.to_string())?;
        // The rule was there already (`Policy::add`).
        unchanged = json == before;
        applied = Some(rule);
        Ok(json)
    });
    let rule = match written {
        Err(e) => return Response::err(format!("cannot save the access rules: {e}")),
        Ok(Err(e)) => return Response::err(e),
        Ok(Ok(_)) => match applied {
            Some(rule) => rule,
            None => return Response::err("the access rules were not changed"),
        },
    };
    // From the registry's copy (this write, or a newer one from another
    // hub that the watch brought meanwhile), not from `next`: installed
    // after the watch had installed a newer change, it undid that one here.
    if let Err(e) = hub.load_access() {
        return Response::err(format!("{e:#}"));
    }
    let cut = hub.recheck_streams();
    tracing::info!("access rules changed ({rule}); {cut} open streams cut");
    Response::ok(serde_json::json!({ "rule": rule, "streamsCut": cut, "unchanged": unchanged }))
}

/// What `cluster add` and `cluster rotate` answer: everything the member's
/// join command needs.
fn join_info(hub: &Hub, base: &HubStatus, m: &Member, token: String) -> ClusterAdded {
    ClusterAdded {
        name: m.name.clone(),
        exposes: m.exposes.clone().into_iter().collect(),
        token: crate::tunnel::Secret::new(token),
        expires_at: m.token_expires_at,
        tunnel_url: base.tunnel_url.clone(),
        hub_key: base.hub_key.clone(),
        more_hubs: hub.other_hubs(),
        impersonate: m.impersonate,
    }
}
