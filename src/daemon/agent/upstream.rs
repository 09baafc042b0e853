//! The agent's side of its member API server: channels from the hub
//! speak HTTP/1.1; each request goes to the API server through one pooled
//! kube client with the agent's own credentials (and the operator's
//! identity as `Impersonate-*` where the member requires it).

use std::path::PathBuf;

use anyhow::{Context, Result};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use russh::client::Msg;
use russh::ChannelStream;
use tokio_util::task::TaskTracker;

use super::raw::{serve_raw, Dialer};
use crate::daemon::http::{
    finish_upgrade, is_upgrade, status_response, strip_hop_by_hop, strip_identity, Body,
    GROUPS_HEADER, IMPERSONATE_HEADER, OPERATOR_HEADER,
};
use crate::daemon::targets::Target;
use crate::tunnel::client::ChannelService;
use crate::tunnel::TARGET_APISERVER;

/// Largest request body the agent buffers (kube-apiserver's own limit for
/// objects is 3 MiB; exec/attach stdin goes over the upgraded stream).
const MAX_REQUEST_BODY: usize = 32 * 1024 * 1024;

/// The agent's side of its member API server: a pooled kube client.
pub(super) struct Upstream {
    pub(super) client: kube::Client,
    /// Raw channels (CONNECT, port-forward) go through this.
    pub(super) dialer: Dialer,
    /// This agent agreed to impersonate operators (`--impersonate`).
    pub(super) impersonate: bool,
    /// Owns every stream the agent serves, so shutdown can wait for them.
    pub(super) tasks: TaskTracker,
}

impl ChannelService for Upstream {
    fn accepts(&self, target: &str, _port: u32) -> bool {
        // Every well-formed target is accepted here; the dial policy is
        // applied in `serve`, which can say in words why it refuses.
        Target::from_channel_address(target).is_some()
    }

    fn serve(&self, target: String, port: u32, stream: ChannelStream<Msg>) {
        if target != TARGET_APISERVER {
            let Some(t) = Target::from_channel_address(&target) else {
                return;
            };
            self.tasks
                .spawn(serve_raw(self.dialer.clone(), t, port, stream));
            return;
        }
        let client = self.client.clone();
        let impersonate = self.impersonate;
        let tasks = self.tasks.clone();
        self.tasks.spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let client = client.clone();
                let tasks = tasks.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        forward(&tasks, client, impersonate, req).await,
                    )
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await
            {
                tracing::debug!("tunnel stream ended: {e}");
            }
        });
    }
}

/// The operator to impersonate, when both the hub (for this member) and
/// this agent allow it: `(user, groups)`.
fn impersonation(headers: &http::HeaderMap, agent_allows: bool) -> Option<(String, Vec<String>)> {
    let hub_allows = headers.get(IMPERSONATE_HEADER).is_some_and(|v| v == "1");
    if !(agent_allows && hub_allows) {
        return None;
    }
    let user = headers.get(OPERATOR_HEADER)?.to_str().ok()?.to_string();
    let groups = headers
        .get(GROUPS_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|g| {
            g.split(',')
                .map(str::trim)
                .filter(|g| !g.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Some((user, groups))
}

async fn forward(
    tasks: &TaskTracker,
    client: kube::Client,
    impersonate: bool,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let upgrade = is_upgrade(req.headers());
    let hub_side_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    let identity = impersonation(&parts.headers, impersonate);
    // Removes any Impersonate-* and x-towerctl-* header (defence in depth:
    // the hub already strips what clients send), then adds ours.
    strip_identity(&mut parts.headers);
    if let Some((user, groups)) = identity {
        if let Ok(v) = http::HeaderValue::from_str(&user) {
            parts.headers.insert("impersonate-user", v);
        }
        for g in groups {
            if let Ok(v) = http::HeaderValue::from_str(&g) {
                parts.headers.append("impersonate-group", v);
            }
        }
    }
    parts.headers.remove(header::HOST);
    let body = match Limited::new(body, MAX_REQUEST_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return status_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                &format!("request body rejected by the towerctl agent: {e}"),
            )
        }
    };
    let up_req = Request::from_parts(parts, kube::client::Body::from(body));
    let mut resp = match client.send(up_req).await {
        Ok(r) => r,
        Err(e) => {
            return status_response(
                StatusCode::BAD_GATEWAY,
                "BadGateway",
                &format!("the towerctl agent cannot reach its API server: {e}"),
            );
        }
    };
    finish_upgrade(tasks, hub_side_upgrade, &mut resp);
    let (parts, body) = resp.into_parts();
    Response::from_parts(parts, body.map_err(|e| Box::new(e) as _).boxed_unsync())
}

/// Builds the client for the member's API server the way the kube crate
/// does: `--kubeconfig`, else `KUBECONFIG`/`~/.kube/config`, else the
/// in-cluster service account.
pub(super) async fn upstream_client(
    kubeconfig: Option<&PathBuf>,
) -> Result<(kube::Client, String)> {
    let mut config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("cannot read the member kubeconfig '{}'", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("the member kubeconfig '{}' is not usable", p.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no member API server credentials found: pass --kubeconfig, set KUBECONFIG, or run the agent in a pod with a service account")?,
    };
    // Watches and `logs -f` stay open for as long as the operator wants.
    config.read_timeout = None;
    let url = config.cluster_url.to_string();
    let client = kube::Client::try_from(config).context("cannot build the member API client")?;
    Ok((client, url))
}
