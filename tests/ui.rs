//! End-to-end: `towerctl ui` in a real terminal (tmux, its own server
//! socket in the test's temp dir) against a real hub and two real agents
//! on loopback. The screen is read with `capture-pane`, keys are typed
//! with `send-keys`. Every wait is bounded; the tmux server is killed at
//! the end, whatever happens.

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::apiserver::ApiServer;
use support::{run_bounded, wait_for, Env, Out, TOWERCTL};

/// A tmux server of our own, running `towerctl ui` in one window.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn start(env: &Env, width: u16, height: u16) -> Tmux {
        let tmux = Tmux {
            socket: env.path("tmux.sock"),
        };
        let _ = std::fs::remove_file(env.path("stty-after.txt"));
        let o = tmux.run(
            env,
            &[
                "new-session",
                "-d",
                "-s",
                "ui",
                "-x",
                &width.to_string(),
                "-y",
                &height.to_string(),
                // After the dashboard exits, record the terminal's modes:
                // it must be back in cooked mode.
                &format!(
                    "{TOWERCTL} ui; echo $? > {}; stty -a > {}",
                    env.path("ui-exit.txt").display(),
                    env.path("stty-after.txt").display()
                ),
            ],
        );
        assert!(o.ok(), "tmux new-session: {o:?}");
        tmux
    }

    fn run(&self, env: &Env, args: &[&str]) -> Out {
        let mut c = Command::new("tmux");
        // The server (started by the first command) hands this environment
        // to the pane: the installation's HOME and XDG dirs, NO_COLOR.
        env.apply_env(&mut c);
        c.env("LANG", "C.UTF-8").env("TERM", "xterm-256color");
        // -u: UTF-8 whatever the locale says; -f: no user configuration.
        c.arg("-u")
            .arg("-f")
            .arg("/dev/null")
            .arg("-S")
            .arg(&self.socket)
            .args(args);
        run_bounded(c, Duration::from_secs(10))
    }

    fn capture(&self, env: &Env) -> String {
        let o = self.run(env, &["capture-pane", "-p", "-t", "ui"]);
        o.stdout
    }

    fn keys(&self, env: &Env, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "ui"];
        args.extend_from_slice(keys);
        let o = self.run(env, &args);
        assert!(o.ok(), "send-keys: {o:?}");
    }

    fn alive(&self, env: &Env) -> bool {
        self.run(env, &["has-session", "-t", "ui"]).ok()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .output();
    }
}

/// The text after the cluster's name on its table row.
fn row<'a>(screen: &'a str, name: &str) -> Option<&'a str> {
    screen.lines().find_map(|l| {
        let l = l.trim_start().trim_start_matches('>').trim_start();
        l.strip_prefix(name)
            .filter(|rest| rest.starts_with(' '))
            .map(str::trim_start)
    })
}

fn is_connected(screen: &str, name: &str) -> bool {
    row(screen, name).is_some_and(|r| r.starts_with("connected "))
}

/// A backing-off row's countdown: (seconds left, attempt).
fn countdown(screen: &str, name: &str) -> Option<(f64, u32)> {
    let r = row(screen, name)?;
    if !r.starts_with("backing off") {
        return None;
    }
    let rest = r.split("retry in ").nth(1)?;
    let (secs, rest) = rest.split_once("s (attempt ")?;
    let attempt = rest.split(')').next()?;
    Some((secs.parse().ok()?, attempt.parse().ok()?))
}

