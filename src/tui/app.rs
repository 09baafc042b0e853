//! The dashboard's state and its one way of changing: `update(&mut App,
//! Action)`. Everything here is plain data; nothing does I/O. Side effects
//! (writing the kubeconfig, asking the hub to cut a session) are returned
//! as [`Effect`]s for the loop to carry out, and their results come back as
//! [`Action::Done`].
//!
//! Time is state too (`now`, `now_unix`): the loop sets it before each
//! update, so the countdowns and ages that rendering derives from it are
//! reproducible in tests.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use crate::daemon::control::{
    AgentState, AgentStatus, ClusterStatus, Event, HubStatus, MemberState,
};

/// How long the UI keeps its own RTT samples: the sparkline shows the last
/// minute.
pub const SPARK_WINDOW: Duration = Duration::from_secs(60);
/// How long a transient message stays on screen.
const MESSAGE_FOR: Duration = Duration::from_secs(6);
/// A retry countdown shows tenths of a second (and is redrawn at the
/// animation rate) only below this; above it, whole seconds.
const TENTHS_UNDER: Duration = Duration::from_secs(10);
const ERROR_FOR: Duration = Duration::from_secs(10);

/// Everything that can change the dashboard.
#[derive(Debug, Clone)]
pub enum Action {
    /// A key pressed by the operator.
    Key(KeyEvent),
    /// The terminal changed size (the next draw picks the new size up).
    Resize,
    /// Time passed: countdowns, uptimes and message expiry move on.
    Tick,
    /// A status snapshot from the hub on this machine.
    Hub(Box<HubStatus>),
    /// The hub cannot be watched (not running here, or gone).
    HubDown(HubDown),
    /// A status snapshot from an agent on this machine.
    Agent(Box<AgentStatus>),
    /// An agent configured on this machine cannot be watched.
    AgentDown { name: String, why: AgentDown },
    /// The agents configured on this machine (names), when the set changes.
    Agents(Vec<String>),
    /// The background port-forwards on this machine, when they change.
    Forwards(Vec<crate::daemon::forwards::Background>),
    /// The result of an [`Effect`].
    Done(Result<Outcome, String>),
    /// Leave (SIGTERM, SIGHUP, end of input).
    Quit,
}

#[derive(Debug, Clone, PartialEq)]
pub enum HubDown {
    /// No hub control socket on this machine.
    Absent,
    /// A socket, but no (or no more) answers.
    Unreachable(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum AgentDown {
    /// Configured, but its daemon is not running; with its last error,
    /// when it stopped on one.
    Stopped(Option<String>),
    /// Its socket exists but it does not answer.
    NotResponding(String),
}

/// Side effects asked for by [`update`]; the loop runs them and reports
/// back with [`Action::Done`].
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// `towerctl use NAME`: the hub's status carries what the kubeconfig
    /// entry needs (gateway URL, CA, token file).
    UseContext { name: String, hub: Box<HubStatus> },
    /// Ask the hub to cut the member's live session.
    Disconnect { name: String },
    /// Issue a new join token (the hub's `cluster_rotate`).
    RotateToken { name: String },
    /// Start a background port-forward: `spec` is what the operator typed
    /// (`TYPE/NAME [LOCAL:]REMOTE… [-n NS]`).
    PortForward { cluster: String, spec: String },
}

/// What a finished [`Effect`] has to show.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// One line for the message bar.
    Message(String),
    /// A new join token: shown once, in a popup the operator dismisses.
    Rotated { name: String, join_command: String },
}

/// What the dashboard shows for a cluster, merged from the hub's and the
/// agent's point of view. The order is the "problems first" sort order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DisplayState {
    AuthFailed,
    Revoked,
    Failed,
    BackingOff,
    Connecting,
    Disconnected,
    Unknown,
    Stopped,
    NeverConnected,
    Connected,
}

impl DisplayState {
    pub fn label(self) -> &'static str {
        match self {
            DisplayState::Connected => "connected",
            DisplayState::Connecting => "connecting",
            DisplayState::BackingOff => "backing off",
            DisplayState::AuthFailed => "auth failed",
            DisplayState::Failed => "failed",
            DisplayState::Revoked => "revoked",
            DisplayState::Disconnected => "disconnected",
            DisplayState::NeverConnected => "never connected",
            DisplayState::Stopped => "agent stopped",
            DisplayState::Unknown => "unknown",
        }
    }
}

