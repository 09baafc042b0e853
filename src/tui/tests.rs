//! The dashboard in tests: `update` on plain state, golden screens of
//! `render` (insta snapshots, text plus the style of every run of cells, so
//! a colour change fails too), and the whole loop on `TestBackend`.

use std::time::{Duration, Instant};

use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::{Color, Modifier};
use ratatui::Terminal;
use tokio::sync::mpsc;

use super::app::{
    update, Action, AgentDown, App, DisplayState, Effect, HubDown, HubState, Mode, Outcome,
};
use super::render::render;
use crate::daemon::control::{AgentStatus, ClusterStatus, Event, HubStatus};

/// A fixed wall clock for every screen.
const NOW: u64 = 1_795_000_000;

fn hub(clusters: Vec<ClusterStatus>) -> HubStatus {
    HubStatus {
        pid: 4242,
        version: "0.1.0".into(),
        started_at: NOW - 3600,
        tunnel_addr: "127.0.0.1:8080".into(),
        gateway_addr: "127.0.0.1:9443".into(),
        tunnel_url: "ws://127.0.0.1:8080/tunnel".into(),
        gateway_url: "https://127.0.0.1:9443".into(),
        hub_key: "sha256:TESTKEY".into(),
        ca_pem: "-----BEGIN CERTIFICATE-----\n".into(),
        admin_token_file: "/nonexistent/admin.token".into(),
        metrics_addr: None,
        clusters,
        refusing_operators: None,
        trusted_proxies: vec![],
    }
}

fn ev(ago: u64, text: &str) -> Event {
    Event {
        at: NOW - ago,
        text: text.into(),
    }
}

fn connected(name: &str, i: u64) -> ClusterStatus {
    let rtt = 0.4 + (i % 7) as f64 * 0.9;
    ClusterStatus {
        name: name.into(),
        state: "connected".into(),
        since: Some(NOW - 30 - i * 97),
        remote: Some(format!("10.0.{}.{}:{}", i / 200, i % 200 + 1, 40000 + i)),
        rtt_ms: Some(rtt),
        streams: i % 4,
        agent_version: Some("0.1.0".into()),
        bytes_in: 1000 * i,
        bytes_out: 300 * i,
        reconnects: i % 3,
        rtt_history_ms: (0..20).map(|k| rtt + (k % 5) as f64 * 0.1).collect(),
        events: vec![
            ev(3600, "connected from 10.0.0.1:39999 (agent 0.1.0)"),
            ev(
                30 + i * 97 + 2,
                "disconnected: no answer to keepalives within 20s: declared dead",
            ),
            ev(
                30 + i * 97,
                &format!("connected from 10.0.0.1:{} (agent 0.1.0)", 40000 + i),
            ),
        ],
        key_fingerprint: Some("sha256:qDZSWxGLHEnr6l7P8cGwYaTMncnkf1/0KMXsn2FjMvE".into()),
        token_expires_at: None,
        token_state: "used".into(),
        hub: None,
        labels: Default::default(),
        impersonate: false,
    }
}

fn member(name: &str, state: &str, since: Option<u64>) -> ClusterStatus {
    ClusterStatus {
        name: name.into(),
        state: state.into(),
        since,
        remote: None,
        rtt_ms: None,
        streams: 0,
        agent_version: since.map(|_| "0.1.0".into()),
        bytes_in: 0,
        bytes_out: 0,
        reconnects: 0,
        rtt_history_ms: vec![],
        events: since
            .map(|s| vec![ev(NOW - s, "disconnected: session closed")])
            .unwrap_or_default(),
        key_fingerprint: None,
        token_expires_at: since.is_none().then_some(NOW + 20 * 3600),
        token_state: if since.is_none() { "unused" } else { "used" }.into(),
        hub: None,
        labels: Default::default(),
        impersonate: false,
    }
}

fn agent(name: &str, state: &str) -> AgentStatus {
    AgentStatus {
        name: name.into(),
        pid: 5000,
        hub: "ws://127.0.0.1:8080/tunnel".into(),
        state: state.into(),
        since: NOW - 30,
        rtt_ms: (state == "connected").then_some(0.61),
        attempt: if state == "backing_off" { 4 } else { 0 },
        retry_in_ms: (state == "backing_off").then_some(3_240),
        last_error: match state {
            "backing_off" => Some("cannot reach the hub at 'ws://127.0.0.1:8080/tunnel': Connection refused (os error 111)".into()),
            "failed" => Some("the hub refused the credentials of cluster 'x': the join token is wrong, expired or was rotated; run 'towerctl cluster add x' on the hub for a new join command".into()),
            _ => None,
        },
        failure: None,
        upstream: "https://10.96.0.1:443/".into(),
        denied_dials: 0,
        exposed: vec![],
        reconnects: 2,
        rtt_history_ms: vec![0.5, 0.61, 0.7, 0.55],
        events: vec![
            ev(40, "connected to ws://127.0.0.1:8080/tunnel"),
            ev(
                6,
                "disconnected: the tunnel failed: WebSocket protocol error: Connection reset without closing handshake",
            ),
        ],
        version: Some("0.1.0".into()),
    }
}

