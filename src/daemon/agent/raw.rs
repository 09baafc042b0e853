//! Raw channels: bytes to a target in the member (CONNECT, port-forward)
//! after the dial policy allowed it, and push mode's workload listeners.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::tunnel::flow::FlowStream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::PodNetwork;
use super::rbac::Ask;
use crate::daemon::fmt::kube_error;
use crate::daemon::policy::{self, DialPolicy};
use crate::daemon::resolve;
use crate::daemon::targets::Target;
use crate::daemon::watchcache::ServiceCache;
use crate::daemon::wire::{DialCode, RawAnswer, RawIdentity};
use crate::tunnel::client;
use crate::tunnel::client::Confirm;

/// Dials refused by the agent's policy or the member's RBAC, logged 10 a
/// minute (then at debug; each is counted, and answered to its operator):
/// an operator's refused requests must not rotate the agent's log away.
static REFUSED_DIALS: crate::tunnel::LogBudget = crate::tunnel::LogBudget::new("refused dials", 10);

/// Accepts the member's workload connections for one exposed name and
/// carries each to the hub over whatever session is current (refused while
/// there is none).
pub(super) async fn push_listener(
    l: tokio::net::TcpListener,
    name: String,
    current: watch::Receiver<Option<Arc<client::ClientSession>>>,
    cancel: CancellationToken,
    tasks: TaskTracker,
) {
    // Connections carried at once per exposed name: each holds a socket,
    // and one whose open the hub never answers would otherwise be held
    // until the session ends.
    let carried = Arc::new(tokio::sync::Semaphore::new(PUSH_MAX_CONNECTIONS));
    // `accept_next` pauses after an error (out of descriptors, the
    // backlog stays readable: retried at once, the loop spun a core).
    while let Some((mut conn, peer)) = crate::daemon::accept_next(&l, &cancel, "expose").await {
        let Some(sess) = current.borrow().clone() else {
            refused(
                &name,
                format_args!("refused a workload connection from {peer}: the tunnel is down"),
            );
            continue;
        };
        let Ok(permit) = carried.clone().try_acquire_owned() else {
            refused(&name, format_args!("refused a workload connection from {peer}: {PUSH_MAX_CONNECTIONS} are carried already"));
            continue;
        };
        let name = name.clone();
        tasks.spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(PUSH_OPEN_WAIT, sess.open_direct(&name, peer)).await {
                Ok(Ok(mut ch)) => {
                    let _ = crate::tunnel::splice_from(&mut ch, &mut conn).await;
                }
                Ok(Err(e)) => refused(
                    &name,
                    format_args!("the hub refused to carry a workload connection: {e}"),
                ),
                Err(_) => refused(
                    &name,
                    format_args!("the hub did not answer a workload connection's open within {PUSH_OPEN_WAIT:?}"),
                ),
            }
        });
    }
}

/// Most workload connections carried at once per exposed name (push mode).
const PUSH_MAX_CONNECTIONS: usize = 1024;
/// Longest wait for the hub to take a workload connection's channel.
const PUSH_OPEN_WAIT: Duration = Duration::from_secs(20);
/// Push mode's refused connections, logged 10 a minute (then at debug).
static PUSH_REFUSALS: crate::tunnel::LogBudget =
    crate::tunnel::LogBudget::new("refused workload connections", 10);

fn refused(name: &str, what: std::fmt::Arguments<'_>) {
    if PUSH_REFUSALS.admit() {
        tracing::warn!(%name, "{what}");
    } else {
        tracing::debug!(%name, "{what}");
    }
}

/// A byte stream toward the target, whichever way it was reached.
trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Conn for T {}

type DialError = (DialCode, String);

/// The most an agent takes to answer a raw channel (its policy, the
/// member's RBAC, lookups, the connection, the client's first bytes):
/// within the hub's 20 s wait, so that the hub hears why rather than
/// giving up.
pub(super) const DIAL_DEADLINE: Duration = Duration::from_secs(15);

/// Most host-name lookups the agent makes at once for raw streams (see
/// `dial_host`); the daemons have 16 blocking threads.
const MAX_LOOKUPS: usize = 8;

/// Why a host could not be dialed: the policy's refusal of an address it
/// resolved to, or another failure, said as it is.
type HostError = Result<DialError, crate::daemon::policy::Denied>;