/// The hub on this machine, as far as the dashboard knows.
#[derive(Debug, Clone, PartialEq)]
pub enum HubState {
    /// Before the first answer.
    Starting,
    Absent,
    Unreachable(String),
    /// Its latest status, without the clusters (those live in the rows).
    Up(Box<HubStatus>),
}

/// The hub's view of one member.
#[derive(Debug, Clone, PartialEq)]
pub struct HubSide {
    pub status: ClusterStatus,
    /// When the snapshot arrived.
    pub at: Instant,
    /// Bytes per second from / to the agent, from the last two snapshots.
    pub rate_in: f64,
    pub rate_out: f64,
    /// The hub stopped answering: its numbers are old.
    pub stale: bool,
}

/// An agent on this machine, from its own point of view.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentSide {
    Up {
        status: Box<AgentStatus>,
        /// When the snapshot arrived: the countdown is `retry_in_ms` from here.
        at: Instant,
    },
    Down(AgentDown),
}

/// One cluster: what the hub and the local agent say about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub name: String,
    pub hub: Option<HubSide>,
    pub agent: Option<AgentSide>,
    /// RTT as seen by the dashboard, at most one sample a second, for the
    /// last minute (the sparkline).
    pub rtt_1m: VecDeque<(Instant, f64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortKey {
    Name,
    State,
    Rtt,
    Traffic,
    Reconnects,
}

impl SortKey {
    pub fn label(self) -> &'static str {
        match self {
            SortKey::Name => "name",
            SortKey::State => "state",
            SortKey::Rtt => "rtt",
            SortKey::Traffic => "traffic",
            SortKey::Reconnects => "reconnects",
        }
    }
    fn next(self) -> SortKey {
        match self {
            SortKey::Name => SortKey::State,
            SortKey::State => SortKey::Rtt,
            SortKey::Rtt => SortKey::Traffic,
            SortKey::Traffic => SortKey::Reconnects,
            SortKey::Reconnects => SortKey::Name,
        }
    }
}