/// An app whose clock reads `NOW`, two minutes after `t0`.
fn app(mono: bool) -> (App, Instant) {
    let t0 = Instant::now();
    let mut a = App::new(t0 + Duration::from_secs(120), NOW, mono);
    a.hub = HubState::Starting;
    (a, t0)
}

/// Feeds two hub snapshots one second apart (so throughput has a rate) and
/// a minute of RTT samples.
fn feed_hub(a: &mut App, clusters: Vec<ClusterStatus>) {
    let now = a.now;
    let earlier: Vec<ClusterStatus> = clusters
        .iter()
        .cloned()
        .map(|mut c| {
            c.bytes_in /= 2;
            c.bytes_out /= 3;
            c
        })
        .collect();
    for k in 0..60u64 {
        a.now = now - Duration::from_secs(60 - k);
        let mut snap = earlier.clone();
        for (j, c) in snap.iter_mut().enumerate() {
            if let Some(r) = &mut c.rtt_ms {
                *r += ((k * 7 + j as u64 * 3) % 11) as f64 * 0.15;
            }
        }
        update(a, Action::Hub(Box::new(hub(snap))));
        update(a, Action::Tick);
    }
    a.now = now;
    update(a, Action::Hub(Box::new(hub(clusters))));
}

fn one(mono: bool) -> App {
    let (mut a, _) = app(mono);
    feed_hub(&mut a, vec![connected("alpha", 1)]);
    update(&mut a, Action::Agents(vec!["alpha".into()]));
    update(&mut a, Action::Agent(Box::new(agent("alpha", "connected"))));
    a
}

fn hundred(mono: bool) -> App {
    let (mut a, _) = app(mono);
    let mut clusters = Vec::new();
    let mut agents = Vec::new();
    for i in 0..100u64 {
        let name = format!("edge-{i:03}");
        let c = match i % 10 {
            6 => {
                agents.push(agent(&name, "backing_off"));
                member(&name, "disconnected", Some(NOW - 8))
            }
            7 => member(&name, "never_connected", None),
            8 => member(&name, "disconnected", Some(NOW - 600 - i)),
            9 => {
                agents.push(agent(&name, "failed"));
                member(&name, "disconnected", Some(NOW - 4000))
            }
            _ if i == 42 => member(&name, "revoked", Some(NOW - 100)),
            _ => connected(&name, i),
        };
        clusters.push(c);
    }
    feed_hub(&mut a, clusters);
    update(
        &mut a,
        Action::Agents(agents.iter().map(|a| a.name.clone()).collect()),
    );
    for s in agents {
        update(&mut a, Action::Agent(Box::new(s)));
    }
    a
}

fn empty(mono: bool) -> App {
    let (mut a, _) = app(mono);
    update(&mut a, Action::Hub(Box::new(hub(vec![]))));
    update(&mut a, Action::Agents(vec![]));
    a
}

fn key(c: KeyCode) -> Action {
    Action::Key(KeyEvent::new(c, KeyModifiers::NONE))
}

fn ch(c: char) -> Action {
    key(KeyCode::Char(c))
}

/// The screen as text, then every run of styled cells, so a snapshot
/// catches a colour or emphasis change as well as a text change.
fn dump(buf: &Buffer) -> String {
    let area = buf.area;
    let mut out = String::new();
    for y in 0..area.height {
        for x in 0..area.width {
            out.push_str(buf[(x, y)].symbol());
        }
        out.push('\n');
    }
    out.push_str("--- styles (row: columns fg/bg +modifiers)\n");
    for y in 0..area.height {
        let mut runs: Vec<String> = Vec::new();
        let mut x = 0;
        while x < area.width {
            let c = &buf[(x, y)];
            let key = (c.fg, c.bg, c.modifier);
            let start = x;
            while x < area.width {
                let d = &buf[(x, y)];
                if (d.fg, d.bg, d.modifier) != key {
                    break;
                }
                x += 1;
            }
            if key != (Color::Reset, Color::Reset, Modifier::empty()) {
                let mut r = format!("{start}-{}", x - 1);
                if key.0 != Color::Reset {
                    r.push_str(&format!(" fg={:?}", key.0));
                }
                if key.1 != Color::Reset {
                    r.push_str(&format!(" bg={:?}", key.1));
                }
                if !key.2.is_empty() {
                    r.push_str(&format!(" +{:?}", key.2));
                }
                runs.push(r);
            }
        }
        if !runs.is_empty() {
            out.push_str(&format!("{y}: {}\n", runs.join(", ")));
        }
    }
    out
}

