//! `towerctl use [NAME|-]` and `towerctl kubeconfig [NAME…]`: kubeconfig
//! contexts for members, with no secret in them (kubectl gets the token
//! from `towerctl credential`, an exec credential plugin).

use anyhow::{bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};

use std::path::{Path, PathBuf};

use super::{exit, kubeconfig, operator, UseArgs};
use crate::daemon::control::ClusterStatus;
use crate::daemon::control::HubStatus;
use crate::paths;

fn previous_file() -> std::path::PathBuf {
    paths::state_dir().join("previous-context")
}

/// Where contexts point and how kubectl authenticates: the hub running on
/// this machine (its local admin), or a hub this machine logged in to.
pub struct Source {
    pub gateway_url: String,
    pub ca_pem: String,
    /// Arguments for `towerctl` as the exec credential plugin.
    pub credential_args: Vec<String>,
    pub clusters: Vec<ClusterStatus>,
    /// The operator token, for towerctl's own requests (port-forward).
    pub token: crate::tunnel::Secret,
    /// The operator logged in, when the list is what the gateway shows
    /// them (the members their access rules allow), not the hub's own.
    pub operator: Option<String>,
}

/// Keeps the members whose names a hub can register: they go into
/// kubeconfig entries, URLs, CONNECT names and terminal lines (a hub's own
/// list too: its registry may have been edited by hand).
fn keep_registrable(clusters: &mut Vec<ClusterStatus>, from: &str) {
    let before = clusters.len();
    clusters.retain(|c| crate::daemon::names::validate_name(&c.name).is_ok());
    if clusters.len() < before {
        eprintln!(
            "warning: {from} listed {} member name(s) no hub can register; left out",
            before - clusters.len()
        );
    }
}

impl Source {
    /// The hub running on this machine, with its local admin.
    pub fn from_hub(hub: HubStatus) -> Result<Source> {
        let token = std::fs::read_to_string(&hub.admin_token_file).with_context(|| {
            format!(
                "cannot read the hub's admin token '{}'",
                hub.admin_token_file
            )
        })?;
        let mut clusters = hub.clusters;
        keep_registrable(&mut clusters, "the hub on this machine");
        Ok(Source {
            token: crate::tunnel::Secret::new(token.trim()),
            gateway_url: hub.gateway_url,
            ca_pem: hub.ca_pem,
            credential_args: vec![
                "credential".into(),
                "--token-file".into(),
                hub.admin_token_file,
            ],
            clusters,
            operator: None,
        })
    }

    pub async fn find(gateway: Option<&str>) -> Result<Source> {
        if gateway.is_none() {
            if let Some(hub) = super::hub::hub_status().await {
                return Source::from_hub(hub);
            }
        }
        let Some(login) = operator::find_login(gateway)? else {
            bail!(match gateway {
                Some(g) => format!("not logged in to '{g}': run the login command 'towerctl operator add' printed on the hub (' TOWERCTL_OPERATOR_TOKEN=… towerctl login {g} --ca-hash …') first"),
                None => "no hub is running on this machine and no login is saved: run 'towerctl up' here, or the login command 'towerctl operator add' printed on the hub (' TOWERCTL_OPERATOR_TOKEN=… towerctl login GATEWAY_URL --ca-hash …')".into(),
            });
        };
        let token = operator::login_token(&login)?;
        let (status, body) = super::https::get(
            &format!("{}/towerctl/v1/clusters", login.gateway_url),
            super::https::Trust::Ca(&login.ca_pem),
            Some(&token),
        )
        .await?;
        if status == 401 {
            return Err(super::error::CliError::Refused(format!("the gateway '{}' no longer accepts this machine's token (operator '{}' was removed, or its token replaced): ask the hub's admin for a new 'towerctl operator add' and run the login command it prints", login.gateway_url, login.operator)).into());
        }
        if status != 200 {
            bail!("the gateway '{}' answered HTTP {status}", login.gateway_url);
        }
        let mut clusters: Vec<ClusterStatus> =
            serde_json::from_slice(&body).context("malformed cluster list from the gateway")?;
        keep_registrable(
            &mut clusters,
            &format!("the gateway '{}'", login.gateway_url),
        );
        Ok(Source {
            token: crate::tunnel::Secret::new(token),
            credential_args: vec![
                "credential".into(),
                "--gateway".into(),
                login.gateway_url.clone(),
            ],
            gateway_url: login.gateway_url,
            ca_pem: login.ca_pem,
            clusters,
            operator: Some(login.operator),
        })
    }

