//! Port-forwards of this machine served by the hub itself. `towerctl
//! port-forward` binds its local ports and, when the hub runs on the same
//! machine, hands each listening socket to the hub over the control socket
//! (`fdpass`). The hub then accepts on it and opens a raw stream per
//! connection, exactly as for a CONNECT through the gateway (same operator,
//! access rules, audit and revocation), but without the TLS hop and the
//! extra process in between: a forwarded byte crosses the hub and the agent
//! only, as with `ssh -L`/`-R`.
//!
//! The forward lasts as long as the client's control connection: when
//! `towerctl port-forward` ends (Ctrl-C, a kill), the hub stops accepting,
//! cuts the forward's connections and drops its copy of the listener.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::gateway::{open_raw, RawRefusal};
use super::Hub;
use crate::daemon::control::{ForwardEvent, Request, Response};
use crate::daemon::store::Operator;
use crate::daemon::targets::Target;
use crate::tunnel::Secret;

/// Most connections of one forward carried at once; past it a new
/// connection is closed at once and reported. A quarter of what an agent
/// serves at once (`MAX_STREAMS`): idle local clients of one forward used
/// to take every stream of the member, for every operator.
const MAX_CONNECTIONS: usize = 1024;

/// How long the first of a burst of events waits for the others.
const EVENT_COALESCE: Duration = Duration::from_millis(20);

pub(super) async fn serve(
    hub: Arc<Hub>,
    stop: CancellationToken,
    req: Request,
    stream: UnixStream,
) {
    let Request::Forward { token, authority } = req else {
        return;
    };
    let (mut rd, mut wr) = stream.into_split();
    let answer = |r: Response| {
        let mut out = serde_json::to_vec(&r).unwrap_or_default();
        out.push(b'\n');
        out
    };
    let (operator, dest) = match check(&hub, token, authority) {
        Ok(v) => v,
        Err(msg) => {
            let _ = wr.write_all(&answer(Response::err(msg))).await;
            return;
        }
    };
    if wr
        .write_all(&answer(Response::ok("send the listening socket")))
        .await
        .is_err()
    {
        return;
    }
    let received = tokio::time::timeout(
        Duration::from_secs(5),
        rd.as_ref().async_io(tokio::io::Interest::READABLE, || {
            crate::daemon::fdpass::recv_fd(rd.as_ref())
        }),
    )
    .await;
    let listener = match received
        .map_err(|_| std::io::Error::other("no socket within 5s"))
        .and_then(|r| r)
        .and_then(crate::daemon::fdpass::tcp_listener)
        .and_then(TcpListener::from_std)
    {
        Ok(l) => l,
        Err(e) => {
            let _ = wr
                .write_all(&answer(Response::err(format!("forward refused: {e}"))))
                .await;
            return;
        }
    };
    let local = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    tracing::info!(cluster = %dest.cluster, operator = %operator.name, local, target = %crate::tunnel::escape_for_log(&dest.authority, 256), "serving a local port-forward");
    let dest = Arc::new(dest);

    // Events go out through one writer task; a slow reader loses events,
    // never stalls the forward.
    let (tx, mut events) = mpsc::channel::<ForwardEvent>(1024);
    let done = CancellationToken::new();
    let writer = {
        let done = done.clone();
        hub.tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = done.cancelled() => return,
                    e = events.recv() => {
                        let Some(e) = e else { return };
                        // Events of the next few milliseconds go out in the
                        // same write: under a burst of connections the
                        // client wakes ~50 times a second, not once per
                        // connection (its lines appear no later than a
                        // person can tell).
                        tokio::select! {
                            _ = tokio::time::sleep(EVENT_COALESCE) => {}
                            _ = done.cancelled() => return,
                        }
                        let mut out = answer(Response::ok(e));
                        while out.len() < 64 * 1024 {
                            let Ok(e) = events.try_recv() else { break };
                            out.extend(answer(Response::ok(e)));
                        }
                        // A client that stopped reading holds this write
                        // up: the end of the forward must not wait on it.
                        tokio::select! {
                            r = wr.write_all(&out) => if r.is_err() {
                                done.cancel();
                                return;
                            },
                            _ = done.cancelled() => return,
                        }
                    }
                }
            }
        })
    };
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut hangup = [0u8; 64];
    loop {
        let (conn, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            _ = done.cancelled() => break,
            // The client sends nothing more: any byte or EOF ends it.
            _ = rd.read(&mut hangup) => break,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!(local, "local forward accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            let _ = tx.try_send(ForwardEvent::Failed {
                port: local,
                error: format!(
                    "more than {MAX_CONNECTIONS} connections at once; this one was closed"
                ),
            });
            continue;
        };
        crate::tunnel::nodelay(&conn);
        let _ = tx.try_send(ForwardEvent::Accepted { port: local });
        let (hub2, dest, tx, done) = (hub.clone(), dest.clone(), tx.clone(), done.clone());
        hub.tasks.spawn(async move {
            let _slot = slot;
            // The end of the forward cuts a connection still being set up
            // too (a channel open to a wedged agent, a peer hub's answer);
            // an opened stream sees `done` itself and audits its end.
            // Polled only when it fires, not at every read and write the
            // connection carries (`tunnel::quiet`).
            let stop = done.clone();
            tokio::select! {
                r = carry(&hub2, &dest, peer, conn, done) => if let Err(error) = r {
                    let _ = tx.try_send(ForwardEvent::Failed { port: local, error });
                },
                _ = crate::tunnel::quiet::Quiet::new(stop.cancelled()) => {}
            }
        });
    }
    done.cancel();
    let _ = writer.await;
    tracing::info!(cluster = %dest.cluster, local, "local port-forward ended");
}