fn screen(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| render(app, f)).unwrap();
    dump(t.backend().buffer())
}

fn text_of(app: &App, w: u16, h: u16) -> String {
    let s = screen(app, w, h);
    s.split("--- styles").next().unwrap().to_string()
}

macro_rules! screens {
    ($($name:ident: $app:expr, $w:expr, $h:expr;)*) => {$(
        #[test]
        fn $name() {
            insta::assert_snapshot!(screen(&$app, $w, $h));
        }
    )*};
}

screens! {
    screen_0_clusters_80x24: empty(false), 80, 24;
    screen_0_clusters_80x24_no_color: empty(true), 80, 24;
    screen_0_clusters_160x48: empty(false), 160, 48;
    screen_0_clusters_160x48_no_color: empty(true), 160, 48;
    screen_1_cluster_80x24: one(false), 80, 24;
    screen_1_cluster_80x24_no_color: one(true), 80, 24;
    screen_1_cluster_160x48: one(false), 160, 48;
    screen_1_cluster_160x48_no_color: one(true), 160, 48;
    screen_100_clusters_80x24: hundred(false), 80, 24;
    screen_100_clusters_80x24_no_color: hundred(true), 80, 24;
    screen_100_clusters_160x48: hundred(false), 160, 48;
    screen_100_clusters_160x48_no_color: hundred(true), 160, 48;
}

#[test]
fn screen_nothing_on_this_machine() {
    let (mut a, _) = app(true);
    update(&mut a, Action::HubDown(HubDown::Absent));
    update(&mut a, Action::Agents(vec![]));
    insta::assert_snapshot!(screen(&a, 80, 24));
    // An operator's machine: not told to start a hub.
    a.logins = vec!["https://hub.example:9443 as 'alice'".into()];
    a.dirty = true;
    let s = text_of(&a, 100, 24);
    assert!(
        s.contains("Logged in to https://hub.example:9443 as 'alice'.")
            && s.contains("towerctl use")
            && !s.contains("Start a hub"),
        "{s}"
    );
}

/// A hub on etcd that cannot confirm its registry says at the top that it
/// refuses operators (`--store-max-stale`).
#[test]
fn screen_hub_refusing_operators() {
    let mut a = one(true);
    let mut h = hub(vec![connected("alpha", 1)]);
    h.refusing_operators =
        Some("its copy of the shared registry was last confirmed 75.0s ago".into());
    update(&mut a, Action::Hub(Box::new(h)));
    insta::assert_snapshot!(screen(&a, 120, 12));
}

#[test]
fn screen_help() {
    let mut a = one(false);
    update(&mut a, ch('?'));
    insta::assert_snapshot!(screen(&a, 80, 24));
    let mut a = one(true);
    update(&mut a, ch('?'));
    insta::assert_snapshot!("screen_help_160x48_no_color", screen(&a, 160, 48));
}

/// The detail pane of an agent counting down while its hub (on this
/// machine) does not answer: the agent's own view keeps the row alive.
#[test]
fn screen_detail_backing_off_with_the_hub_down() {
    let mut a = one(false);
    update(
        &mut a,
        Action::HubDown(HubDown::Unreachable(
            "not answering: connection refused".into(),
        )),
    );
    update(
        &mut a,
        Action::Agent(Box::new(agent("alpha", "backing_off"))),
    );
    insta::assert_snapshot!(screen(&a, 120, 30));
}

#[test]
fn screen_detail_of_a_selected_member() {
    let mut a = hundred(false);
    for _ in 0..9 {
        update(&mut a, key(KeyCode::Down));
    }
    assert_eq!(a.selected.as_deref(), Some("edge-009"));
    insta::assert_snapshot!(screen(&a, 160, 48));
}

#[test]
fn screen_narrow_terminal_drops_columns() {
    let a = hundred(true);
    let s = text_of(&a, 60, 20);
    for line in s.lines() {
        assert!(line.chars().count() <= 60);
    }
    assert!(s.contains("NAME") && s.contains("STATE") && s.contains("DETAIL"));
    assert!(!s.contains("REMOTE") && !s.contains("VERSION"), "{s}");
    insta::assert_snapshot!(screen(&a, 60, 20));
    // Narrower than NAME and STATE: NAME gives way, STATE stays (it was
    // dropped, and DETAIL kept, below 27 columns with these names).
    let s = text_of(&a, 24, 6);
    assert!(s.contains("STATE") && s.contains("connected"), "{s}");
}