    pub fn check(&self, name: &str) -> Result<()> {
        if self.clusters.iter().any(|c| c.name == name) {
            return Ok(());
        }
        // Not a name at all: said so, not "register it with 'towerctl
        // cluster add …'" (a command refused in turn) around a 100 KB echo.
        crate::daemon::names::validate_name(name).map_err(anyhow::Error::msg)?;
        let known: Vec<_> = self.clusters.iter().map(|c| c.name.as_str()).collect();
        let known = if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        };
        match &self.operator {
            // The gateway lists only what the operator's rules allow: a
            // member they may not reach looks the same as none at all.
            Some(op) => {
                // It may be a member of another hub logged in to.
                let others: Vec<String> = super::operator::logins()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|l| l.gateway_url)
                    .filter(|g| g != &self.gateway_url)
                    .collect();
                let elsewhere = if others.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; if it is a member of another hub you are logged in to, name that hub: --gateway {}",
                        others.join(" or --gateway ")
                    )
                };
                bail!(
                    "cluster '{name}' is not among the members operator '{op}' may reach through '{}' (yours: {known}): either no access rule gives it to you (the hub's admin grants it with 'towerctl access allow operator:{op} --names {name}' or a rule for one of your groups) or it is not registered (the hub's admin adds it with 'towerctl cluster add {name}'){elsewhere}",
                    self.gateway_url
                )
            }
            None => bail!(
                "cluster '{name}' is not registered on the hub (known: {known}); register it with 'towerctl cluster add {name}' on the hub"
            ),
        }
    }

    /// What to say when the list is empty.
    pub fn none_yet(&self) -> String {
        match &self.operator {
            Some(op) => format!(
                "no member that operator '{op}' may reach: the hub's admin grants access with 'towerctl access allow operator:{op} …' (or a rule for one of your groups), and adds members with 'towerctl cluster add NAME'"
            ),
            None => "the hub has no members yet: 'towerctl cluster add NAME' on the hub".into(),
        }
    }

    /// The three kubeconfig entries of member `name`: cluster, user, context.
    pub fn entries(&self, name: &str) -> Result<(String, Value, Value, Value)> {
        let exe = crate::paths::stable_exe().context("cannot find the towerctl executable")?;
        let ctx = format!("tower-{name}");
        // The member travels twice: as the TLS server name, which clients
        // that build request paths themselves (`kubectl get --raw`,
        // `kubectl proxy`) keep, and in the path, which keeps kubectl's
        // discovery cache (keyed by the server URL) apart per member. The
        // gateway refuses the two if they disagree (see daemon/route.rs).
        let cluster = json!({
            "server": format!("{}/clusters/{name}", self.gateway_url.trim_end_matches('/')),
            "tls-server-name": crate::daemon::route::server_name(name),
            "certificate-authority-data": base64::engine::general_purpose::STANDARD.encode(self.ca_pem.as_bytes()),
        });
        let user = json!({
            "exec": {
                "apiVersion": "client.authentication.k8s.io/v1",
                "command": exe.display().to_string(),
                "args": self.credential_args,
                "interactiveMode": "Never",
                "provideClusterInfo": false,
            }
        });
        let context = json!({ "cluster": ctx, "user": ctx });
        Ok((ctx, cluster, user, context))
    }
}

/// Writes member `name`'s context into the kubeconfig and makes it current;
/// returns the file written. Shared by `towerctl use` and the dashboard.
pub fn write_context(
    source: &Source,
    name: &str,
    explicit: Option<&std::path::Path>,
) -> Result<std::path::PathBuf> {
    source.check(name)?;
    write_entries(source, name, explicit)
}