#[test]
fn the_dashboard_follows_a_hub_restart_and_switches_context() {
    let env = Env::new();
    let api = ApiServer::start();
    let web = support::http_server("forwarded from the dashboard");
    api.add_service(
        "default",
        "web",
        &[(
            "http",
            80,
            support::apiserver::TargetPort::Number(web.port()),
        )],
        &[("app", "web")],
    );
    api.set_endpoints("default", "web", &[("127.0.0.1", "", web.port())]);
    env.up();
    let member_kc = env.path("member.kubeconfig");
    api.write_kubeconfig(&member_kc);
    for name in ["alpha", "beta"] {
        let join = env.cluster_add(name);
        let o = env.join(
            &join,
            &[
                "--kubeconfig",
                member_kc.to_str().unwrap(),
                "--keepalive",
                "1s",
                "--backoff-cap",
                "4s",
                "--allow",
                "127.0.0.0/8",
            ],
        );
        assert!(o.ok(), "join {name}: {o:?}");
    }
    let s = env.status();
    let tunnel = s["hub"]["tunnelAddress"].as_str().unwrap().to_string();
    let gateway = s["hub"]["gatewayAddress"].as_str().unwrap().to_string();

    let tmux = Tmux::start(&env, 160, 48);
    // Connected, and the hub itself answering the dashboard again.
    let both_connected = |what: &str| {
        wait_for(what, Duration::from_secs(20), || {
            let s = tmux.capture(&env);
            (is_connected(&s, "alpha") && is_connected(&s, "beta") && s.contains("hub up"))
                .then_some(s)
        })
    };
    both_connected("both members to show as connected");

    // The hub goes away: the agents' own view keeps their rows, counting
    // down to the next attempt.
    env.kill9("hub");
    let stopped = std::time::Instant::now();
    let screen = wait_for(
        "both agents to show as backing off",
        Duration::from_secs(15),
        || {
            let s = tmux.capture(&env);
            (countdown(&s, "alpha").is_some() && countdown(&s, "beta").is_some()).then_some(s)
        },
    );
    assert!(screen.contains("hub unreachable"), "{screen}");
    // The countdown runs on the screen between snapshots: two captures a
    // moment apart, in the same attempt, show less time left.
    let (a, b) = wait_for(
        "a countdown that decreases between two captures",
        Duration::from_secs(15),
        || {
            let a = countdown(&tmux.capture(&env), "alpha")?;
            std::thread::sleep(Duration::from_millis(300));
            let b = countdown(&tmux.capture(&env), "alpha")?;
            (a.1 == b.1 && a.0 >= 0.5).then_some((a, b))
        },
    );
    assert!(
        b.0 < a.0,
        "the countdown did not decrease: {a:?} then {b:?}"
    );

    // The hub is back on the same addresses, after a few seconds away:
    // both reconnect by themselves and the dashboard picks the hub up again.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(stopped.elapsed()));
    let screen = tmux.capture(&env);
    assert!(
        row(&screen, "alpha")
            .is_some_and(|r| r.starts_with("backing off") || r.starts_with("connecting")),
        "alpha should still be retrying while the hub is down:\n{screen}"
    );
    env.up_on(&tunnel, &gateway);
    both_connected("both members to reconnect and the hub to answer");

    // Enter on beta (the second row, sorted by name) switches kubectl.
    tmux.keys(&env, &["Down"]);
    tmux.keys(&env, &["Enter"]);
    wait_for(
        "the current context to become tower-beta",
        Duration::from_secs(10),
        || {
            let o = env.kubectl(&["config", "current-context"]);
            (o.stdout.trim() == "tower-beta").then_some(())
        },
    );
    // The result is also on screen (drawn a moment after the file is
    // written).
    wait_for(
        "the switch to show as a message",
        Duration::from_secs(5),
        || {
            tmux.capture(&env)
                .contains("switched to context \"tower-beta\"")
                .then_some(())
        },
    );
    let o = env.kubectl(&["get", "ns"]);
    assert!(o.ok() && o.stdout.contains("default"), "{o:?}");

    // d on alpha, confirmed: the hub cuts its session with the operator's
    // reason, and the agent comes back by itself (from another port).
    let alpha = |s: &serde_json::Value| -> Option<serde_json::Value> {
        s["hub"]["clusters"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == "alpha")
            .cloned()
    };
    let before = alpha(&env.status()).unwrap()["remote"].clone();
    assert!(before.is_string(), "{before}");
    tmux.keys(&env, &["Up"]);
    tmux.keys(&env, &["d"]);
    wait_for("the confirmation", Duration::from_secs(5), || {
        tmux.capture(&env)
            .contains("Disconnect 'alpha'?")
            .then_some(())
    });
    tmux.keys(&env, &["y"]);
    wait_for(
        "the hub to record the operator's disconnect",
        Duration::from_secs(10),
        || {
            alpha(&env.status())?["events"]
                .as_array()?
                .iter()
                .any(|e| e["text"] == "disconnected: disconnected by an operator")
                .then_some(())
        },
    );
    wait_for(
        "the result of the disconnect on screen",
        Duration::from_secs(5),
        || {
            tmux.capture(&env)
                .contains("'alpha' disconnected; its agent reconnects by itself")
                .then_some(())
        },
    );
    let after = wait_for(
        "alpha's agent to reconnect after the operator's disconnect",
        Duration::from_secs(15),
        || {
            let a = alpha(&env.status())?;
            (a["state"] == "connected" && a["remote"] != before)
                .then(|| a["remote"].as_str().unwrap().to_string())
        },
    );
    wait_for(
        "the dashboard to show alpha's new session",
        Duration::from_secs(5),
        || {
            row(&tmux.capture(&env), "alpha")
                .is_some_and(|r| r.starts_with("connected ") && r.contains(&after))
                .then_some(())
        },
    );

    // A resize to 80x24 drops columns instead of wrapping.
    let o = tmux.run(&env, &["resize-window", "-t", "ui", "-x", "80", "-y", "24"]);
    assert!(o.ok(), "{o:?}");
    let screen = wait_for("a redraw at 80 columns", Duration::from_secs(5), || {
        let s = tmux.capture(&env);
        (s.lines().count() <= 24 && !s.contains("REMOTE") && s.contains("DETAIL")).then_some(s)
    });
    assert!(screen.lines().all(|l| l.chars().count() <= 80), "{screen}");
    assert!(is_connected(&screen, "alpha"), "{screen}");

    // r on alpha, confirmed: a new join command, shown once.
    tmux.keys(&env, &["r"]);
    wait_for("the confirmation", Duration::from_secs(5), || {
        tmux.capture(&env)
            .contains("Rotate the join token")
            .then_some(())
    });
    tmux.keys(&env, &["y"]);
    wait_for("the new join command", Duration::from_secs(10), || {
        let s = tmux.capture(&env);
        (s.contains("TOWERCTL_TOKEN=tj_") && s.contains("--hub-key")).then_some(())
    });
    tmux.keys(&env, &["Escape"]);

    // p on alpha: a background port-forward, listed in the detail pane.
    tmux.keys(&env, &["p"]);
    tmux.keys(&env, &["-l", "svc/web :80"]);
    tmux.keys(&env, &["Enter"]);
    let port: u16 = wait_for("the forward to start", Duration::from_secs(15), || {
        let s = tmux.capture(&env);
        let at = s.find("forwarding 127.0.0.1:")?;
        s[at + "forwarding 127.0.0.1:".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    let mut c = std::process::Command::new("curl");
    c.args([
        "-sS",
        "--max-time",
        "10",
        &format!("http://127.0.0.1:{port}/"),
    ]);
    let o = support::run_bounded(c, Duration::from_secs(20));
    assert!(o.stdout.contains("forwarded from the dashboard"), "{o:?}");
    wait_for(
        "the forward in the detail pane",
        Duration::from_secs(10),
        || {
            tmux.capture(&env)
                .contains(&format!("default/svc/web 127.0.0.1:{port} -> 80"))
                .then_some(())
        },
    );
    assert!(env.towerctl(&["port-forward", "stop", "--all"]).ok());

    // q quits, and the dashboard's window closes with it.
    tmux.keys(&env, &["q"]);
    wait_for("the dashboard to quit", Duration::from_secs(5), || {
        (!tmux.alive(&env)).then_some(())
    });
    let modes = modes_after(&env);
    for f in ["icanon", "echo", "isig"] {
        assert!(
            modes.iter().any(|m| m == f),
            "the terminal was left in raw mode ({f} is off): {modes:?}"
        );
    }
    let code = std::fs::read_to_string(env.path("ui-exit.txt")).unwrap();
    assert_eq!(code.trim(), "0", "q is a normal end");
}

/// The modes of the terminal the dashboard left behind, once it exited.
fn modes_after(env: &Env) -> Vec<String> {
    std::fs::read_to_string(env.path("stty-after.txt"))
        .unwrap()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_hangup_ends_the_dashboard_and_gives_the_terminal_back() {
    let env = Env::new();
    let tmux = Tmux::start(&env, 80, 24);
    let screen = wait_for("the dashboard", Duration::from_secs(10), || {
        let s = tmux.capture(&env);
        s.contains("no hub and no agent").then_some(s)
    });
    assert!(screen.contains("towerctl up"), "{screen}");
    // The pane runs `sh -c 'towerctl ui; stty …'`: the dashboard is the
    // shell's child.
    let o = tmux.run(&env, &["list-panes", "-t", "ui", "-F", "#{pane_pid}"]);
    let sh = o.stdout.trim().to_string();
    let ui = std::fs::read_to_string(format!("/proc/{sh}/task/{sh}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no child of the pane's shell {sh}"))
        .to_string();
    // What an SSH connection that drops sends.
    let st = Command::new("kill").args(["-HUP", &ui]).status().unwrap();
    assert!(st.success());
    wait_for("the dashboard to end", Duration::from_secs(5), || {
        (!tmux.alive(&env)).then_some(())
    });
    let modes = modes_after(&env);
    for f in ["icanon", "echo", "isig"] {
        assert!(
            modes.iter().any(|m| m == f),
            "the terminal was left in raw mode ({f} is off): {modes:?}"
        );
    }
    // Ended by SIGHUP: the shell's 128 + 1, not success.
    let code = std::fs::read_to_string(env.path("ui-exit.txt")).unwrap();
    assert_eq!(code.trim(), "129");
}
