//! The image `scripts/image.sh` builds (offline, FROM scratch) runs
//! `towerctl --version`, and runs an agent that joins a hub on the host
//! network, read-only, as the pod would. Needs podman (and buildah or
//! podman to build) that can run containers here; where they cannot, the
//! test says so on its output (.config/nextest.toml shows it) and passes.
//! Images and containers live in a storage directory of the test's own.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::apiserver::ApiServer;
use support::{run_bounded, wait_for, Env, Out};

fn skip(why: &str) {
    let msg = format!("SKIPPED image test: {why}");
    println!("{msg}");
    eprintln!("{msg}");
}

/// podman or buildah with the test's own storage and state.
struct Podman {
    dir: tempfile::TempDir,
    /// Extra `podman run` flags this machine needs.
    run_flags: Vec<String>,
    containers: Vec<String>,
}

impl Podman {
    fn cmd(&self, tool: &str, args: &[&str]) -> Command {
        let mut c = Command::new(tool);
        c.env(
            "CONTAINERS_STORAGE_CONF",
            self.dir.path().join("storage.conf"),
        );
        if tool == "podman" {
            c.arg("--tmpdir").arg(self.dir.path().join("libpod"));
        }
        c.args(args);
        c
    }

    fn run(&self, tool: &str, args: &[&str], timeout: Duration) -> Out {
        run_bounded(self.cmd(tool, args), timeout)
    }

    fn podman_run(&self, args: &[&str], timeout: Duration) -> Out {
        let mut full: Vec<&str> = vec!["run"];
        full.extend(self.run_flags.iter().map(String::as_str));
        full.extend_from_slice(args);
        self.run("podman", &full, timeout)
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = self.run(
                "podman",
                &["rm", "-f", "-t", "0", c],
                Duration::from_secs(30),
            );
        }
    }
}

fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// A copy of the test binary without debug info (the image test need not
/// copy 300 MB around).
fn stripped_binary(dir: &Path) -> PathBuf {
    let bin = dir.join("towerctl");
    std::fs::copy(support::TOWERCTL, &bin).unwrap();
    let _ = Command::new("strip")
        .arg("--strip-debug")
        .arg(&bin)
        .status();
    bin
}

#[test]
fn the_scripted_image_runs_and_its_agent_joins_a_hub() {
    if !installed("podman") {
        skip("podman is not installed (apt-get install podman buildah runc to run it)");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("twimg")
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::write(
        dir.path().join("storage.conf"),
        format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut p = Podman {
        dir,
        run_flags: vec![],
        containers: vec![],
    };
    let info = p.run("podman", &["info"], Duration::from_secs(60));
    if !info.ok() {
        skip(&format!(
            "podman cannot work on this machine: {}",
            info.stderr.trim()
        ));
        return;
    }

    // Build with the script, exactly as README says.
    let bin = stripped_binary(p.dir.path());
    let tag = "localhost/towerctl:imagetest";
    let builder = if installed("buildah") {
        "buildah"
    } else {
        "podman"
    };
    let mut build = p.cmd(
        concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/image.sh"),
        &["--binary", bin.to_str().unwrap(), "--tag", tag],
    );
    build.env("BUILDER", builder);
    let o = run_bounded(build, Duration::from_secs(300));
    assert!(o.ok(), "scripts/image.sh failed: {o:?}");
    assert_eq!(o.stdout.trim(), tag, "{o:?}");
    let o = p.run(
        "podman",
        &[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}} {{.Config.Entrypoint}}",
            tag,
        ],
        Duration::from_secs(30),
    );
    assert_eq!(
        o.stdout.trim(),
        "65532:65532 [/usr/local/bin/towerctl]",
        "{o:?}"
    );

    // Containers need lower rlimits than podman's defaults where the
    // machine denies raising them, and some machines need runc (crun
    // refuses hybrid cgroups): find what runs here.
    let base = [
        "--ulimit".to_string(),
        "nofile=4096:4096".into(),
        "--ulimit".into(),
        "nproc=4096:4096".into(),
    ];
    let mut errors = Vec::new();
    let mut version = None;
    for runtime in [None, Some("runc")] {
        let mut flags = vec![];
        if let Some(r) = runtime {
            flags.extend(["--runtime".to_string(), r.to_string()]);
        }
        flags.extend(base.iter().cloned());
        p.run_flags = flags;
        let o = p.podman_run(
            &["--rm", "--network", "host", tag, "--version"],
            Duration::from_secs(60),
        );
        if o.ok() {
            version = Some(o.stdout);
            break;
        }
        errors.push(o.stderr.trim().to_string());
    }
    let Some(version) = version else {
        skip(&format!(
            "podman cannot run containers on this machine (the image was built): {}",
            errors.join("; ")
        ));
        return;
    };
    assert_eq!(
        version.trim(),
        format!("towerctl {}", env!("CARGO_PKG_VERSION"))
    );

    // An agent from the image joins a hub on the host network: read-only
    // root, a tmpfs for its runtime files, the member's kubeconfig mounted.
    let env = Env::new();
    let api = ApiServer::start();
    env.up();
    let join = env.cluster_add("alpha");
    let member = env.path("member");
    std::fs::create_dir_all(&member).unwrap();
    api.write_kubeconfig(&member.join("kubeconfig"));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&member, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(
        member.join("kubeconfig"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let arg = |flag: &str| {
        join.windows(2)
            .find(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .unwrap_or_else(|| panic!("no {flag} in {join:?}"))
    };
    let name = format!("towerctl-imagetest-{}", std::process::id());
    p.containers.push(name.clone());
    let volume = format!("{}:/member:ro", member.display());
    let token = format!("TOWERCTL_TOKEN={}", arg("--token"));
    let o = p.podman_run(
        &[
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "-e",
            "HOME=/tmp",
            "-e",
            "XDG_RUNTIME_DIR=/tmp/run",
            "-e",
            &token,
            "-v",
            &volume,
            tag,
            "agent",
            "run",
            "alpha",
            "--hub",
            &arg("--hub"),
            "--hub-key",
            &arg("--hub-key"),
            "--kubeconfig",
            "/member/kubeconfig",
            "--keepalive",
            "1s",
        ],
        Duration::from_secs(60),
    );
    assert!(o.ok(), "podman run: {o:?}");
    let logs = || {
        p.run("podman", &["logs", &name], Duration::from_secs(20))
            .all()
    };
    wait_for(
        "the containerized agent to connect",
        Duration::from_secs(30),
        || {
            let s = env.status();
            (s["hub"]["clusters"][0]["state"] == "connected").then_some(())
        },
    );
    assert!(env.towerctl(&["use", "alpha"]).ok());
    let o = env.kubectl(&["get", "ns"]);
    assert!(
        o.ok() && o.stdout.contains("kube-system"),
        "{o:?}\n{}",
        logs()
    );

    // `podman stop` sends SIGTERM: the hub records why the agent left.
    let o = p.run(
        "podman",
        &["stop", "-t", "10", &name],
        Duration::from_secs(30),
    );
    assert!(o.ok(), "{o:?}");
    let s = wait_for(
        "the hub to see the agent go",
        Duration::from_secs(10),
        || {
            let s = env.status();
            (s["hub"]["clusters"][0]["state"] == "disconnected").then_some(s)
        },
    );
    let events = s["hub"]["clusters"][0]["events"].to_string();
    assert!(
        events.contains("disconnected: agent stopped"),
        "{events}\n{}",
        logs()
    );
}