/// Resolves `h` in the member network, then judges every address it leads
/// to (a permitted name must not reach the agent's own host; with
/// `strict`, each needs a rule naming it), then dials.
async fn dial_host(
    policy: &DialPolicy,
    target: &Target,
    h: &str,
    port: u16,
    strict: bool,
    vet: Option<Vet<'_>>,
) -> Result<tokio::net::TcpStream, HostError> {
    // At most this many lookups at once (each a blocking thread's
    // `getaddrinfo`, which outlives the dial's deadline): names that never
    // answer, asked without end, took every blocking thread, and with them
    // the agent's own reconnection to its hub. Held for the lookup alone;
    // an address needs none.
    static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(MAX_LOOKUPS);
    let literal = h
        .trim_matches(|c| c == '[' || c == ']')
        .parse::<std::net::IpAddr>()
        .ok();
    let found = match literal {
        Some(ip) => Ok(vec![std::net::SocketAddr::new(ip, port)]),
        None => {
            // Waited for briefly (a burst of a pool's connections), then
            // refused.
            let slot = tokio::time::timeout(Duration::from_secs(2), LOOKUPS.acquire()).await;
            let Ok(Ok(slot)) = slot else {
                return Err(Ok((
                    DialCode::Unavailable,
                    format!("cannot resolve '{h}' now: {MAX_LOOKUPS} name lookups are already in flight in the member network; retry shortly"),
                )));
            };
            // The slot goes with the lookup's thread, which outlives a
            // dial given up at its deadline.
            let name = h.to_string();
            tokio::task::spawn_blocking(move || {
                let _slot = slot;
                std::net::ToSocketAddrs::to_socket_addrs(&(name.as_str(), port))
                    .map(|f| f.collect::<Vec<_>>())
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        }
    };
    let addrs: Vec<_> = found.map_err(|e| {
        Ok((
            DialCode::NotFound,
            format!("cannot resolve '{h}' in the member network: {e}"),
        ))
    })?;
    let own = policy::own_addresses();
    for a in &addrs {
        policy.check_addr(target, *a, strict, &own).map_err(Err)?;
    }
    if let Some(v) = vet {
        let mut seen = Vec::new();
        for a in &addrs {
            let ip = a.ip().to_canonical();
            if !seen.contains(&ip) {
                seen.push(ip);
                v.address(ip).await.map_err(|m| Ok((DialCode::Denied, m)))?;
            }
        }
    }
    dial_tcp(&addrs, target, port, DIRECT_WAIT)
        .await
        .map_err(|(e, _)| Ok(e))
}

/// Under impersonation, what a host target's addresses belong to in the
/// member, asked of its RBAC as the objects themselves would be: an
/// address, or a name leading to one, reached any pod or Service an
/// `--allow` CIDR covered, whatever the operator's rights there (the
/// member's RBAC was asked only for `pod/NAME`, `svc/NAME` and workloads).
#[derive(Clone, Copy)]
struct Vet<'a> {
    client: &'a kube::Client,
    rbac: &'a super::rbac::Rbac,
    who: &'a RawIdentity,
}

/// Services read at a time when looking for an address among them, and
/// most pages read (then refused: the member is too large to tell).
const SERVICE_PAGE: u32 = 500;
const SERVICE_PAGES: usize = 40;

impl Vet<'_> {
    /// The member's RBAC, asked about a core object for the operator.
    async fn ask(
        &self,
        verb: &'static str,
        resource: &'static str,
        subresource: Option<&str>,
        namespace: String,
        name: String,
    ) -> Result<(), String> {
        let ask = Ask {
            verb,
            group: "",
            resource,
            subresource: subresource.map(str::to_string),
            namespace,
            name,
        };
        self.rbac.check(self.who, &ask).await
    }

    /// Every pod whose address `ip` is (a host-network pod's is its
    /// node's), asked as `create pods/portforward`; every Service whose
    /// cluster IP, external IP or load balancer address it is, asked as
    /// `get services`. Any failure to tell refuses: fail closed.
    async fn address(&self, ip: std::net::IpAddr) -> Result<(), String> {
        use k8s_openapi::api::core::v1::{Pod, Service};
        use kube::api::{Api, ListParams};
        type Key = (String, Vec<String>, std::net::IpAddr);
        // An address found allowed for an operator is not looked up again
        // for a while (as the member's answers are kept: `rbac::TTL`): a
        // pool's every connection listed the member's pods and Services.
        static ALLOWED: Recent<Key> = Recent::new(Duration::from_secs(10));
        let key: Key = (self.who.user.clone(), self.who.groups.clone(), ip);
        if ALLOWED.holds(&key) {
            return Ok(());
        }
        let cannot = |what: &str, e: kube::Error| {
            format!("cannot tell whether {ip} is a {what} in the member (under impersonation the member's RBAC decides who reaches its pods and Services), so it is refused: {}", kube_error(&e))
        };
        // Pods that hold the address now (a finished pod keeps its old
        // one, which the network may have given to another since).
        let pods = Api::<Pod>::all(self.client.clone());
        let mut params = ListParams::default()
            .fields(&format!(
                "status.podIP={ip},status.phase!=Succeeded,status.phase!=Failed"
            ))
            .limit(100);
        for page in 0.. {
            if page == 20 {
                return Err(format!("cannot tell which pods have {ip} in the member: more than 2,000; forward to pod/NAME instead"));
            }
            let list = pods
                .list(&params)
                .await
                .map_err(|e| cannot("pod's address", e))?;
            for p in list.items {
                let (Some(ns), Some(name)) = (p.metadata.namespace, p.metadata.name) else {
                    continue;
                };
                self.ask("create", "pods", Some("portforward"), ns, name)
                    .await?;
            }
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(next) => params = params.continue_token(&next),
                None => break,
            }
        }
        let api = Api::<Service>::all(self.client.clone());
        let mut params = ListParams::default().limit(SERVICE_PAGE);
        // Written by hand (external IPs, load balancer addresses), an
        // address may not be in its canonical form: compared as addresses.
        let is_ip = |a: &str| {
            a.parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.to_canonical() == ip)
        };
        for page in 0.. {
            if page == SERVICE_PAGES {
                return Err(format!("cannot tell whether {ip} is a Service's address in the member: more than {} Services to read; forward to svc/NAME or pod/NAME instead", SERVICE_PAGE as usize * SERVICE_PAGES));
            }
            let list = api
                .list(&params)
                .await
                .map_err(|e| cannot("Service's address", e))?;
            for s in list.items {
                let spec = s.spec.as_ref();
                let owns = spec
                    .and_then(|sp| sp.cluster_ips.as_ref())
                    .is_some_and(|l| l.iter().any(|a| is_ip(a)))
                    || spec
                        .and_then(|sp| sp.cluster_ip.as_deref())
                        .is_some_and(is_ip)
                    || spec
                        .and_then(|sp| sp.external_ips.as_ref())
                        .is_some_and(|l| l.iter().any(|a| is_ip(a)))
                    || s.status
                        .as_ref()
                        .and_then(|st| st.load_balancer.as_ref())
                        .and_then(|lb| lb.ingress.as_ref())
                        .is_some_and(|l| l.iter().any(|i| i.ip.as_deref().is_some_and(is_ip)));
                if !owns {
                    continue;
                }
                let (Some(ns), Some(name)) = (s.metadata.namespace, s.metadata.name) else {
                    continue;
                };
                self.ask("get", "services", None, ns, name).await?;
            }
            match list.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(next) => params = params.continue_token(&next),
                None => break,
            }
        }
        ALLOWED.note(key);
        Ok(())
    }
}