/// `ours` over what the kubeconfig already holds for the entry: its other
/// keys kept, those in `fight` (other credentials, another CA) removed.
fn merged(existing: Option<&Value>, ours: Value, fight: &[&str]) -> Value {
    let (Some(Value::Object(old)), Value::Object(new)) = (existing, &ours) else {
        return ours;
    };
    let mut out = old.clone();
    for k in fight {
        out.remove(*k);
    }
    for (k, v) in new {
        out.insert(k.clone(), v.clone());
    }
    Value::Object(out)
}

/// [`write_context`] without the membership check (the caller made it).
/// A kubeconfig cluster entry's `server`.
fn server_of(cluster: &Value) -> Option<String> {
    cluster.get("server")?.as_str().map(str::to_string)
}

/// The `server` of cluster entry `name` in kubeconfig `doc`.
fn cluster_server(doc: &Value, name: &str) -> Option<String> {
    kubeconfig::find(doc, "clusters", "cluster", name).and_then(server_of)
}

/// A kubeconfig user's credentials other than towerctl's exec plugin:
/// they would fight it, and go when towerctl writes its user.
const CREDENTIAL_FIELDS: &[&str] = &[
    "token",
    "tokenFile",
    "client-certificate",
    "client-certificate-data",
    "client-key",
    "client-key-data",
    "username",
    "password",
    "auth-provider",
];