/// What the keyboard is talking to.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    Normal,
    /// Typing a filter after `/`.
    Filter,
    Help,
    Confirm(Confirm),
    /// Typing a port-forward for a cluster after `p`: `TYPE/NAME [LOCAL:]REMOTE… [-n NS]`.
    PortForward {
        cluster: String,
        input: String,
    },
    /// A result the operator must read and dismiss (a new join command).
    Popup {
        title: String,
        body: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Confirm {
    Disconnect(String),
    Rotate(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Error,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub text: String,
    pub level: Level,
    pub until: Instant,
}

/// The whole state of the dashboard.
#[derive(Debug, Clone)]
pub struct App {
    pub now: Instant,
    pub now_unix: u64,
    pub hub: HubState,
    /// By name, so the merge is a lookup and the default order is by name.
    pub clusters: BTreeMap<String, Cluster>,
    /// The selected cluster by name, so refreshes and re-sorting keep it.
    pub selected: Option<String>,
    pub filter: String,
    pub sort: SortKey,
    pub mode: Mode,
    pub message: Option<Message>,
    /// The agents configured on this machine, once known: news about any
    /// other (a late word from an agent just left) is ignored.
    pub agents: Option<Vec<String>>,
    /// Background port-forwards on this machine.
    pub forwards: Vec<crate::daemon::forwards::Background>,
    /// Monochrome (`NO_COLOR`).
    pub mono: bool,
    /// Something visible changed since the last draw.
    pub dirty: bool,
    pub quit: bool,
    /// The hubs this machine is logged in to as an operator ("GATEWAY as
    /// 'NAME'"): the dashboard shows only this machine's daemons, and says
    /// so to an operator with nothing here.
    pub logins: Vec<String>,
}

/// A cluster as one table row: the merge of both views, already decided.
#[derive(Debug, Clone, PartialEq)]
pub struct RowView {
    pub name: String,
    pub state: DisplayState,
    pub remote: Option<String>,
    pub version: Option<String>,
    pub uptime: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub rate_in: Option<f64>,
    pub rate_out: Option<f64>,
    pub streams: Option<u64>,
    pub reconnects: Option<u64>,
    /// The backing-off countdown, or what else the operator should know.
    pub detail: String,
    /// Whether `detail` moves by itself (a countdown): redraw often.
    pub animated: bool,
}

/// `ws://10.0.0.1:8080/tunnel` → `10.0.0.1:8080`, for a narrow column.
fn hub_host(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// Whether an agent's final error is about credentials or the hub's key
/// (an operator must act), as opposed to anything else.
fn is_auth_error(e: &str) -> bool {
    e.contains("refused the credentials") || e.contains("host key")
}

impl Cluster {
    fn new(name: &str) -> Cluster {
        Cluster {
            name: name.to_string(),
            hub: None,
            agent: None,
            rtt_1m: VecDeque::new(),
        }
    }

    /// The hub's view, unless it is stale.
    pub fn live_hub(&self) -> Option<&ClusterStatus> {
        self.hub.as_ref().filter(|h| !h.stale).map(|h| &h.status)
    }

    pub fn live_agent(&self) -> Option<(&AgentStatus, Instant)> {
        match &self.agent {
            Some(AgentSide::Up { status, at }) => Some((status, *at)),
            _ => None,
        }
    }

    /// Milliseconds until the agent's next attempt, counted from when its
    /// snapshot arrived, so it runs down smoothly between snapshots.
    pub fn retry_in(&self, now: Instant) -> Option<Duration> {
        let (a, at) = self.live_agent()?;
        if a.state != AgentState::BackingOff {
            return None;
        }
        let ms = a.retry_in_ms?;
        Some((at + Duration::from_millis(ms)).saturating_duration_since(now))
    }

    pub fn view(&self, now: Instant, now_unix: u64) -> RowView {
        let hub = self.live_hub();
        let agent = self.live_agent().map(|(a, _)| a);
        let mut detail = String::new();
        let mut animated = false;
        let ago = |since: u64| crate::daemon::fmt::humanize(now_unix.saturating_sub(since));
        // The agent knows best what its own tunnel is doing (it keeps
        // counting down while the hub is unreachable); the hub knows
        // whether the member is still allowed in at all.
        let state = if hub.is_some_and(|h| h.state == MemberState::Revoked) {
            detail = format!(
                "the hub refuses it; 'towerctl cluster add {}' lets it back in",
                self.name
            );
            DisplayState::Revoked
        } else if let Some(a) = agent {
            match a.state {
                AgentState::Connected => DisplayState::Connected,
                AgentState::Connecting => {
                    detail = format!("dialing {}", a.hub);
                    DisplayState::Connecting
                }
                AgentState::BackingOff => {
                    let left = self.retry_in(now).unwrap_or_default();
                    // What it retries after, where it is no outage to
                    // wait out: another hub key than the pinned one (the
                    // path may answer in the hub's place), a certificate
                    // refused.
                    let why = match a.failure {
                        Some(crate::daemon::control::FailureKind::HostKey) => {
                            "hub host key mismatch · "
                        }
                        Some(crate::daemon::control::FailureKind::Certificate) => {
                            "certificate refused · "
                        }
                        Some(crate::daemon::control::FailureKind::Misrouted) => {
                            "refused on the way · "
                        }
                        None => "",
                    };
                    detail = if left.is_zero() {
                        format!("{why}retrying now (attempt {})", a.attempt)
                    } else if left >= TENTHS_UNDER {
                        // Whole seconds, rounded up: redrawn once a
                        // second, not ten times (a dashboard left open
                        // through an outage took 3.5 % of a core).
                        format!(
                            "{why}retry in {}s (attempt {})",
                            left.as_millis().div_ceil(1000),
                            a.attempt
                        )
                    } else {
                        animated = true;
                        format!(
                            "{why}retry in {:.1}s (attempt {})",
                            // Round up, so "0.0s" never shows while waiting.
                            (left.as_millis().div_ceil(100) as f64) / 10.0,
                            a.attempt
                        )
                    };
                    // Why it retries (at 80 columns the detail pane has no
                    // room for the events that say it).
                    if let Some(e) = &a.last_error {
                        detail.push_str(": ");
                        detail.push_str(e);
                    }
                    if a.failure.is_some() {
                        DisplayState::AuthFailed
                    } else {
                        DisplayState::BackingOff
                    }
                }
                AgentState::Revoked => {
                    detail = a.last_error.clone().unwrap_or_default();
                    DisplayState::Revoked
                }
                AgentState::Failed => {
                    detail = a.last_error.clone().unwrap_or_default();
                    if a.last_error.as_deref().is_some_and(is_auth_error) {
                        DisplayState::AuthFailed
                    } else {
                        DisplayState::Failed
                    }
                }
                AgentState::Unknown => DisplayState::Unknown,
            }
        } else if let (Some(h), Some(AgentSide::Down(AgentDown::Stopped(why)))) = (
            hub.filter(|h| h.state != MemberState::Connected),
            &self.agent,
        ) {
            // Its agent on this machine stopped: said, rather than only the
            // hub's "disconnected" (connected, it runs somewhere else).
            detail = match why {
                Some(why) => why.clone(),
                None => match h.since {
                    Some(s) => format!(
                        "down {} · the agent on this machine stopped: start it again with 'towerctl join {} …'",
                        ago(s),
                        self.name
                    ),
                    None => format!("start it again with 'towerctl join {} …'", self.name),
                },
            };
            DisplayState::Stopped
        } else if let Some(h) = hub {
            match h.state {
                MemberState::Connected => DisplayState::Connected,
                MemberState::Disconnected => {
                    let why = h
                        .events
                        .iter()
                        .rev()
                        .find_map(|e| e.text.strip_prefix("disconnected: "));
                    detail = match (h.since, why) {
                        (Some(s), Some(w)) => format!("down {} · {w}", ago(s)),
                        (Some(s), None) => format!("down {}", ago(s)),
                        (None, Some(w)) => w.to_string(),
                        (None, None) => String::new(),
                    };
                    DisplayState::Disconnected
                }
                MemberState::NeverConnected => {
                    detail = format!("waiting for 'towerctl join {}'", self.name);
                    DisplayState::NeverConnected
                }
                // Handled above, before the agent's own view.
                MemberState::Revoked => DisplayState::Revoked,
                MemberState::Unknown => DisplayState::Unknown,
            }
        } else {
            match &self.agent {
                Some(AgentSide::Down(AgentDown::Stopped(why))) => {
                    detail = match why {
                        // It says what to do.
                        Some(why) => why.clone(),
                        None => format!("start it again with 'towerctl join {} …'", self.name),
                    };
                    DisplayState::Stopped
                }
                Some(AgentSide::Down(AgentDown::NotResponding(e))) => {
                    detail = format!("agent not responding: {e}");
                    DisplayState::Unknown
                }
                _ => {
                    detail = "hub unreachable".into();
                    DisplayState::Unknown
                }
            }
        };
        let connected = state == DisplayState::Connected;
        let hub_connected = hub.filter(|h| h.state == MemberState::Connected);
        let uptime = connected
            .then(|| {
                hub_connected.and_then(|h| h.since).or(agent
                    .filter(|a| a.state == AgentState::Connected)
                    .map(|a| a.since))
            })
            .flatten()
            .map(|s| now_unix.saturating_sub(s));
        let hub_side = self.hub.as_ref().filter(|h| !h.stale);
        // What the registry, the agents and other hubs wrote: ratatui drops
        // control characters, not bidi overrides or zero-width ones, which
        // a table cell passes to the terminal (a member shown as another).
        let inert = |s: &str, max: usize| crate::tunnel::printable(s, max);
        let remote = hub_connected
            .and_then(|h| {
                h.remote
                    .clone()
                    .or_else(|| h.hub.as_ref().map(|x| format!("via hub {x}")))
            })
            .or_else(|| agent.map(|a| format!("hub {}", hub_host(&a.hub))));
        let version = hub
            .and_then(|h| h.agent_version.clone())
            .or_else(|| agent.and_then(|a| a.version.clone()));
        RowView {
            name: inert(&self.name, 100),
            state,
            // From the hub: where the agent dials from; from the agent:
            // the hub it dials.
            // With several hubs, a member held by another: that hub.
            remote: remote.map(|r| inert(&r, 200)),
            version: version.map(|v| inert(&v, 64)),
            uptime,
            rtt_ms: if connected {
                hub_connected
                    .and_then(|h| h.rtt_ms)
                    .or(agent.and_then(|a| a.rtt_ms))
            } else {
                None
            },
            rate_in: hub_side.filter(|_| connected).map(|h| h.rate_in),
            rate_out: hub_side.filter(|_| connected).map(|h| h.rate_out),
            streams: hub_connected.map(|h| h.streams),
            // Each side counts since it started; the larger is the truer.
            reconnects: match (hub.map(|h| h.reconnects), agent.map(|a| a.reconnects)) {
                (Some(h), Some(a)) => Some(h.max(a)),
                (h, a) => h.or(a),
            },
            detail: inert(&detail, 500),
            animated,
        }
    }

    /// Events from both points of view, newest first.
    pub fn events(&self) -> Vec<(&'static str, &Event)> {
        let mut all: Vec<(&'static str, &Event)> = Vec::new();
        if let Some(h) = &self.hub {
            all.extend(h.status.events.iter().map(|e| ("hub", e)));
        }
        if let Some((a, _)) = self.live_agent() {
            all.extend(a.events.iter().map(|e| ("agent", e)));
        }
        // Stable sort: within a second, the original order (oldest first)
        // is kept, then everything is reversed.
        all.sort_by_key(|(_, e)| e.at);
        all.reverse();
        all
    }
}

impl App {
    pub fn new(now: Instant, now_unix: u64, mono: bool) -> App {
        App {
            now,
            now_unix,
            hub: HubState::Starting,
            clusters: BTreeMap::new(),
            selected: None,
            filter: String::new(),
            sort: SortKey::Name,
            mode: Mode::Normal,
            message: None,
            agents: None,
            forwards: Vec::new(),
            mono,
            dirty: true,
            quit: false,
            logins: Vec::new(),
        }
    }

    /// The clusters shown, filtered and sorted, with their merged views.
    pub fn visible(&self) -> Vec<(&Cluster, RowView)> {
        let needle = self.filter.to_lowercase();
        // A filter that reads as a label selector (`env=prod`, `!canary`,
        // `env in (a,b)`) selects by the hub's labels; any text also
        // matches names, states and `key=value` labels.
        let selector = self
            .filter
            .contains(['=', '!', '('])
            .then(|| crate::daemon::labels::Selector::parse(&self.filter).ok())
            .flatten();
        let no_labels = crate::daemon::labels::Labels::new();
        let mut rows: Vec<(&Cluster, RowView)> = self
            .clusters
            .values()
            .map(|c| (c, c.view(self.now, self.now_unix)))
            .filter(|(c, v)| {
                let labels = c.hub.as_ref().map_or(&no_labels, |h| &h.status.labels);
                match &selector {
                    Some(sel) => sel.matches(&crate::daemon::labels::selectable(labels, &c.name)),
                    None => {
                        needle.is_empty()
                            || c.name.to_lowercase().contains(&needle)
                            || v.state.label().contains(&needle)
                            || labels
                                .iter()
                                .any(|(k, v)| format!("{k}={v}").to_lowercase().contains(&needle))
                    }
                }
            })
            .collect();
        let key = |v: &RowView| -> f64 {
            match self.sort {
                SortKey::Rtt => -v.rtt_ms.unwrap_or(-1.0),
                SortKey::Traffic => -(v.rate_in.unwrap_or(0.0) + v.rate_out.unwrap_or(0.0)),
                SortKey::Reconnects => -(v.reconnects.unwrap_or(0) as f64),
                _ => 0.0,
            }
        };
        match self.sort {
            SortKey::Name => {} // BTreeMap order
            SortKey::State => rows.sort_by_key(|(_, v)| v.state),
            // Highest first; stable, so ties stay by name.
            _ => rows.sort_by(|(_, a), (_, b)| key(a).total_cmp(&key(b))),
        }
        rows
    }

    /// Index of the selected row among `rows`, defaulting to the first.
    pub fn selected_index(&self, rows: &[(&Cluster, RowView)]) -> Option<usize> {
        if rows.is_empty() {
            return None;
        }
        Some(
            self.selected
                .as_deref()
                .and_then(|s| rows.iter().position(|(c, _)| c.name == s))
                .unwrap_or(0),
        )
    }

    /// Whether something on screen moves by itself faster than once a
    /// second (a countdown), so the loop redraws at the animation rate.
    pub fn animating(&self) -> bool {
        self.clusters.values().any(|c| {
            c.retry_in(self.now)
                .is_some_and(|d| !d.is_zero() && d < TENTHS_UNDER)
        })
    }

    fn configured(&self, name: &str) -> bool {
        self.agents
            .as_ref()
            .is_none_or(|a| a.iter().any(|n| n == name))
    }

    fn say(&mut self, level: Level, text: impl Into<String>) {
        let until = self.now
            + match level {
                Level::Info => MESSAGE_FOR,
                Level::Error => ERROR_FOR,
            };
        self.message = Some(Message {
            text: text.into(),
            level,
            until,
        });
    }

    fn entry(&mut self, name: &str) -> &mut Cluster {
        self.clusters
            .entry(name.to_string())
            .or_insert_with(|| Cluster::new(name))
    }

    /// Drops clusters that neither view mentions any more.
    fn prune(&mut self) {
        self.clusters
            .retain(|_, c| c.hub.is_some() || c.agent.is_some());
    }

    /// Records one RTT sample a second per connected cluster.
    fn sample_rtt(&mut self) {
        let (now, now_unix) = (self.now, self.now_unix);
        for c in self.clusters.values_mut() {
            let rtt = c.view(now, now_unix).rtt_ms;
            while c
                .rtt_1m
                .front()
                .is_some_and(|(t, _)| now.saturating_duration_since(*t) > SPARK_WINDOW)
            {
                c.rtt_1m.pop_front();
            }
            if let Some(r) = rtt {
                let due = c.rtt_1m.back().is_none_or(|(t, _)| {
                    now.saturating_duration_since(*t) >= Duration::from_secs(1)
                });
                if due {
                    c.rtt_1m.push_back((now, r));
                    self.dirty = true;
                }
            }
        }
    }
}

fn rate(new: u64, old: u64, secs: f64) -> f64 {
    if secs <= 0.0 {
        return 0.0;
    }
    // Counters are per session: a smaller value means a new session
    // started since the last snapshot, and all of it was sent since.
    let delta = if new >= old { new - old } else { new };
    delta as f64 / secs
}

/// Applies one action. Returns the side effects to run.
pub fn update(app: &mut App, action: Action) -> Vec<Effect> {
    let mut effects = Vec::new();
    match action {
        Action::Key(k) => {
            app.dirty = true;
            effects.extend(key(app, k));
        }
        Action::Resize => app.dirty = true,
        Action::Tick => {
            if app.message.as_ref().is_some_and(|m| m.until <= app.now) {
                app.message = None;
                app.dirty = true;
            }
            app.sample_rtt();
        }
        Action::Hub(mut status) => {
            let clusters = std::mem::take(&mut status.clusters);
            let was = std::mem::replace(&mut app.hub, HubState::Up(status));
            if was != app.hub {
                app.dirty = true;
            }
            let now = app.now;
            let names: std::collections::HashSet<String> =
                clusters.iter().map(|c| c.name.clone()).collect();
            for c in app.clusters.values_mut() {
                if c.hub.is_some() && !names.contains(&c.name) {
                    c.hub = None;
                    app.dirty = true;
                }
            }
            for cs in clusters {
                let entry = app.entry(&cs.name);
                let (rate_in, rate_out) = match &entry.hub {
                    Some(old) if !old.stale => {
                        let secs = now.saturating_duration_since(old.at).as_secs_f64();
                        if secs < 0.2 {
                            // Two snapshots in a burst: keep the last rate.
                            (old.rate_in, old.rate_out)
                        } else {
                            (
                                rate(cs.bytes_in, old.status.bytes_in, secs),
                                rate(cs.bytes_out, old.status.bytes_out, secs),
                            )
                        }
                    }
                    _ => (0.0, 0.0),
                };
                let changed = entry.hub.as_ref().is_none_or(|old| {
                    old.stale
                        || old.status != cs
                        || old.rate_in != rate_in
                        || old.rate_out != rate_out
                });
                entry.hub = Some(HubSide {
                    status: cs,
                    at: now,
                    rate_in,
                    rate_out,
                    stale: false,
                });
                if changed {
                    app.dirty = true;
                }
            }
            app.prune();
        }
        Action::HubDown(why) => {
            let new = match why {
                HubDown::Absent => HubState::Absent,
                HubDown::Unreachable(e) => HubState::Unreachable(e),
            };
            if new != app.hub {
                app.hub = new;
                app.dirty = true;
            }
            for c in app.clusters.values_mut() {
                if let Some(h) = &mut c.hub {
                    if !h.stale {
                        h.stale = true;
                        app.dirty = true;
                    }
                }
            }
        }
        Action::Agent(status) if !app.configured(&status.name) => {}
        Action::AgentDown { name, .. } if !app.configured(&name) => {}
        Action::Agent(status) => {
            let now = app.now;
            let entry = app.entry(&status.name);
            let changed = match &entry.agent {
                // A countdown is re-anchored by every snapshot; a new one
                // with the same content is not a change worth a redraw.
                Some(AgentSide::Up { status: old, .. }) => {
                    let mut a = (**old).clone();
                    a.retry_in_ms = status.retry_in_ms;
                    a != *status
                }
                _ => true,
            };
            entry.agent = Some(AgentSide::Up { status, at: now });
            if changed {
                app.dirty = true;
            }
        }
        Action::AgentDown { name, why } => {
            let entry = app.entry(&name);
            let new = Some(AgentSide::Down(why));
            if entry.agent != new {
                entry.agent = new;
                app.dirty = true;
            }
        }
        Action::Forwards(f) => {
            app.forwards = f;
            app.dirty = true;
        }
        Action::Agents(names) => {
            for c in app.clusters.values_mut() {
                if c.agent.is_some() && !names.contains(&c.name) {
                    c.agent = None;
                }
            }
            app.prune();
            app.agents = Some(names);
            app.dirty = true;
        }
        Action::Done(r) => {
            app.dirty = true;
            match r {
                Ok(Outcome::Message(m)) => app.say(Level::Info, m),
                Ok(Outcome::Rotated { name, join_command }) => {
                    // One flag a line, continued with `\`: it fits a narrow
                    // terminal without wrapping, and still pastes into a
                    // shell as one command.
                    // The token apart too: a line wrapped between `join`
                    // and the name pasted as two commands. First in the
                    // popup, so that a short terminal shows it.
                    let join_command = join_command
                        .replace(" towerctl join ", " \\\n  towerctl join ")
                        .replace(" --", " \\\n    --");
                    app.say(Level::Info, format!("new join token issued for '{name}'"));
                    app.mode = Mode::Popup {
                        title: format!("New join command for '{name}'"),
                        body: format!(
                            "{join_command}\n\nFor a new or re-installed agent, run this in the member: the token is shown once, here only; the old token no longer works; a running agent keeps reconnecting with its key. Esc closes."
                        ),
                    };
                }
                Err(e) => app.say(Level::Error, e),
            }
        }
        Action::Quit => app.quit = true,
    }
    effects
}

fn key(app: &mut App, k: KeyEvent) -> Option<Effect> {
    if k.modifiers.contains(KeyModifiers::CONTROL) && k.code == KeyCode::Char('c') {
        app.quit = true;
        return None;
    }
    match app.mode.clone() {
        Mode::Help => {
            app.mode = Mode::Normal;
            None
        }
        Mode::Popup { .. } => {
            if matches!(
                k.code,
                KeyCode::Esc | KeyCode::Enter | KeyCode::Char('q') | KeyCode::Char(' ')
            ) {
                app.mode = Mode::Normal;
            }
            None
        }
        Mode::Confirm(c) => {
            app.mode = Mode::Normal;
            match k.code {
                KeyCode::Char('y') | KeyCode::Char('Y') => Some(match c {
                    Confirm::Disconnect(name) => Effect::Disconnect { name },
                    Confirm::Rotate(name) => Effect::RotateToken { name },
                }),
                _ => {
                    app.say(Level::Info, "cancelled");
                    None
                }
            }
        }
        Mode::PortForward { cluster, mut input } => {
            match k.code {
                KeyCode::Esc => {
                    app.mode = Mode::Normal;
                    app.say(Level::Info, "cancelled");
                }
                KeyCode::Enter => {
                    if input.trim().is_empty() {
                        app.mode = Mode::PortForward { cluster, input };
                        return None;
                    }
                    app.mode = Mode::Normal;
                    app.say(
                        Level::Info,
                        format!("starting a port-forward to {cluster} {input}…"),
                    );
                    return Some(Effect::PortForward {
                        cluster,
                        spec: input,
                    });
                }
                KeyCode::Backspace => {
                    input.pop();
                    app.mode = Mode::PortForward { cluster, input };
                }
                KeyCode::Char(ch) => {
                    input.push(ch);
                    app.mode = Mode::PortForward { cluster, input };
                }
                _ => app.mode = Mode::PortForward { cluster, input },
            }
            None
        }
        Mode::Filter => {
            match k.code {
                KeyCode::Esc => {
                    app.filter.clear();
                    app.mode = Mode::Normal;
                }
                KeyCode::Enter | KeyCode::Down | KeyCode::Up => app.mode = Mode::Normal,
                KeyCode::Backspace => {
                    app.filter.pop();
                }
                KeyCode::Char(ch) => app.filter.push(ch),
                _ => {}
            }
            None
        }
        Mode::Normal => normal_key(app, k),
    }
}

fn normal_key(app: &mut App, k: KeyEvent) -> Option<Effect> {
    let rows = app.visible();
    let idx = app.selected_index(&rows);
    let names: Vec<String> = rows.iter().map(|(c, _)| c.name.clone()).collect();
    let current: Option<(String, bool, DisplayState)> = idx.map(|i| {
        let (c, v) = &rows[i];
        (c.name.clone(), c.hub.is_some(), v.state)
    });
    drop(rows);
    let select = |app: &mut App, i: usize| {
        if let Some(n) = names.get(i) {
            app.selected = Some(n.clone());
        }
    };
    let last = names.len().saturating_sub(1);
    let i = idx.unwrap_or(0);
    match k.code {
        KeyCode::Char('q') => app.quit = true,
        KeyCode::Esc if app.filter.is_empty() => app.quit = true,
        KeyCode::Esc => app.filter.clear(),
        KeyCode::Down | KeyCode::Char('j') => select(app, (i + 1).min(last)),
        KeyCode::Up | KeyCode::Char('k') => select(app, i.saturating_sub(1)),
        KeyCode::PageDown => select(app, (i + 10).min(last)),
        KeyCode::PageUp => select(app, i.saturating_sub(10)),
        KeyCode::Home | KeyCode::Char('g') => select(app, 0),
        KeyCode::End | KeyCode::Char('G') => select(app, last),
        KeyCode::Char('/') => app.mode = Mode::Filter,
        KeyCode::Char('s') => {
            // Keep the row the operator is looking at selected.
            app.selected = current.map(|(n, _, _)| n);
            app.sort = app.sort.next();
            app.say(Level::Info, format!("sorted by {}", app.sort.label()));
        }
        KeyCode::Char('?') => app.mode = Mode::Help,
        KeyCode::Char('p') => {
            let (name, _, _) = current?;
            app.mode = Mode::PortForward {
                cluster: name,
                input: String::new(),
            };
        }
        KeyCode::Enter => {
            let (name, on_hub, _) = current?;
            let HubState::Up(hub) = &app.hub else {
                app.say(
                    Level::Error,
                    format!("cannot switch to '{name}': no hub answers on this machine; 'towerctl use {name}' works on the hub's machine"),
                );
                return None;
            };
            if !on_hub {
                app.say(
                    Level::Error,
                    format!("cannot switch to '{name}': it is not a member of the hub on this machine (its agent dials another hub)"),
                );
                return None;
            }
            return Some(Effect::UseContext {
                name,
                hub: hub.clone(),
            });
        }
        KeyCode::Char('d') => {
            let (name, on_hub, state) = current?;
            if !on_hub || !matches!(app.hub, HubState::Up(_)) {
                app.say(
                    Level::Error,
                    format!("cannot disconnect '{name}': only the hub it is a member of can, and it does not answer on this machine"),
                );
            } else if state != DisplayState::Connected {
                app.say(
                    Level::Error,
                    format!("'{name}' has no live session to disconnect"),
                );
            } else {
                app.mode = Mode::Confirm(Confirm::Disconnect(name));
            }
        }
        KeyCode::Char('r') => {
            let (name, on_hub, _) = current?;
            if !on_hub || !matches!(app.hub, HubState::Up(_)) {
                app.say(
                    Level::Error,
                    format!("cannot rotate the token of '{name}': only the hub it is a member of can, and it does not answer on this machine"),
                );
            } else {
                app.mode = Mode::Confirm(Confirm::Rotate(name));
            }
        }
        _ => {}
    }
    None
}