/// How long the kubelet's refusal of a port is waited for, through the API
/// server's port-forward, when the pod's address refused it already.
const PORTFORWARD_CONFIRM: Duration = Duration::from_secs(1);

/// How long a TCP connect to one address is waited for.
const DIRECT_WAIT: Duration = Duration::from_secs(10);
/// The same for a pod's address under `--pod-network auto`, where the
/// API server's port-forward is there to fall back on: a pod network the
/// agent reaches answers within milliseconds.
const AUTO_DIRECT_WAIT: Duration = Duration::from_secs(2);
/// After a pod's address went unanswered under `auto` (an agent outside
/// the pod network, whose packets are dropped or have no route), how long
/// that address is reached through the API server at once, without trying
/// it first.
const AUTO_DIRECT_SKIP: Duration = Duration::from_secs(60);

/// Keys seen lately, each kept for `kept`; at most 4,096.
struct Recent<K> {
    seen: std::sync::Mutex<Option<std::collections::HashMap<K, std::time::Instant>>>,
    kept: Duration,
}

impl<K: std::hash::Hash + Eq> Recent<K> {
    const fn new(kept: Duration) -> Self {
        Recent {
            seen: std::sync::Mutex::new(None),
            kept,
        }
    }

    fn holds(&self, k: &K) -> bool {
        self.seen
            .lock()
            .ok()
            .and_then(|m| m.as_ref()?.get(k).copied())
            .is_some_and(|at| at.elapsed() < self.kept)
    }