fn write_entries(
    source: &Source,
    name: &str,
    explicit: Option<&std::path::Path>,
) -> Result<std::path::PathBuf> {
    let files = kubeconfig::files(explicit);
    let target = kubeconfig::target(&files);
    let current = kubeconfig::current_context(&files);
    let (ctx, cluster, user, mut context) = source.entries(name)?;
    // With several files (KUBECONFIG=a:b), the entries are updated where
    // they are already defined, as kubectl edits them: written anew into
    // the first file, a second `tower-NAME` without the namespace set on
    // the first one shadowed it. New ones go to the first file, and so
    // does the current context (the first one set is kubectl's).
    let home = kubeconfig::defining(&files, &ctx)?.unwrap_or_else(|| target.clone());
    let mut replaced: Option<String> = None;
    let mut refreshed = 0;
    let new_server = server_of(&cluster);
    let written = kubeconfig::edit(&home, |d| {
        // The same member name on another hub (one context per name):
        // said, not silently pointed elsewhere.
        let before = cluster_server(d, &ctx);
        // A `tower-NAME` user towerctl did not write (no towerctl
        // credential plugin) that has credentials of its own (a token, a
        // certificate, an exec plugin such as a cloud's): they were
        // dropped, and the one backup was overwritten by the next `use`,
        // so they were gone for good.
        if let Some(u) = kubeconfig::find(d, "users", "user", &ctx).and_then(Value::as_object) {
            // towerctl's credential plugin: its `credential` argument, or
            // a towerctl binary with its arguments changed by hand
            // (`kubectl config set-credentials --exec-arg=…`).
            let exec = u.get("exec");
            let ours = exec
                .and_then(|e| e.get("args"))
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|x| x.as_str() == Some("credential")))
                || exec
                    .and_then(|e| e.get("command"))
                    .and_then(Value::as_str)
                    .and_then(|c| std::path::Path::new(c).file_name())
                    .is_some_and(|n| n.to_string_lossy().starts_with("towerctl"));
            let own: Vec<&str> = CREDENTIAL_FIELDS
                .iter()
                .copied()
                .chain(["exec"])
                .filter(|k| u.contains_key(*k))
                .collect();
            if ours {
                // Credentials set on towerctl's user by hand (kubectl
                // prefers a token to the plugin) go: said, not silently.
                let set: Vec<&str> = own.iter().copied().filter(|k| *k != "exec").collect();
                if !set.is_empty() {
                    eprintln!(
                        "note: removed {} from user '{ctx}' in '{}': towerctl's credential plugin authenticates it (a copy is in the file's .towerctl.bak)",
                        set.join(", "),
                        home.display()
                    );
                }
            }
            if !ours && !own.is_empty() {
                bail!(
                    "the kubeconfig '{}' has a user '{ctx}' that towerctl did not write (with {}){}; towerctl would replace it: rename that context and its user first ('kubectl config rename-context {ctx} NEW-NAME', and the user's entry), then run 'towerctl use {name}' again",
                    home.display(),
                    own.join(", "),
                    before
                        .as_deref()
                        .map(|s| format!(", for server {}", crate::tunnel::printable(s, 200)))
                        .unwrap_or_default()
                );
            }
        }
        let canonical = |s: &Option<String>| s.as_deref().map(operator::canonical_gateway);
        if before.is_some() && canonical(&before) != canonical(&new_server) {
            replaced = before;
        }
        // What an operator added to the entries stays: the context's
        // namespace (`kubectl config set-context --current --namespace=…`),
        // a cluster's `proxy-url` or `disable-compression`, a user's `as`
        // or exec `env` (every `use` wiped them: kubectl then went around
        // the proxy it needed). Only what would fight towerctl's own goes.
        let cluster = merged(
            kubeconfig::find(d, "clusters", "cluster", &ctx),
            cluster,
            &["certificate-authority", "insecure-skip-tls-verify"],
        );
        let mut user = user;
        if let Some(env) = kubeconfig::find(d, "users", "user", &ctx)
            .and_then(|u| u.get("exec"))
            .and_then(|e| e.get("env"))
        {
            user["exec"]["env"] = env.clone();
        }
        let user = merged(
            kubeconfig::find(d, "users", "user", &ctx),
            user,
            CREDENTIAL_FIELDS,
        );
        context = merged(
            kubeconfig::find(d, "contexts", "context", &ctx),
            context,
            &[],
        );
        // The gateway's CA changed (a new login took it): every other
        // member of this gateway in the file takes it too, rather than
        // failing kubectl's TLS check until each is `use`d again.
        if let Some(ca) = cluster.get("certificate-authority-data").cloned() {
            refreshed = same_gateway_new_ca(d, &ctx, &source.gateway_url, &ca);
        }
        kubeconfig::upsert(d, "clusters", "cluster", &ctx, cluster)?;
        kubeconfig::upsert(d, "users", "user", &ctx, user)?;
        kubeconfig::upsert(d, "contexts", "context", &ctx, context)?;
        if home == target {
            kubeconfig::set_current(d, &ctx)?;
        }
        Ok(())
    })?;
    if home != target {
        kubeconfig::edit(&target, |d| kubeconfig::set_current(d, &ctx))?;
    }
    if let Some(was) = replaced {
        eprintln!(
            "warning: context '{ctx}' reached '{}' and now reaches '{}' (another hub has a member of this name, or the gateway moved): kubectl --context {ctx} now goes there; 'towerctl use' the other again to go back",
            crate::tunnel::printable(&was, 300),
            crate::tunnel::printable(new_server.as_deref().unwrap_or("?"), 300)
        );
    }
    if refreshed > 0 {
        eprintln!(
            "note: the gateway's CA changed: {refreshed} other tower-* context(s) of '{}' in {} took the new one",
            crate::tunnel::printable(&source.gateway_url, 300),
            home.display()
        );
    }
    if current.as_deref() != Some(ctx.as_str()) {
        remember(current.as_deref());
    }
    Ok(written)
}

/// Whether kubeconfig server `server` is a member's URL on `gateway`,
/// however either is spelled (host case, IPv6 form, default port).
fn on_gateway(server: &str, gateway: &str) -> bool {
    operator::canonical_gateway(server).starts_with(&format!(
        "{}/clusters/",
        operator::canonical_gateway(gateway)
    ))
}