#[test]
fn screen_confirm_and_new_token_popup() {
    let mut a = one(true);
    update(&mut a, ch('r'));
    insta::assert_snapshot!("screen_confirm_rotate", screen(&a, 80, 24));
    let fx = update(&mut a, ch('y'));
    assert_eq!(
        fx,
        vec![Effect::RotateToken {
            name: "alpha".into()
        }]
    );
    update(
        &mut a,
        Action::Done(Ok(Outcome::Rotated {
            name: "alpha".into(),
            join_command: " TOWERCTL_TOKEN=tj_NEWTOKEN0123456789abcdefghijklmnopqrstuvwxyz0123 towerctl join alpha --hub ws://127.0.0.1:8080/tunnel --hub-key sha256:TESTKEY0123456789abcdefghijklmnopqrstuvwxyz012".into(),
        })),
    );
    insta::assert_snapshot!("screen_new_token_popup", screen(&a, 100, 30));
    // At 80 columns every line of the command is whole, each but the
    // last continued with `\` (a line wrapped between `join` and the
    // name pasted into a shell as two commands).
    let s = screen(&a, 80, 24);
    for line in [
        "TOWERCTL_TOKEN=tj_NEWTOKEN0123456789abcdefghijklmnopqrstuvwxyz0123 \\",
        "towerctl join alpha \\",
        "--hub ws://127.0.0.1:8080/tunnel \\",
    ] {
        assert!(
            s.lines().any(|l| l.trim_end().ends_with(line)),
            "{line}\n{s}"
        );
    }
    assert!(
        s.lines().any(|l| l
            .trim_end()
            .ends_with("--hub-key sha256:TESTKEY0123456789abcdefghijklmnopqrstuvwxyz012")),
        "{s}"
    );
}

#[test]
fn screen_filter_and_sort() {
    let mut a = hundred(true);
    for c in "/edge-04".chars() {
        update(&mut a, ch(c));
    }
    insta::assert_snapshot!("screen_filter_typing", screen(&a, 100, 20));
    update(&mut a, key(KeyCode::Enter));
    update(&mut a, ch('s'));
    assert_eq!(a.mode, Mode::Normal);
    insta::assert_snapshot!("screen_filter_sorted_by_state", screen(&a, 100, 20));
}

// ---- update: behaviour without a screen

#[test]
fn an_agent_retrying_after_a_host_key_mismatch_is_not_shown_as_an_outage() {
    let mut a = one(true);
    let mut st = agent("alpha", "backing_off");
    st.failure = Some(crate::daemon::control::FailureKind::HostKey);
    update(&mut a, Action::Agent(Box::new(st)));
    let row = a.clusters["alpha"].view(a.now, a.now_unix);
    assert_eq!(row.state, DisplayState::AuthFailed);
    assert!(
        row.detail.starts_with("hub host key mismatch · retry in"),
        "{}",
        row.detail
    );
}

#[test]
fn the_countdown_runs_down_between_snapshots() {
    let mut a = one(true);
    update(
        &mut a,
        Action::Agent(Box::new(agent("alpha", "backing_off"))),
    );
    let row = |a: &App| a.clusters["alpha"].view(a.now, a.now_unix);
    // The countdown, before the reason it retries after.
    let countdown = |a: &App| {
        let d = row(a).detail;
        d.split(": ").next().unwrap().to_string()
    };
    assert_eq!(row(&a).state, DisplayState::BackingOff);
    assert_eq!(countdown(&a), "retry in 3.3s (attempt 4)");
    assert!(a.animating());
    a.now += Duration::from_millis(1000);
    assert_eq!(countdown(&a), "retry in 2.3s (attempt 4)");
    a.now += Duration::from_millis(2240);
    assert_eq!(countdown(&a), "retrying now (attempt 4)");
    assert!(!a.animating());
    // A later snapshot re-anchors the countdown.
    update(
        &mut a,
        Action::Agent(Box::new(agent("alpha", "backing_off"))),
    );
    assert_eq!(countdown(&a), "retry in 3.3s (attempt 4)");
    // A long wait shows whole seconds and is not animated (redrawn once a
    // second); under ten seconds, tenths at the animation rate.
    let mut long = agent("alpha", "backing_off");
    long.retry_in_ms = Some(24_200);
    update(&mut a, Action::Agent(Box::new(long)));
    assert_eq!(countdown(&a), "retry in 25s (attempt 4)");
    assert!(!a.animating());
    a.now += Duration::from_millis(14_300);
    assert_eq!(countdown(&a), "retry in 9.9s (attempt 4)");
    assert!(a.animating());
}