    fn note(&self, k: K) {
        if let Ok(mut m) = self.seen.lock() {
            let m = m.get_or_insert_with(Default::default);
            if m.len() >= 4096 {
                m.retain(|_, at| at.elapsed() < self.kept);
                if m.len() >= 4096 {
                    m.clear();
                }
            }
            m.insert(k, std::time::Instant::now());
        }
    }

    fn forget(&self, k: &K) {
        if let Ok(mut m) = self.seen.lock() {
            if let Some(m) = m.as_mut() {
                m.remove(k);
            }
        }
    }
}

/// Pod addresses that went unanswered under `auto` lately.
static SILENT_POD_ADDRESSES: Recent<std::net::IpAddr> = Recent::new(AUTO_DIRECT_SKIP);
/// Pods' ports their address refused but the API server's port-forward
/// reached lately (a listener on the pod's localhost): not waited on for
/// the kubelet's refusal again.
static FORWARDED_PORTS: Recent<(String, String, u16)> = Recent::new(AUTO_DIRECT_SKIP);

/// How a connect to a target failed.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Failure {
    /// Refused: the host is there, the port closed.
    Refused,
    /// No answer, or no route to it.
    Silent,
    Other,
}

/// Connects to the first of `addrs` to answer within `wait`, tried as
/// RFC 8305 says (families in turn, the next every 250 ms while earlier
/// ones are pending: one after another, two silent addresses took 20 s,
/// past the hub's CONNECT limit); the error says how the last one failed.
async fn dial_tcp(
    addrs: &[std::net::SocketAddr],
    what: &Target,
    port: u16,
    wait: Duration,
) -> Result<tokio::net::TcpStream, (DialError, Failure)> {
    let (last, failure) = match tokio::time::timeout(
        wait,
        crate::tunnel::dial::connect_first(crate::tunnel::dial::interleaved(addrs.to_vec())),
    )
    .await
    {
        Ok(Ok(s)) => {
            crate::tunnel::nodelay(&s);
            // A target that vanishes silently is found by the probes.
            crate::daemon::keepalive(&s);
            return Ok(s);
        }
        // The error names the address.
        Ok(Err(e)) => (
            e.to_string(),
            match e.kind() {
                std::io::ErrorKind::ConnectionRefused => Failure::Refused,
                std::io::ErrorKind::HostUnreachable | std::io::ErrorKind::NetworkUnreachable => {
                    Failure::Silent
                }
                _ => Failure::Other,
            },
        ),
        Err(_) => {
            let shown: Vec<String> = addrs.iter().take(4).map(|a| a.to_string()).collect();
            (
                format!("{}: no answer within {wait:?}", shown.join(", ")),
                Failure::Silent,
            )
        }
    };
    Err((
        (
            DialCode::DialFailed,
            format!("cannot connect to {what} port {port} ({last})"),
        ),
        failure,
    ))
}

/// Through the API server: `pods/NAME/portforward` (WebSocket).
async fn dial_portforward(
    tasks: &TaskTracker,
    client: &kube::Client,
    budget: &Arc<tokio::sync::Semaphore>,
    (ns, name): (&str, &str),
    port: u16,
    confirm: Option<Duration>,
) -> Result<Box<dyn Conn>, DialError> {
    // Waited for a while (connections that end make room), within the
    // dial's own deadline; tried, not queued for: a queued request for 63
    // takes every permit freed meanwhile, refusing every other raw stream
    // while it waits.
    let until = tokio::time::Instant::now() + PORTFORWARD_WAIT;
    let held = loop {
        match budget.clone().try_acquire_many_owned(PORTFORWARD_PERMITS) {
            Ok(h) => break Some(h),
            Err(_) if tokio::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(_) => break None,
        }
    };
    let Some(held) = held else {
        return Err((
            DialCode::Unavailable,
            format!("pod {ns}/{name} is reached through the API server's port-forward here, and the agent carries as many such connections as its memory budget allows (each takes {} of its raw streams' permits); retry when some have ended", PORTFORWARD_PERMITS + 1),
        ));
    };
    let api = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns);
    let mut pf = api.portforward(name, &[port]).await.map_err(|e| {
        (
            DialCode::DialFailed,
            format!(
                "port-forward to pod {ns}/{name} through the API server failed: {}",
                kube_error(&e)
            ),
        )
    })?;
    let stream = pf.take_stream(port).ok_or_else(|| {
        (
            DialCode::DialFailed,
            format!("port-forward to pod {ns}/{name} gave no stream"),
        )
    })?;
    // The kubelet dials the pod's port as the port-forward starts and says
    // at once when it cannot: waited for a moment where the port is likely
    // closed (the pod's address refused it), so that the refusal reaches
    // the operator instead of a stream that only ends.
    if let (Some(wait), Some(error)) = (confirm, pf.take_error(port)) {
        if let Ok(said) = tokio::time::timeout(wait, error).await {
            return Err((
                DialCode::DialFailed,
                format!(
                    "port-forward to pod {ns}/{name} port {port}: {}",
                    said.map(|m| crate::tunnel::printable(&m, 300))
                        .unwrap_or_else(|| "the API server ended it".into())
                ),
            ));
        }
    }
    // The forwarder's own task lives as long as its stream is in use.
    tasks.spawn(async move {
        let _ = pf.join().await;
    });
    Ok(Box::new(crate::tunnel::counted::Holding::new(stream, held)))
}