/// Sets `ca` on the `tower-*` clusters other than `skip` whose server is on
/// `gateway` and whose CA differs; returns how many.
fn same_gateway_new_ca(d: &mut Value, skip: &str, gateway: &str, ca: &Value) -> usize {
    let Some(list) = d.get_mut("clusters").and_then(Value::as_array_mut) else {
        return 0;
    };
    let mut n = 0;
    for e in list {
        let ours = e
            .get("name")
            .and_then(Value::as_str)
            .is_some_and(|name| name.starts_with("tower-") && name != skip);
        let Some(c) = e.get_mut("cluster").and_then(Value::as_object_mut) else {
            continue;
        };
        let here = c
            .get("server")
            .and_then(Value::as_str)
            .is_some_and(|s| on_gateway(s, gateway));
        if ours && here && c.get("certificate-authority-data") != Some(ca) {
            c.insert("certificate-authority-data".into(), ca.clone());
            c.remove("certificate-authority");
            n += 1;
        }
    }
    n
}

/// The dashboard's Enter: [`write_context`] for a member of the local hub.
/// Returns the context name and the file written.
pub fn switch_to(
    hub: &HubStatus,
    member: &str,
    kubeconfig: Option<&Path>,
) -> Result<(String, PathBuf)> {
    let source = Source::from_hub(hub.clone())?;
    let written = write_entries(&source, member, kubeconfig)?;
    Ok((format!("tower-{member}"), written))
}

pub async fn run(a: UseArgs) -> Result<u8> {
    let files = kubeconfig::files(a.kubeconfig.as_deref());
    let current = kubeconfig::current_context(&files);

    match a.name.as_deref() {
        None => {
            // List the members and mark the current one, like kubectx.
            let source = Source::find(a.gateway.as_deref()).await?;
            if source.clusters.is_empty() {
                println!("{}", source.none_yet());
            }
            // The current context is this hub's member only if its
            // cluster reaches this gateway (another hub may have a member
            // of the same name).
            let current_server = current.as_deref().and_then(|ctx| {
                let home = kubeconfig::defining(&files, ctx).ok().flatten()?;
                cluster_server(&kubeconfig::read(&home).ok()?, ctx)
            });
            let here = current_server
                .as_deref()
                .is_none_or(|s| on_gateway(s, &source.gateway_url));
            for c in &source.clusters {
                let ctx = format!("tower-{}", c.name);
                let mark = if current.as_deref() == Some(ctx.as_str()) && here {
                    "*"
                } else {
                    " "
                };
                println!("{mark} {:<24} {}", c.name, c.state);
            }
            Ok(exit::OK)
        }
        Some("-") => {
            let target = kubeconfig::target(&files);
            let prev = std::fs::read_to_string(previous_file())
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .context("no previous context to return to: 'towerctl use -' works after a 'towerctl use NAME'")?;
            if !kubeconfig::has_context(&files, &prev)? {
                bail!(
                    "the previous context '{}' no longer exists in the kubeconfig",
                    crate::tunnel::shown(&prev)
                );
            }
            let written = kubeconfig::edit(&target, |d| kubeconfig::set_current(d, &prev))?;
            remember(current.as_deref());
            println!(
                "switched to context \"{}\" (in {})",
                crate::tunnel::shown(&prev),
                written.display()
            );
            Ok(exit::OK)
        }
        Some(name) => {
            let source = Source::find(a.gateway.as_deref()).await?;
            let written = write_context(&source, name, a.kubeconfig.as_deref())?;
            println!(
                "switched to context \"tower-{name}\" (in {})",
                written.display()
            );
            // Said now rather than by kubectl's first 503.
            if let Some(c) = source.clusters.iter().find(|c| c.name == name) {
                if !matches!(c.state, crate::daemon::control::MemberState::Connected) {
                    eprintln!(
                        "note: cluster '{name}' is {} now: kubectl reaches it once its agent is connected ('towerctl status' on the hub says more)",
                        c.state
                    );
                }
            }
            Ok(exit::OK)
        }
    }
}