#[test]
fn throughput_comes_from_deltas_and_survives_a_counter_reset() {
    let (mut a, _) = app(true);
    let mut c = connected("alpha", 1);
    c.bytes_in = 10_000;
    c.bytes_out = 1_000;
    update(&mut a, Action::Hub(Box::new(hub(vec![c.clone()]))));
    a.now += Duration::from_millis(500);
    c.bytes_in = 15_000;
    c.bytes_out = 1_500;
    update(&mut a, Action::Hub(Box::new(hub(vec![c.clone()]))));
    let v = a.clusters["alpha"].view(a.now, a.now_unix);
    assert_eq!(v.rate_in, Some(10_000.0));
    assert_eq!(v.rate_out, Some(1_000.0));
    // A new session starts its counters at zero.
    a.now += Duration::from_secs(1);
    c.bytes_in = 2_000;
    c.bytes_out = 0;
    update(&mut a, Action::Hub(Box::new(hub(vec![c]))));
    let v = a.clusters["alpha"].view(a.now, a.now_unix);
    assert_eq!(v.rate_in, Some(2_000.0));
    assert_eq!(v.rate_out, Some(0.0));
}

#[test]
fn a_lost_hub_keeps_the_agents_rows_and_marks_its_members_unknown() {
    let mut a = hundred(true);
    update(
        &mut a,
        Action::HubDown(HubDown::Unreachable("connection refused".into())),
    );
    assert!(matches!(a.hub, HubState::Unreachable(_)));
    let v = |a: &App, n: &str| a.clusters[n].view(a.now, a.now_unix);
    // Agent on this machine: its own state.
    assert_eq!(v(&a, "edge-006").state, DisplayState::BackingOff);
    assert_eq!(v(&a, "edge-009").state, DisplayState::AuthFailed);
    // Hub-only member: nothing trustworthy to say.
    assert_eq!(v(&a, "edge-000").state, DisplayState::Unknown);
    assert_eq!(v(&a, "edge-000").detail, "hub unreachable");
    assert_eq!(v(&a, "edge-000").rtt_ms, None);
    assert_eq!(a.clusters.len(), 100);
    // Back: fresh numbers again.
    update(
        &mut a,
        Action::Hub(Box::new(hub(vec![connected("edge-000", 0)]))),
    );
    assert_eq!(v(&a, "edge-000").state, DisplayState::Connected);
    // Members the hub no longer lists are gone, unless an agent here has them.
    assert!(!a.clusters.contains_key("edge-001"));
    assert!(a.clusters.contains_key("edge-006"));
}

#[test]
fn states_map_from_both_points_of_view() {
    let (mut a, _) = app(true);
    update(
        &mut a,
        Action::Hub(Box::new(hub(vec![
            member("rev", "revoked", Some(NOW - 5)),
            member("never", "never_connected", None),
        ]))),
    );
    let mut failed_other = agent("other", "failed");
    failed_other.last_error = Some("invalid hub URL 'x'".into());
    update(&mut a, Action::Agent(Box::new(failed_other)));
    let mut connecting = agent("dialing", "connecting");
    connecting.retry_in_ms = None;
    update(&mut a, Action::Agent(Box::new(connecting)));
    update(
        &mut a,
        Action::AgentDown {
            name: "gone".into(),
            why: AgentDown::Stopped(None),
        },
    );
    let s = |n: &str| a.clusters[n].view(a.now, a.now_unix).state;
    assert_eq!(s("rev"), DisplayState::Revoked);
    assert_eq!(s("never"), DisplayState::NeverConnected);
    assert_eq!(s("other"), DisplayState::Failed);
    assert_eq!(s("dialing"), DisplayState::Connecting);
    assert_eq!(s("gone"), DisplayState::Stopped);
    let detail = a.clusters["gone"].view(a.now, a.now_unix).detail;
    assert!(detail.contains("start it again"), "{detail}");
    // One that stopped on an error shows it (it says what to do).
    update(
        &mut a,
        Action::AgentDown {
            name: "gone".into(),
            why: AgentDown::Stopped(Some("cluster 'gone' was revoked on the hub".into())),
        },
    );
    let view = a.clusters["gone"].view(a.now, a.now_unix);
    assert_eq!(view.state, DisplayState::Stopped);
    assert_eq!(view.detail, "cluster 'gone' was revoked on the hub");
}