/// What raw channels need to reach targets in the member.
#[derive(Clone)]
pub(super) struct Dialer {
    pub(super) tasks: TaskTracker,
    pub(super) client: kube::Client,
    pub(super) policy: Arc<DialPolicy>,
    /// Dials refused by the policy, for status.
    pub(super) denied: Arc<AtomicU64>,
    pub(super) pod_network: PodNetwork,
    /// Services resolved from watches instead of two reads per connection.
    pub(super) services: ServiceCache,
    /// Present when the member requires impersonation: raw access to
    /// Kubernetes targets is then checked against the member's RBAC.
    pub(super) rbac: Option<Arc<super::rbac::Rbac>>,
    /// The raw streams' budget (one permit a stream, taken before the
    /// dial): a stream through `pods/portforward` takes
    /// [`PORTFORWARD_PERMITS`] more for what kube buffers for it.
    pub(super) raw_streams: Arc<tokio::sync::Semaphore>,
}

/// Raw-stream permits (each [`crate::tunnel::flow::MIN_WINDOW`], 32 KiB)
/// a stream through the API server's port-forward takes besides its own:
/// kube's forwarder buffers up to 1 MiB each way per connection, which
/// the budget counted as 32 KiB (an agent under a 256 MiB limit took 1,024
/// of them: 2 GiB).
pub(super) const PORTFORWARD_PERMITS: u32 = 63;
/// Longest wait for them.
const PORTFORWARD_WAIT: Duration = Duration::from_secs(5);

/// How a raw channel's target is dialed ([`serve_raw`]).
#[derive(Debug, PartialEq)]
struct Reading {
    /// What is looked up and judged first.
    target: Target,
    /// Why it is refused before anything is looked up (a cluster name
    /// RBAC cannot be asked about, under impersonation).
    unaskable: Option<String>,
    /// A host whose every address needs a rule naming it (a cluster name
    /// that names nothing the agent can vet).
    strict: bool,
    /// The host name to dial (strictly) when the Service or pod it was
    /// read as is not found or has no address to dial.
    fallback: Option<Target>,
}

impl Reading {
    fn of(target: Target, impersonating: bool) -> Reading {
        // Services, pods and workloads (every connection of a forward to
        // one) are as they are: nothing copied.
        if !matches!(target, Target::Host(_)) {
            return Reading {
                target,
                unaskable: None,
                strict: false,
                fallback: None,
            };
        }
        let named = target.clone();
        match named.clone().in_cluster_dns() {
            Ok(t) => Reading {
                fallback: (!impersonating && t != named).then_some(named),
                target: t,
                unaskable: None,
                strict: false,
            },
            Err(m) => Reading {
                target: named,
                strict: !impersonating,
                unaskable: impersonating.then_some(m),
                fallback: None,
            },
        }
    }
}