/// `towerctl kubeconfig [NAME…]`: a standalone kubeconfig on stdout.
pub async fn print_kubeconfig(names: &[String], gateway: Option<&str>) -> Result<u8> {
    let source = Source::find(gateway).await?;
    let names: Vec<String> = if names.is_empty() {
        source.clusters.iter().map(|c| c.name.clone()).collect()
    } else {
        for n in names {
            source.check(n)?;
        }
        names.to_vec()
    };
    let doc = standalone(&source, &names)?;
    // Its credential runs this binary on the hub's admin token file, which
    // exist where the hub runs: in a pod (`kubectl exec … towerctl
    // kubeconfig`), nowhere else ("fork/exec /usr/local/bin/towerctl: no
    // such file or directory" on the operator's machine).
    if source.operator.is_none() && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        eprintln!(
            "note: this kubeconfig's credential runs '{}' on '{}', which exist only in this pod; \
             for a machine outside it, run 'towerctl operator add NAME' here and the login command it prints there",
            std::env::current_exe()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "towerctl".into()),
            source.credential_args.last().map(String::as_str).unwrap_or("")
        );
    }
    print!("{}", serde_saphyr::to_string(&doc)?);
    Ok(exit::OK)
}

/// A kubeconfig with a `tower-NAME` context for each of `names` (the first
/// current). Shared by `towerctl kubeconfig` and `towerctl kubectl`.
pub fn standalone(source: &Source, names: &[String]) -> Result<Value> {
    let mut doc = json!({"apiVersion": "v1", "kind": "Config", "preferences": {}});
    for n in names {
        let (ctx, cluster, user, context) = source.entries(n)?;
        kubeconfig::upsert(&mut doc, "clusters", "cluster", &ctx, cluster)?;
        kubeconfig::upsert(&mut doc, "users", "user", &ctx, user)?;
        kubeconfig::upsert(&mut doc, "contexts", "context", &ctx, context)?;
    }
    if let Some(first) = names.first() {
        kubeconfig::set_current(&mut doc, &format!("tower-{first}"))?;
    }
    Ok(doc)
}

fn remember(prev: Option<&str>) {
    if let Some(p) = prev {
        // The switch itself is done: only `towerctl use -` is lost.
        if let Err(e) = paths::write_atomic(&previous_file(), p.as_bytes(), 0o600) {
            eprintln!(
                "warning: 'towerctl use -' will not return to '{}': {e:#}",
                crate::tunnel::printable(p, 200)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_ca_reaches_every_context_of_the_same_gateway_only() {
        let entry = |name: &str, server: &str, ca: &str| {
            json!({ "name": name, "cluster": {
                "server": server,
                "certificate-authority-data": ca,
                "certificate-authority": "/old/ca.crt",
            }})
        };
        let mut d = json!({ "clusters": [
            entry("tower-alpha", "https://hub:8443/clusters/alpha", "OLD"),
            entry("tower-beta", "https://hub:8443/clusters/beta", "OLD"),
            entry("tower-gamma", "https://other:8443/clusters/gamma", "OLD"),
            entry("prod", "https://hub:8443/clusters/prod", "OLD"),
            entry("tower-delta", "https://hub:8443/clusters/delta", "NEW"),
            // The same gateway spelled otherwise (an older login's).
            entry("tower-eps", "https://HUB:8443/clusters/eps", "OLD"),
        ]});
        let n = same_gateway_new_ca(&mut d, "tower-alpha", "https://hub:8443/", &json!("NEW"));
        assert_eq!(n, 2);
        assert_eq!(
            kubeconfig::find(&d, "clusters", "cluster", "tower-eps").unwrap()
                ["certificate-authority-data"],
            "NEW"
        );
        let ca = |name| {
            kubeconfig::find(&d, "clusters", "cluster", name)
                .unwrap()
                .clone()
        };
        assert_eq!(ca("tower-beta")["certificate-authority-data"], "NEW");
        assert!(ca("tower-beta").get("certificate-authority").is_none());
        // The one being written (by its caller), another gateway's and a
        // context that is not towerctl's are left alone.
        for other in ["tower-alpha", "tower-gamma", "prod"] {
            assert_eq!(ca(other)["certificate-authority-data"], "OLD", "{other}");
        }
    }
}