#[test]
fn an_unchanged_snapshot_does_not_redraw() {
    let mut a = hundred(true);
    a.dirty = false;
    let again: Vec<ClusterStatus> = a
        .clusters
        .values()
        .filter_map(|c| c.hub.as_ref().map(|h| h.status.clone()))
        .collect();
    // Throughput is recomputed from a snapshot a second later: the
    // connected rows with traffic change, the rest do not.
    a.now += Duration::from_secs(1);
    update(&mut a, Action::Hub(Box::new(hub(again.clone()))));
    assert!(a.dirty);
    a.dirty = false;
    a.now += Duration::from_secs(1);
    update(&mut a, Action::Hub(Box::new(hub(again))));
    assert!(!a.dirty, "identical snapshots must not cause a redraw");
    update(
        &mut a,
        Action::Agent(Box::new(agent("edge-006", "backing_off"))),
    );
    assert!(!a.dirty, "a re-anchored countdown alone is not a change");
}

#[test]
fn keys_become_effects_only_after_confirmation() {
    let mut a = one(true);
    // Enter: `towerctl use`, with the hub's details.
    let fx = update(&mut a, key(KeyCode::Enter));
    match &fx[..] {
        [Effect::UseContext { name, hub }] => {
            assert_eq!(name, "alpha");
            assert_eq!(hub.gateway_url, "https://127.0.0.1:9443");
        }
        other => panic!("{other:?}"),
    }
    // d asks first; n cancels; y disconnects.
    assert!(update(&mut a, ch('d')).is_empty());
    assert!(matches!(a.mode, Mode::Confirm(_)));
    assert!(update(&mut a, ch('n')).is_empty());
    assert_eq!(a.mode, Mode::Normal);
    assert_eq!(a.message.as_ref().unwrap().text, "cancelled");
    update(&mut a, ch('d'));
    assert_eq!(
        update(&mut a, ch('y')),
        vec![Effect::Disconnect {
            name: "alpha".into()
        }]
    );
    // Results show as a transient message that goes away.
    update(
        &mut a,
        Action::Done(Err("cannot disconnect 'alpha': gone".into())),
    );
    assert!(a.message.is_some());
    a.now += Duration::from_secs(11);
    update(&mut a, Action::Tick);
    assert!(a.message.is_none());
    // p asks for the forward; Esc cancels.
    assert!(update(&mut a, ch('p')).is_empty());
    assert!(matches!(a.mode, Mode::PortForward { .. }));
    update(&mut a, key(KeyCode::Esc));
    assert_eq!(a.mode, Mode::Normal);
    // Without a hub, Enter explains instead of failing later.
    update(&mut a, Action::HubDown(HubDown::Absent));
    assert!(update(&mut a, key(KeyCode::Enter)).is_empty());
    assert!(a.message.as_ref().unwrap().text.contains("no hub answers"));
}

#[test]
fn the_filter_selects_by_labels() {
    let mut a = hundred(true);
    let mut clusters: Vec<ClusterStatus> = a
        .clusters
        .values()
        .filter_map(|c| c.hub.as_ref().map(|h| h.status.clone()))
        .collect();
    for (i, c) in clusters.iter_mut().enumerate() {
        let env = if i % 4 == 0 { "prod" } else { "dev" };
        c.labels.insert("env".into(), env.into());
    }
    feed_hub(&mut a, clusters);
    for c in "/env=prod".chars() {
        update(&mut a, ch(c));
    }
    update(&mut a, key(KeyCode::Enter));
    assert_eq!(a.visible().len(), 25);
    a.filter = "env!=prod".into();
    assert_eq!(a.visible().len(), 75);
    a.filter = "env in (prod,dev),!canary".into();
    assert_eq!(a.visible().len(), 100);
    // Plain text matches label text too.
    a.filter = "prod".into();
    assert_eq!(a.visible().len(), 25);
    // The detail pane shows them.
    a.filter = "env=prod".into();
    let s = text_of(&a, 160, 48);
    assert!(s.contains("labels") && s.contains("env=prod"), "{s}");
}

#[test]
fn esc_clears_a_filter_before_it_quits_and_q_quits() {
    let mut a = hundred(true);
    for c in "/edge-00".chars() {
        update(&mut a, ch(c));
    }
    update(&mut a, key(KeyCode::Enter));
    assert_eq!(a.visible().len(), 10);
    update(&mut a, key(KeyCode::Esc));
    assert!(!a.quit);
    assert_eq!(a.visible().len(), 100);
    update(&mut a, key(KeyCode::Esc));
    assert!(a.quit);
    let mut a = one(true);
    update(&mut a, ch('?'));
    update(&mut a, ch('q'));
    assert!(!a.quit, "q closes the help first");
    update(&mut a, ch('q'));
    assert!(a.quit);
}