/// Dials `target` for a raw channel after the dial policy allowed it,
/// writes `early` to it (the client's first bytes, when the hub sent them
/// with the open: [`crate::daemon::wire::RawOpen`]), answers with a
/// [`RawAnswer`], then splices. With `answer`, the channel is confirmed
/// just before the answer, which names this side's window (a hub that
/// takes both there); without, it was confirmed already.
pub(super) async fn serve_raw(
    d: Dialer,
    target: Target,
    port: u32,
    who: Option<RawIdentity>,
    early: Vec<u8>,
    answer: Option<(Confirm, u64)>,
    mut stream: FlowStream,
) {
    use tokio::io::AsyncWriteExt;
    let Dialer {
        tasks,
        client,
        policy,
        denied,
        pod_network,
        services,
        rbac,
        raw_streams,
    } = d;
    // A host name in the cluster's DNS is checked as what it names
    // (`Target::in_cluster_dns`): the Service's endpoints vetted, the
    // operator's RBAC asked about it when acting as the operator.
    //
    // Without impersonation, a cluster name that names nothing the agent
    // can vet (a pod's `A-B-C-D.NS.pod…`), or whose Service or pod is not
    // found so (an ExternalName Service, a pod whose DNS name is its
    // hostname, a not-ready address a headless Service publishes), is
    // dialed as the host it is, every address it resolves to needing an
    // `--allow` rule that names it, as a hand-made endpoint's does.
    let Reading {
        target,
        unaskable,
        strict,
        fallback,
    } = Reading::of(target, rbac.is_some());
    // Boxed: it is large, and the deadline below would otherwise copy it
    // whole into its own future (12 KB a connection, callgrind).
    let dial = Box::pin(async {
        let port = u16::try_from(port)
            .map_err(|_| (DialCode::NotFound, format!("invalid port {port}")))?;
        if let Some(m) = &unaskable {
            denied.fetch_add(1, Ordering::Relaxed);
            if REFUSED_DIALS.admit() {
                tracing::warn!("refused a dial: {m}");
            }
            return Err((DialCode::Denied, m.clone()));
        }
        let refuse = |d: crate::daemon::policy::Denied| {
            denied.fetch_add(1, Ordering::Relaxed);
            if REFUSED_DIALS.admit() {
                tracing::warn!("refused a dial: {d}");
            }
            (DialCode::Denied, d.public)
        };
        policy.check(&target, port).map_err(refuse)?;
        match &target {
            // Under impersonation a stream without the operator's identity
            // is refused whatever its target, as for Kubernetes targets.
            Target::Host(_) if rbac.is_some() && who.is_none() => {
                denied.fetch_add(1, Ordering::Relaxed);
                Err((DialCode::Denied, "this member requires impersonation and the hub sent no operator identity with the stream; upgrade the hub".to_string()))
            }
            Target::Host(h) => {
                let vet = match (&rbac, &who) {
                    (Some(rb), Some(w)) => Some(Vet {
                        client: &client,
                        rbac: rb,
                        who: w,
                    }),
                    _ => None,
                };
                dial_host(&policy, &target, h, port, strict, vet)
                    .await
                    .map(|s| Box::new(s) as Box<dyn Conn>)
                    .map_err(|e| match e {
                        Err(d) => refuse(d),
                        // The member's RBAC, asked about what an address is.
                        Ok((DialCode::Denied, m)) => {
                            denied.fetch_add(1, Ordering::Relaxed);
                            if REFUSED_DIALS.admit() {
                                tracing::warn!(
                                    "refused a dial: {}",
                                    crate::tunnel::escape_for_log(&m, 1000)
                                );
                            }
                            (DialCode::Denied, m)
                        }
                        Ok(e) => e,
                    })
            }
            Target::ApiServer => Err((
                DialCode::NotFound,
                "the API server is reached through the gateway, not CONNECT".to_string(),
            )),
            k8s => {
                // Under impersonation: may the operator find the pod this
                // way (get the service or deployment)?
                let rbac_deny = |m: String| {
                    denied.fetch_add(1, Ordering::Relaxed);
                    if REFUSED_DIALS.admit() {
                        tracing::warn!("refused a dial: {m}");
                    }
                    (DialCode::Denied, m)
                };
                let who = match (&rbac, &who) {
                    (None, _) => None,
                    (Some(_), None) => return Err(rbac_deny("this member requires impersonation and the hub sent no operator identity with the stream; upgrade the hub".to_string())),
                    (Some(rb), Some(w)) => {
                        // Asked before anything is looked up: an operator
                        // without the right learns nothing of the target
                        // (whether it exists, where it leads).
                        let finder = match k8s {
                            Target::Service { ns, name } => Some(Ask { verb: "get", group: "", resource: "services", subresource: None, namespace: ns.clone(), name: name.clone() }),
                            Target::Workload { kind, ns, name } => Some(Ask { verb: "get", group: kind.group(), resource: kind.resource(), subresource: None, namespace: ns.clone(), name: name.clone() }),
                            Target::Pod { ns, name } => Some(Ask { verb: "create", group: "", resource: "pods", subresource: Some("portforward".into()), namespace: ns.clone(), name: name.clone() }),
                            _ => None,
                        };
                        if let Some(a) = finder {
                            rb.check(w, &a).await.map_err(rbac_deny)?;
                        }
                        Some((rb.clone(), w.clone()))
                    }
                };
                let r = match resolve::resolve(&client, Some(&services), k8s, port).await {
                    Ok(r) => r,
                    Err(e) => {
                        let code = match e {
                            resolve::ResolveError::NotFound(_) => DialCode::NotFound,
                            _ => DialCode::Unavailable,
                        };
                        let why = e.to_string();
                        // The name as the host it is, where a rule allows
                        // the name; what the object's lookup said stays
                        // the answer when the name leads nowhere either.
                        let as_host = match (&fallback, &e) {
                            (
                                Some(named @ Target::Host(h)),
                                resolve::ResolveError::NotFound(_)
                                | resolve::ResolveError::Unavailable(_),
                            ) if policy.check(named, port).is_ok() => Some((named, h)),
                            _ => None,
                        };
                        let Some((named, h)) = as_host else {
                            return Err((code, why));
                        };
                        // (Only without impersonation: see `Reading::of`.)
                        return match dial_host(&policy, named, h, port, true, None).await {
                            Ok(s) => Ok(Box::new(s) as Box<dyn Conn>),
                            Err(Err(denied)) => {
                                let (c, public) = refuse(denied);
                                Err((c, format!("{why}; as a host, {public}")))
                            }
                            // Leading nowhere as a host either: what the
                            // lookup found is the answer.
                            Err(Ok((DialCode::NotFound, _))) => Err((code, why)),
                            Err(Ok(e)) => Err(e),
                        };
                    }
                };
                // May the operator port-forward to the pod behind it? Asked
                // before the dial policy, whose refusal names the address.
                // (A pod target's was asked before its lookup.)
                let asked = matches!(k8s, Target::Pod { .. });
                if let (Some((rb, w)), Some((ns, name)), false) = (&who, &r.pod, asked) {
                    let a = Ask {
                        verb: "create",
                        group: "",
                        resource: "pods",
                        subresource: Some("portforward".into()),
                        namespace: ns.clone(),
                        name: name.clone(),
                    };
                    rb.check(w, &a).await.map_err(rbac_deny)?;
                }
                // Judged whichever way it is reached: a host-network pod's
                // port-forward lands on its node too.
                policy
                    .check_addr(&target, r.addr, r.host, &policy::own_addresses())
                    .map_err(refuse)?;
                match (pod_network, &r.pod) {
                    (PodNetwork::PortForward, Some((ns, name))) => {
                        dial_portforward(
                            &tasks,
                            &client,
                            &raw_streams,
                            (ns, name),
                            r.addr.port(),
                            None,
                        )
                        .await
                    }
                    (PodNetwork::PortForward, None) => Err((
                        DialCode::Unavailable,
                        format!(
                            "{} resolved to {} with no pod reference to port-forward to",
                            target.describe(),
                            r.addr
                        ),
                    )),
                    (PodNetwork::Direct, _) => Ok(Box::new(
                        dial_tcp(&[r.addr], &target, port, DIRECT_WAIT)
                            .await
                            .map_err(|(e, _)| e)?,
                    ) as Box<dyn Conn>),
                    // An address that went unanswered lately: through the
                    // API server at once.
                    (PodNetwork::Auto, Some((ns, name)))
                        if SILENT_POD_ADDRESSES.holds(&r.addr.ip()) =>
                    {
                        dial_portforward(
                            &tasks,
                            &client,
                            &raw_streams,
                            (ns, name),
                            r.addr.port(),
                            None,
                        )
                        .await
                    }
                    (PodNetwork::Auto, pod) => match dial_tcp(
                        &[r.addr],
                        &target,
                        port,
                        if pod.is_some() {
                            AUTO_DIRECT_WAIT
                        } else {
                            DIRECT_WAIT
                        },
                    )
                    .await
                    {
                        Ok(s) => Ok(Box::new(s) as Box<dyn Conn>),
                        Err((direct, failure)) => match pod {
                            Some((ns, name)) => {
                                if failure == Failure::Silent {
                                    SILENT_POD_ADDRESSES.note(r.addr.ip());
                                    tracing::info!(
                                        "{}; this pod address is reached through the API server's port-forward for the next {AUTO_DIRECT_SKIP:?} (--pod-network portforward says so for all, for good)",
                                        direct.1
                                    );
                                } else {
                                    tracing::info!(
                                        "{}; trying pods/portforward through the API server",
                                        direct.1
                                    );
                                }
                                // Refused at the pod's address: likely
                                // closed on its localhost too, unless the
                                // port-forward reached it lately.
                                let key = (ns.to_string(), name.to_string(), r.addr.port());
                                let confirm = (failure == Failure::Refused
                                    && !FORWARDED_PORTS.holds(&key))
                                .then_some(PORTFORWARD_CONFIRM);
                                let got = dial_portforward(
                                    &tasks,
                                    &client,
                                    &raw_streams,
                                    (ns, name),
                                    r.addr.port(),
                                    confirm,
                                )
                                .await;
                                match (&got, failure) {
                                    (Ok(_), Failure::Refused) => FORWARDED_PORTS.note(key),
                                    (Err(_), _) => FORWARDED_PORTS.forget(&key),
                                    _ => {}
                                }
                                got
                            }
                            None => Err(direct),
                        },
                    },
                }
            }
        }
    });
    // Bounded as a whole (lookups and RBAC reviews have no bound of their
    // own): the hub waits 20 s for the answer and must hear why.
    let dialed = tokio::time::timeout(DIAL_DEADLINE, async {
        let mut conn = dial.await?;
        if !early.is_empty() {
            conn.write_all(&early).await.map_err(|e| {
                (
                    DialCode::DialFailed,
                    format!("{} took no data: {e}", target.describe()),
                )
            })?;
        }
        Ok(conn)
    })
    .await
    .unwrap_or_else(|_| {
        Err((
            DialCode::DialFailed,
            format!(
                "{} could not be reached within {}s",
                target.describe(),
                DIAL_DEADLINE.as_secs()
            ),
        ))
    });
    // Not held while the stream is carried.
    drop(early);
    let window = match answer {
        Some((confirm, window)) => {
            confirm.now().await;
            Some(window)
        }
        None => None,
    };
    match dialed {
        Ok(mut conn) => {
            if RawAnswer::Ok(window).write(&mut stream).await.is_err() {
                return;
            }
            let _ = crate::tunnel::splice_from(&mut stream, &mut conn).await;
        }
        Err((code, msg)) => {
            let _ = RawAnswer::Err(code, msg).write(&mut stream).await;
            let _ = stream.shutdown().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target's addresses are tried as RFC 8305 says: a silent first one
    /// does not hold up the next for the whole wait (one after another,
    /// two silent ones took 20 s, past the hub's CONNECT limit).
    #[tokio::test]
    async fn a_silent_address_does_not_hold_up_the_next() {
        let (_l, black, _held) = crate::tunnel::dial::tests::black_hole().await;
        let good = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good_addr = good.local_addr().unwrap();
        let what = Target::Host("dual".into());
        let t = std::time::Instant::now();
        let s = dial_tcp(&[black, good_addr], &what, 80, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(s.peer_addr().unwrap(), good_addr);
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        // Only silent ones: silent, within the wait, both named.
        let (e, failure) = dial_tcp(&[black], &what, 80, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(failure, Failure::Silent);
        assert!(e.1.contains(&format!("{black}: no answer")), "{}", e.1);
    }

    /// Cluster names are what they name; without impersonation, one the
    /// agent cannot vet so is a host each of whose addresses needs a rule
    /// naming it; under impersonation it is refused and nothing falls back.
    #[test]
    fn cluster_names_are_read_as_objects_else_as_strict_hosts() {
        let host = |h: &str| Target::Host(h.into());
        let svc = Target::Service {
            ns: "prod".into(),
            name: "db".into(),
        };
        let name = "db.prod.svc.cluster.local";
        assert_eq!(
            Reading::of(host(name), false),
            Reading {
                target: svc.clone(),
                unaskable: None,
                strict: false,
                fallback: Some(host(name)),
            }
        );
        assert_eq!(
            Reading::of(host(name), true),
            Reading {
                target: svc.clone(),
                unaskable: None,
                strict: false,
                fallback: None,
            }
        );
        let pod_ip = "10-0-0-1.prod.pod.cluster.local";
        assert_eq!(
            Reading::of(host(pod_ip), false),
            Reading {
                target: host(pod_ip),
                unaskable: None,
                strict: true,
                fallback: None,
            }
        );
        let under = Reading::of(host(pod_ip), true);
        assert!(under.unaskable.is_some() && !under.strict && under.fallback.is_none());
        // Other hosts and other targets are as they were.
        for impersonating in [false, true] {
            assert_eq!(
                Reading::of(host("db.example.com"), impersonating),
                Reading {
                    target: host("db.example.com"),
                    unaskable: None,
                    strict: false,
                    fallback: None,
                }
            );
            assert_eq!(
                Reading::of(svc.clone(), impersonating),
                Reading {
                    target: svc.clone(),
                    unaskable: None,
                    strict: false,
                    fallback: None,
                }
            );
        }
    }
}