/// Where a forward's connections go, and as whom.
struct Dest {
    token: Secret,
    /// The operator of `token`, remembered ([`Hub::operator_memo`]).
    known: super::OperatorMemo,
    authority: String,
    cluster: String,
    target: Target,
    port: u16,
}

/// The operator of `token` and where `authority` leads, if the operator may
/// reach that member at all; otherwise why not (a member it may not reach
/// answers like an unknown one).
fn check(hub: &Hub, token: Secret, authority: String) -> Result<(Arc<Operator>, Dest), String> {
    let known = super::OperatorMemo::default();
    let operator = hub
        .operator_memo(&known, token.expose())
        .ok_or_else(|| UNKNOWN_TOKEN.to_string())?;
    // Refused while the hub cannot confirm a shared registry.
    hub.stale_refusal_for(&operator).map_or(Ok(()), Err)?;
    let parsed: http::uri::Authority = authority.parse().map_err(|_| {
        format!(
            "cannot read '{}' as HOST:PORT",
            crate::tunnel::escape_for_log(&authority, 256)
        )
    })?;
    let (cluster, target, port) = super::gateway::connect_target(&parsed)?;
    let decision = hub.decide(&operator, &cluster);
    if !decision.allowed {
        return Err(super::gateway::refused_member(hub, &operator, &cluster, &decision.why).2);
    }
    let dest = Dest {
        token,
        known,
        authority,
        cluster,
        target,
        port,
    };
    Ok((operator, dest))
}

/// What the hub answers a forward whose token it does not know (the
/// client's context belongs to another hub): the client then goes through
/// that hub's gateway instead.
pub const UNKNOWN_TOKEN: &str = "the operator token is not known to this hub";

/// Carries one accepted connection: a raw stream through the session this
/// hub holds, or a CONNECT through the hub that holds it.
async fn carry(
    hub: &Hub,
    d: &Dest,
    peer: SocketAddr,
    conn: TcpStream,
    done: CancellationToken,
) -> Result<(), String> {
    // The operator is looked up for every connection, as the gateway does
    // for every request: one removed since the forward began gets nothing.
    // Looked up again only when an operator changed since the last
    // connection (hashing the token was ~3 % of a new connection's
    // instructions in the hub).
    let operator = hub
        .operator_memo(&d.known, d.token.expose())
        .ok_or_else(|| {
            "the operator was removed or its token revoked on the hub; run 'towerctl use' again"
                .to_string()
        })?;
    // Refused while the hub cannot confirm a shared registry.
    hub.stale_refusal_for(&operator).map_or(Ok(()), Err)?;
    match open_raw(
        hub,
        &operator,
        &d.cluster,
        &d.target,
        d.port,
        peer,
        peer.to_string(),
        super::gateway::Early::From(&conn),
    )
    .await
    {
        Ok(raw) => {
            raw.splice(conn, done).await;
            Ok(())
        }
        Err(RawRefusal::Answer(_, msg)) => Err(msg),
        Err(RawRefusal::Elsewhere(held)) => {
            let mut held = *held;
            let up = super::peer::connect_via_owner(
                hub,
                &d.cluster,
                &d.authority,
                d.token.expose(),
                &mut held,
            )
            .await;
            match up {
                Ok(up) => {
                    held.opened();
                    held.splice(conn, up, done).await;
                    Ok(())
                }
                Err(e) => {
                    held.finish(Some(http::StatusCode::BAD_GATEWAY));
                    Err(e)
                }
            }
        }
    }
}