#[test]
fn sorting_keeps_the_selection() {
    let mut a = hundred(true);
    update(&mut a, key(KeyCode::Down));
    assert_eq!(a.selected.as_deref(), Some("edge-001"));
    update(&mut a, ch('s'));
    let rows = a.visible();
    assert_eq!(rows[0].1.state, DisplayState::AuthFailed);
    assert_eq!(rows[a.selected_index(&rows).unwrap()].0.name, "edge-001");
}

// ---- the whole loop, on TestBackend

struct FakeEffects(std::sync::Mutex<Vec<Effect>>);

impl super::Effects for FakeEffects {
    fn start(&self, effect: Effect, done: mpsc::Sender<Action>) {
        let msg = match &effect {
            Effect::UseContext { name, .. } => format!("switched to context \"tower-{name}\""),
            e => format!("{e:?}"),
        };
        self.0.lock().unwrap().push(effect);
        tokio::spawn(async move {
            let _ = done.send(Action::Done(Ok(Outcome::Message(msg)))).await;
        });
    }
}

#[tokio::test(start_paused = true)]
async fn the_loop_runs_on_a_test_backend() {
    let mut terminal = Terminal::new(TestBackend::new(100, 30)).unwrap();
    let clock = || {
        (
            tokio::time::Instant::now().into_std(),
            NOW + tokio::time::Instant::now().elapsed().as_secs(),
        )
    };
    let mut app = App::new(clock().0, NOW, true);
    let (tx, rx) = mpsc::channel(16);
    let fx = FakeEffects(Default::default());
    let driver = {
        let tx = tx.clone();
        async move {
            let step = Duration::from_millis(300);
            tx.send(Action::Hub(Box::new(hub(vec![
                connected("alpha", 1),
                connected("beta", 2),
            ]))))
            .await
            .unwrap();
            tokio::time::sleep(step).await;
            tx.send(Action::Agent(Box::new(agent("beta", "backing_off"))))
                .await
                .unwrap();
            tx.send(key(KeyCode::Down)).await.unwrap();
            tx.send(key(KeyCode::Enter)).await.unwrap();
            tokio::time::sleep(step).await;
            tx.send(Action::Resize).await.unwrap();
            tokio::time::sleep(step).await;
            tx.send(ch('q')).await.unwrap();
        }
    };
    let (r, ()) = tokio::join!(
        super::run(&mut terminal, &mut app, rx, tx, &fx, clock),
        driver
    );
    r.unwrap();
    assert!(app.quit);
    let effects = fx.0.lock().unwrap().clone();
    assert!(
        matches!(&effects[..], [Effect::UseContext { name, .. }] if name == "beta"),
        "{effects:?}"
    );
    let shown = dump(terminal.backend().buffer());
    assert!(
        shown.contains("switched to context \"tower-beta\""),
        "{shown}"
    );
    // The countdown was drawn as it ran down: 3.3s when the snapshot came,
    // about half a second less at the last frame, with no new snapshot
    // (the loop redraws a running countdown by itself).
    let left: f64 = shown
        .split("retry in ")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no countdown on screen:\n{shown}"));
    assert!(
        (2.5..=2.9).contains(&left),
        "countdown at {left}s:\n{shown}"
    );
}

#[test]
fn an_agent_that_left_does_not_come_back_from_a_late_snapshot() {
    let mut a = one(true);
    update(&mut a, Action::Agents(vec![]));
    assert!(a.clusters["alpha"].agent.is_none());
    update(
        &mut a,
        Action::Agent(Box::new(agent("alpha", "backing_off"))),
    );
    update(
        &mut a,
        Action::AgentDown {
            name: "zeta".into(),
            why: AgentDown::Stopped(None),
        },
    );
    assert!(a.clusters["alpha"].agent.is_none());
    assert!(!a.clusters.contains_key("zeta"));
}

#[test]
fn p_types_a_port_forward_and_the_pane_lists_forwards() {
    let mut a = one(true);
    assert!(update(&mut a, ch('p')).is_empty());
    for c in "svc/web 8080:80 -n shop".chars() {
        assert!(update(&mut a, ch(c)).is_empty());
    }
    insta::assert_snapshot!("screen_port_forward_prompt", screen(&a, 80, 24));
    assert_eq!(
        update(&mut a, key(KeyCode::Enter)),
        vec![Effect::PortForward {
            cluster: "alpha".into(),
            spec: "svc/web 8080:80 -n shop".into()
        }]
    );
    assert_eq!(a.mode, Mode::Normal);
    // Esc cancels without an effect.
    update(&mut a, ch('p'));
    assert!(update(&mut a, key(KeyCode::Esc)).is_empty());
    assert_eq!(a.mode, Mode::Normal);
    // Background forwards of the selected cluster show in its pane.
    update(
        &mut a,
        Action::Forwards(vec![crate::daemon::forwards::Background {
            id: "k3x9".into(),
            pid: 77,
            cluster: "alpha".into(),
            resource: "svc/web".into(),
            namespace: "shop".into(),
            forwarding: vec!["127.0.0.1:8080 -> 80".into()],
        }]),
    );
    assert!(text_of(&a, 160, 48).contains("k3x9 shop/svc/web 127.0.0.1:8080 -> 80"));
}

/// What a row shows came from the registry, the agents and other hubs: a
/// right-to-left override or a zero-width space in a version or a remote
/// address (which ratatui passes to the terminal inside a table cell) is
/// shown as a space, and nothing is unbounded.
#[test]
fn a_rows_text_from_others_is_shown_inert() {
    let (mut a, _) = app(true);
    let mut c = connected("alpha", 1);
    c.agent_version = Some("0.1\u{202e}0.9".into());
    c.remote = Some(format!("10.0.0.1:1\u{200b}{}", "x".repeat(1000)));
    update(&mut a, Action::Hub(Box::new(hub(vec![c]))));
    let v = a.clusters["alpha"].view(a.now, a.now_unix);
    assert_eq!(v.version.as_deref(), Some("0.1 0.9"));
    let remote = v.remote.unwrap();
    assert!(
        remote.starts_with("10.0.0.1:1 x") && remote.chars().count() <= 200,
        "{remote}"
    );
}

#[test]
fn a_stopped_local_agent_shows_through_the_hubs_view_and_a_retry_says_why() {
    let (mut a, _) = app(true);
    update(
        &mut a,
        Action::Hub(Box::new(hub(vec![
            member("halted", "disconnected", Some(NOW - 420)),
            connected("elsewhere", 1),
            member("retrying", "disconnected", Some(NOW - 8)),
        ]))),
    );
    for name in ["halted", "elsewhere"] {
        update(
            &mut a,
            Action::AgentDown {
                name: name.into(),
                why: AgentDown::Stopped(None),
            },
        );
    }
    update(
        &mut a,
        Action::Agent(Box::new(agent("retrying", "backing_off"))),
    );
    let view = |n: &str| a.clusters[n].view(a.now, a.now_unix);
    // The hub says "disconnected"; the agent here stopped: the way out.
    assert_eq!(view("halted").state, DisplayState::Stopped);
    assert!(
        view("halted").detail.contains("down 7m")
            && view("halted")
                .detail
                .contains("the agent on this machine stopped"),
        "{}",
        view("halted").detail
    );
    // Connected through the hub: its agent runs on another machine.
    assert_eq!(view("elsewhere").state, DisplayState::Connected);
    // Backing off: the countdown, then the reason.
    let d = view("retrying").detail;
    assert!(
        d.starts_with("retry in") && d.ends_with("Connection refused (os error 111)"),
        "{d}"
    );
}

#[test]
fn long_names_are_cut_in_the_middle_never_silently() {
    let (mut a, _) = app(true);
    feed_hub(
        &mut a,
        vec![
            member("production-eu-west-1-cluster-aaa", "never_connected", None),
            member("production-eu-west-1-cluster-bbb", "never_connected", None),
        ],
    );
    // 80 columns: NAME up to 32 wide, each name whole.
    let s = text_of(&a, 80, 12);
    assert!(s.contains("production-eu-west-1-cluster-aaa"), "{s}");
    // 60 columns: 24 wide, cut in the middle, still told apart.
    let s = text_of(&a, 60, 12);
    assert!(
        s.contains("production-e…cluster-aaa") && s.contains("production-e…cluster-bbb"),
        "{s}"
    );
}

/// With more members than rows, the header says which are shown, and the
/// range follows the selection down the list.
#[test]
fn a_long_list_says_which_rows_it_shows() {
    let mut a = hundred(false);
    assert!(text_of(&a, 80, 24).contains(" 1–13 of 100 "));
    for _ in 0..30 {
        update(&mut a, key(KeyCode::Down));
    }
    let t = text_of(&a, 80, 24);
    assert!(t.contains(" 19–31 of 100 "), "{t}");
    assert!(t.contains("> edge-030"), "{t}");
    // All of them fit: nothing said.
    assert!(!text_of(&one(false), 80, 24).contains(" of 1 "));
}
