//! `towerctl kubectl [-l SELECTOR | NAME…] [--parallel N] [--timeout D] -- ARGS…`:
//! the real kubectl against several members at once, one merged output.
//!
//! - Contexts: a private temporary kubeconfig built by the same code as
//!   `towerctl kubeconfig` (so it is never stale, whatever the user's
//!   kubeconfig holds), one `tower-NAME` context per member, no secret in it.
//! - Output: a table gets one header and a leading CLUSTER column; `-o
//!   json|yaml` becomes one `List` whose items carry the annotation
//!   `towerctl.io/cluster`; anything else is prefixed `NAME | ` line by line,
//!   each member's lines together, except that a follow or a watch (`-f`,
//!   `--follow`, `-w`, `--watch`, `--watch-only`) prints each line as it
//!   comes, every member at once, and is not stopped at a timeout unless
//!   `--timeout` is given.
//! - Failures never hang the command: each kubectl is killed at `--timeout`;
//!   a closing summary on stderr gives every failed member its exit code and
//!   its last error line (for a down member, the gateway's 503 text).
//! - Ctrl-C drops every running kubectl, which kills it (`kill_on_drop`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::exit;
use super::usectx::Source;
use crate::daemon::labels::Selector;
use crate::paths;

pub const CLUSTER_ANNOTATION: &str = "towerctl.io/cluster";

pub struct Args {
    pub selector: Option<String>,
    pub names: Vec<String>,
    /// None: 8, or every member for a follow or a watch.
    pub parallel: Option<usize>,
    /// None: 60 s, or no limit for a follow or a watch.
    pub timeout: Option<Duration>,
    pub gateway: Option<String>,
    pub args: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Table,
    Json,
    Yaml,
    Lines,
}

/// Whether kubectl runs until stopped, printing as things happen (`logs
/// -f`, `get -w`, `events --watch`): its lines are shown as they come (a
/// follow printed nothing until `--timeout`), and every member runs at once
/// (queued behind `--parallel` followers that never end, the rest never
/// started).
fn follows(args: &[String]) -> bool {
    let own = || args.iter().take_while(|a| *a != "--").map(String::as_str);
    // `-f` is `--filename` elsewhere (`apply -f`): a follow only for logs,
    // the subcommand (the first word that is not a flag or a flag's value:
    // `-n logs apply -f x.yaml` applies).
    let mut value_next = false;
    let logs = own().find(|a| {
        if std::mem::take(&mut value_next) {
            return false;
        }
        if a.starts_with('-') {
            value_next = !a.contains('=')
                && matches!(
                    *a,
                    "-n" | "--namespace"
                        | "-l"
                        | "--selector"
                        | "-o"
                        | "--output"
                        | "-c"
                        | "--container"
                        | "--request-timeout"
                        | "-s"
                        | "--as"
                        | "--as-group"
                );
            return false;
        }
        true
    }) == Some("logs");
    own().any(|a| {
        matches!(
            a,
            "-w" | "--watch" | "--watch=true" | "--watch-only" | "--watch-only=true"
        ) || (logs && matches!(a, "-f" | "--follow" | "--follow=true"))
    })
}

/// How kubectl will print, read from its arguments.
fn mode(args: &[String]) -> Mode {
    if follows(args) {
        return Mode::Lines;
    }
    let own: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .take_while(|a| *a != "--")
        .collect();
    let mut output = None;
    for (i, a) in own.iter().enumerate() {
        if *a == "-o" || *a == "--output" {
            output = own.get(i + 1).copied();
        } else if let Some(v) = a
            .strip_prefix("--output=")
            .or_else(|| a.strip_prefix("-o="))
            .or_else(|| a.strip_prefix("-o"))
        {
            output = Some(v);
        }
    }
    match output {
        Some("json") => return Mode::Json,
        Some("yaml") => return Mode::Yaml,
        _ => {}
    }
    let tabular = own.iter().any(|a| *a == "get" || *a == "top")
        && !own.iter().any(|a| {
            matches!(
                *a,
                "--raw" | "-w" | "--watch" | "--watch-only" | "--no-headers"
            ) || a.starts_with("--raw=")
                || a.starts_with("--no-headers=")
        });
    let table_output = match output {
        None | Some("wide") => true,
        Some(o) => o.starts_with("custom-columns"),
    };
    if tabular && table_output {
        Mode::Table
    } else {
        Mode::Lines
    }
}

#[derive(Debug)]
enum Status {
    Exited(i32),
    Killed,
    TimedOut,
    NotStarted(String),
    /// Its output passed [`MAX_STDOUT`] or [`MAX_STDERR`]: stopped.
    TooLong,
}

/// What one member's kubectl may print, kept in memory until every member
/// has answered: past it, that kubectl is stopped (a `get -A -o json`
/// across many large members, or an API server that streams without end,
/// ran the operator's machine out of memory).
const MAX_STDOUT: usize = 64 << 20;
const MAX_STDERR: usize = 1 << 20;

struct Outcome {
    name: String,
    status: Status,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn ok(&self) -> bool {
        matches!(self.status, Status::Exited(0))
    }
}

/// Deletes the temporary kubeconfig however the command ends.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The members to run against, in name order.
fn select(source: &Source, selector: Option<&str>, names: &[String]) -> Result<Vec<String>> {
    if !names.is_empty() {
        for n in names {
            source.check(n)?;
        }
        // Each once, in the order given (`a b a` ran kubectl twice at
        // once on `a`: a `delete` twice).
        let mut seen = std::collections::HashSet::new();
        let mut v = names.to_vec();
        v.retain(|n| seen.insert(n.clone()));
        return Ok(v);
    }
    let sel = match selector {
        Some(s) => Selector::parse(s).map_err(anyhow::Error::msg)?,
        None => Selector::default(),
    };
    let mut v: Vec<String> = source
        .clusters
        .iter()
        .filter(|c| sel.matches(&crate::daemon::labels::selectable(&c.labels, &c.name)))
        .map(|c| c.name.clone())
        .collect();
    v.sort();
    if v.is_empty() {
        match selector {
            Some(s) => bail!("no member matches the selector '{s}': see the labels with 'towerctl cluster list -o wide', set them with 'towerctl cluster label NAME KEY=VALUE'"),
            None => bail!("{}", source.none_yet()),
        }
    }
    Ok(v)
}

/// Whether `arg` gives kubectl's `-s` (--server): alone or after
/// kubectl's boolean short flags in one word (`-As`), as pflag reads it;
/// a flag that takes a value ends the word (`-lapp=sales`).
fn server_short_flag(arg: &str) -> bool {
    let Some(flags) = arg.strip_prefix('-').filter(|f| !f.starts_with('-')) else {
        return false;
    };
    for c in flags.chars() {
        match c {
            's' => return true,
            // --all-namespaces, --watch, --stdin, --tty, --recursive,
            // --quiet, --help.
            'A' | 'w' | 'i' | 't' | 'R' | 'q' | 'h' => continue,
            _ => return false,
        }
    }
    false
}

pub async fn run(a: Args) -> Result<u8> {
    if let Some(bad) = a.args.iter().take_while(|x| *x != "--").find(|x| {
        [
            "--context",
            "--kubeconfig",
            "--cluster",
            "--server",
            "--user",
            // The member's credentials are the context's: a token or a
            // certificate given here was sent with every member's request,
            // and `-s URL` sent the context's own token to that URL.
            "--token",
            "--username",
            "--password",
            "--client-certificate",
            "--client-key",
            "--certificate-authority",
            "--tls-server-name",
            "--insecure-skip-tls-verify",
        ]
        .iter()
        .any(|f| *x == f || x.starts_with(&format!("{f}=")))
            // `-s URL`, `-s=URL`, `-sURL`, and after kubectl's boolean
            // short flags (`-As URL`): --server's short form.
            || server_short_flag(x)
    }) {
        bail!("towerctl kubectl chooses the context of each member itself: remove '{bad}' from the kubectl arguments");
    }
    let source = Source::find(a.gateway.as_deref()).await?;
    let members = select(&source, a.selector.as_deref(), &a.names)?;

    let dir = paths::runtime_dir();
    paths::ensure_private_dir(&dir)?;
    let kc = TempFile(dir.join(format!("kubectl-{}.kubeconfig", std::process::id())));
    let doc = super::usectx::standalone(&source, &members)?;
    paths::write_atomic(&kc.0, serde_saphyr::to_string(&doc)?.as_bytes(), 0o600)?;

    let kubectl = std::env::var_os("TOWERCTL_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("kubectl"));
    let mode = mode(&a.args);
    let width = members.iter().map(String::len).max().unwrap_or(0);
    let live = follows(&a.args).then(|| Live {
        width,
        out_tty: std::io::IsTerminal::is_terminal(&std::io::stdout()),
        err_tty: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        closed: std::sync::Arc::new(tokio::sync::Notify::new()),
    });
    let (parallel, timeout) = match &live {
        // Every member at once unless --parallel says (followers never
        // end: the members queued behind them would never start).
        Some(_) => {
            let n = a.parallel.unwrap_or(members.len());
            if n < members.len() {
                eprintln!("warning: --parallel {n} with {} members: the members past the first {n} start only as earlier follows end", members.len());
            }
            // One kubectl (and its pipes) per member.
            crate::daemon::admission::raise_fd_limit();
            (n, a.timeout)
        }
        None => (
            a.parallel.unwrap_or(DEFAULT_PARALLEL),
            Some(a.timeout.unwrap_or(DEFAULT_TIMEOUT)),
        ),
    };

    let mut runs = futures_util::stream::iter(members.iter().cloned())
        .map(|name| run_one(&kubectl, &kc.0, name, &a.args, timeout, live.as_ref()))
        .buffer_unordered(parallel.max(1));
    let mut outcomes = Vec::new();
    let all = async {
        while let Some(o) = runs.next().await {
            if mode == Mode::Lines && live.is_none() {
                print_prefixed(&o, width, true);
            }
            outcomes.push(o);
        }
    };
    let stdout_closed = async {
        match &live {
            Some(l) => l.closed.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = all => {}
        _ = stdout_closed => {
            // `towerctl kubectl -- logs -f … | head`: the reader left.
            // Leaving this branch drops every running kubectl, which kills it.
            return Ok(exit::OK);
        }
        _ = tokio::signal::ctrl_c() => {
            // Leaving this branch drops every running kubectl: kill_on_drop.
            eprintln!("interrupted: stopped every kubectl still running");
            return Ok(exit::INTERRUPTED);
        }
    }
    drop(runs);
    outcomes.sort_by_key(|o| members.iter().position(|m| *m == o.name));

    match mode {
        Mode::Table => print_table(&outcomes),
        Mode::Json | Mode::Yaml => print_list(&mut outcomes, mode)?,
        Mode::Lines => {}
    }
    if mode != Mode::Lines {
        for o in outcomes.iter().filter(|o| o.ok()) {
            print_prefixed(o, width, false);
        }
    }
    let failed = outcomes.iter().filter(|o| !o.ok()).count();
    if failed == 0 {
        return Ok(exit::OK);
    }
    eprintln!(
        "towerctl kubectl: {failed} of {} members failed",
        outcomes.len()
    );
    // What the gateway says of each member whose kubectl failed, asked of
    // them all at once (one by one, 150 members held by a hub that died
    // took 12 minutes), and Ctrl-C still stops it.
    let probes = futures_util::stream::iter(
        outcomes
            .iter()
            .filter(|o| matches!(o.status, Status::Exited(c) if c != 0))
            .map(|o| o.name.clone()),
    )
    .map(|name| {
        let source = &source;
        async move {
            let r = gateway_refusal(source, &name).await;
            (name, r)
        }
    })
    .buffer_unordered(parallel.max(1))
    .collect::<Vec<_>>();
    let mut refusals: std::collections::HashMap<String, Option<String>> = tokio::select! {
        r = probes => r.into_iter().collect(),
        _ = tokio::signal::ctrl_c() => {
            eprintln!("interrupted");
            return Ok(exit::INTERRUPTED);
        }
    };
    for o in &outcomes {
        let (code, why) = match &o.status {
            Status::Exited(0) => ("exit 0".to_string(), String::new()),
            Status::Exited(c) => (
                format!("exit {c}"),
                match refusals.remove(&o.name).flatten() {
                    Some(m) => m,
                    None => last_error(&o.stderr),
                },
            ),
            Status::Killed => ("killed".into(), last_error(&o.stderr)),
            Status::TimedOut => (
                "timed out".into(),
                format!(
                    "no answer within {:?}; kubectl was stopped (raise --timeout for slow members)",
                    timeout.unwrap_or_default()
                ),
            ),
            Status::NotStarted(e) => ("not run".into(), e.clone()),
            Status::TooLong => (
                "stopped".into(),
                format!(
                    "printed more than {} MiB of output (or {} MiB of errors); narrow the query (a namespace, a selector, fewer members) or run kubectl on this member alone",
                    MAX_STDOUT >> 20,
                    MAX_STDERR >> 20
                ),
            ),
        };
        eprintln!("  {:<width$}  {code:<9}  {why}", o.name);
    }
    Ok(exit::ERROR)
}

/// What the gateway answers for the member when it refuses it (down,
/// revoked, unknown): kubectl hides a 503's message behind "the server is
/// currently unable to handle the request" when discovery fails, and the
/// gateway's own text says since when and what to do.
async fn gateway_refusal(source: &Source, name: &str) -> Option<String> {
    let url = format!(
        "{}/clusters/{name}/version",
        source.gateway_url.trim_end_matches('/')
    );
    let probe = super::https::get(
        &url,
        super::https::Trust::Ca(&source.ca_pem),
        Some(source.token.expose()),
    );
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .ok()?
        .ok()?;
    if status < 500 {
        return None;
    }
    let v: Value = serde_json::from_slice(&body).ok()?;
    // Relayed from the member (its agent, its API server): one printable
    // line.
    Some(format!(
        "HTTP {status}: {}",
        crate::tunnel::printable(v["message"].as_str()?, 500)
    ))
}

/// The line that says why kubectl failed: its last non-empty one.
fn last_error(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(|l| crate::tunnel::printable(l, 500))
        .unwrap_or_else(|| "(no message)".into())
}

/// How many kubectl run at once unless `--parallel` says.
const DEFAULT_PARALLEL: usize = 8;

/// How long one member's kubectl may run unless `--timeout` says.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A follow's lines, printed as they come.
struct Live {
    width: usize,
    out_tty: bool,
    err_tty: bool,
    /// Notified once stdout is gone (`| head`): every kubectl is stopped.
    closed: std::sync::Arc<tokio::sync::Notify>,
}

/// The longest line printed whole; past it a line is printed in parts (a
/// member's line without end must not take the memory).
const MAX_LIVE_LINE: usize = 64 * 1024;
/// What a follow keeps of a member's stderr for the summary: its last
/// lines, not all (it runs until stopped).
const LIVE_STDERR_KEPT: usize = 16 * 1024;

impl Live {
    /// Prints every complete line of `pending` (all of it at `end`, or
    /// when one line passes [`MAX_LIVE_LINE`]) with `name`'s prefix; false
    /// once stdout is gone.
    fn print(&self, name: &str, to_stdout: bool, pending: &mut Vec<u8>, end: bool) -> bool {
        use std::io::Write;
        let tty = if to_stdout {
            self.out_tty
        } else {
            self.err_tty
        };
        let (mut printed, mut gone) = (0, false);
        while printed < pending.len() {
            let rest = &pending[printed..];
            let (l, used) = match rest.iter().position(|b| *b == b'\n') {
                Some(i) => (&rest[..i], i + 1),
                None if end || rest.len() >= MAX_LIVE_LINE => {
                    let n = rest.len().min(MAX_LIVE_LINE);
                    (&rest[..n], n)
                }
                None => break,
            };
            let l = String::from_utf8_lossy(l.strip_suffix(b"\r").unwrap_or(l));
            let text = format!("{}\n", prefixed(name, self.width, &l, tty));
            if to_stdout {
                let r = std::io::stdout().lock().write_all(text.as_bytes());
                if r.is_err_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) {
                    gone = true;
                    break;
                }
            } else {
                let _ = std::io::stderr().lock().write_all(text.as_bytes());
            }
            printed += used;
        }
        pending.drain(..printed);
        if gone {
            self.closed.notify_one();
        }
        !gone
    }
}

async fn run_one(
    kubectl: &Path,
    kubeconfig: &Path,
    name: String,
    args: &[String],
    timeout: Option<Duration>,
    live: Option<&Live>,
) -> Outcome {
    let mut cmd = tokio::process::Command::new(kubectl);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--context")
        .arg(format!("tower-{name}"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let outcome = |status, stdout: &[u8], stderr: &[u8]| Outcome {
        name: name.clone(),
        status,
        stdout: String::from_utf8_lossy(stdout).into_owned(),
        stderr: String::from_utf8_lossy(stderr).into_owned(),
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return outcome(
                Status::NotStarted(format!(
                    "cannot run '{}': {e}; install kubectl or point TOWERCTL_KUBECTL at it",
                    kubectl.display()
                )),
                b"",
                b"",
            )
        }
    };
    let (Some(so), Some(se)) = (child.stdout.take(), child.stderr.take()) else {
        return outcome(Status::NotStarted("no pipes to kubectl".into()), b"", b"");
    };
    let (mut out, mut err) = (Vec::new(), Vec::new());
    // What it printed before a timeout is kept (shown with the summary).
    let run = async {
        // A reader past its cap closes its pipe (kubectl then stops on
        // EPIPE), so the other one ends too.
        let (o, e) = match live {
            None => tokio::join!(
                read_capped(so, &mut out, MAX_STDOUT),
                read_capped(se, &mut err, MAX_STDERR)
            ),
            Some(l) => tokio::join!(
                read_live(so, l, &name, true, &mut out),
                read_live(se, l, &name, false, &mut err)
            ),
        };
        if o || e {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Ok(None);
        }
        child.wait().await.map(Some)
    };
    let ran = crate::daemon::http::within(timeout, run).await;
    // On timeout the child is dropped: kill_on_drop kills it.
    match ran {
        Ok(Ok(Some(st))) => {
            let status = match st.code() {
                Some(c) => Status::Exited(c),
                None => Status::Killed,
            };
            outcome(status, &out, &err)
        }
        Ok(Ok(None)) => outcome(Status::TooLong, &out, &err),
        Ok(Err(e)) => outcome(Status::NotStarted(e.to_string()), &out, &err),
        Err(_) => outcome(Status::TimedOut, &out, &err),
    }
}

/// Reads `r` to its end into `buf`; true (and stops, closing `r`) once
/// `buf` would pass `max`.
async fn read_capped<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    buf: &mut Vec<u8>,
    max: usize,
) -> bool {
    use tokio::io::AsyncReadExt;
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) if buf.len() + n > max => return true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Prints what `r` gives line by line as it comes; keeps the last
/// [`LIVE_STDERR_KEPT`] bytes of stderr in `kept` for the summary. True
/// (and `r` closed) once stdout is gone.
async fn read_live<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    live: &Live,
    name: &str,
    to_stdout: bool,
    kept: &mut Vec<u8>,
) -> bool {
    use tokio::io::AsyncReadExt;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut pending = Vec::new();
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !to_stdout {
            kept.extend_from_slice(&chunk[..n]);
            if kept.len() > 2 * LIVE_STDERR_KEPT {
                kept.drain(..kept.len() - LIVE_STDERR_KEPT);
            }
        }
        pending.extend_from_slice(&chunk[..n]);
        if !live.print(name, to_stdout, &mut pending, false) {
            return true;
        }
    }
    !live.print(name, to_stdout, &mut pending, true)
}

/// `NAME | line` for each line; stdout to stdout (unless `stderr_only`).
fn print_prefixed(o: &Outcome, width: usize, with_stdout: bool) {
    use std::io::{IsTerminal, Write};
    if with_stdout {
        let tty = std::io::stdout().is_terminal();
        let mut out = std::io::stdout().lock();
        for l in o.stdout.lines() {
            let _ = writeln!(out, "{}", prefixed(&o.name, width, l, tty));
        }
    }
    // A failed member's last error line is in the summary; the rest of its
    // stderr is noise there (client-go repeats discovery errors).
    if with_stdout || o.ok() {
        let tty = std::io::stderr().is_terminal();
        let mut err = std::io::stderr().lock();
        for l in o.stderr.lines() {
            let _ = writeln!(err, "{}", prefixed(&o.name, width, l, tty));
        }
    }
}

/// `NAME | line`, the name padded to `width`, the line as a terminal (when
/// `tty`) gets it.
fn prefixed(name: &str, width: usize, line: &str, tty: bool) -> String {
    format!("{name:<width$} | {}", on_terminal(line, tty))
}

/// A member's line as a terminal gets it: control and invisible characters
/// as spaces. A carriage return (or a cursor move) in one member's output
/// wrote over its `NAME |` prefix, and the line read as another member's.
/// Redirected output stays byte for byte.
fn on_terminal(l: &str, tty: bool) -> std::borrow::Cow<'_, str> {
    if !tty {
        return std::borrow::Cow::Borrowed(l);
    }
    let p = crate::tunnel::printable(l, usize::MAX);
    if p == l {
        std::borrow::Cow::Borrowed(l)
    } else {
        std::borrow::Cow::Owned(p)
    }
}

/// Where each column of a kubectl table starts: kubectl pads cells with at
/// least three spaces (tabwriter), header cells hold at most single spaces.
fn column_starts(header: &[char]) -> Vec<usize> {
    let mut starts = vec![0];
    for i in 2..header.len() {
        if header[i] != ' ' && header[i - 1] == ' ' && header[i - 2] == ' ' {
            starts.push(i);
        }
    }
    starts
}

fn cells(line: &[char], starts: &[usize]) -> Vec<String> {
    starts
        .iter()
        .enumerate()
        .map(|(i, &s)| {
            let e = starts
                .get(i + 1)
                .copied()
                .unwrap_or(line.len())
                .min(line.len());
            let s = s.min(e);
            line[s..e].iter().collect::<String>().trim().to_string()
        })
        .collect()
}

/// One table: CLUSTER first, the header once (per distinct header).
fn print_table(outcomes: &[Outcome]) {
    let mut groups: Vec<(Vec<String>, Vec<Vec<String>>)> = Vec::new();
    for o in outcomes {
        let mut lines = o.stdout.lines().filter(|l| !l.trim().is_empty());
        let Some(h) = lines.next() else { continue };
        let h: Vec<char> = h.chars().collect();
        let starts = column_starts(&h);
        let header: Vec<String> = std::iter::once("CLUSTER".to_string())
            .chain(cells(&h, &starts))
            .collect();
        let rows = lines.map(|l| {
            let l: Vec<char> = l.chars().collect();
            std::iter::once(o.name.clone())
                .chain(cells(&l, &starts))
                .collect::<Vec<_>>()
        });
        match groups.iter_mut().find(|(hd, _)| *hd == header) {
            Some((_, r)) => r.extend(rows),
            None => groups.push((header, rows.collect())),
        }
    }
    let tty = {
        use std::io::IsTerminal;
        std::io::stdout().is_terminal()
    };
    let mut out = String::new();
    for (i, (header, rows)) in groups.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let mut widths: Vec<usize> = header.iter().map(|c| c.chars().count()).collect();
        for r in rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        for r in std::iter::once(header).chain(rows) {
            let n = r.len();
            for (j, c) in r.iter().enumerate() {
                let c = on_terminal(c, tty);
                if j + 1 == n {
                    out.push_str(&c);
                } else {
                    out.push_str(&format!("{c:<w$}   ", w = widths[j]));
                }
            }
            out.push('\n');
        }
    }
    print!("{out}");
}

/// One `List` of every member's objects, each annotated with its member.
fn print_list(outcomes: &mut [Outcome], mode: Mode) -> Result<()> {
    let mut items = Vec::new();
    for o in outcomes.iter_mut() {
        if o.stdout.trim().is_empty() {
            continue;
        }
        let parsed: Result<Value, String> = if mode == Mode::Json {
            serde_json::from_str(&o.stdout).map_err(|e| e.to_string())
        } else {
            serde_saphyr::from_str(&o.stdout).map_err(|e| e.to_string())
        };
        let v = match parsed {
            Ok(v) => v,
            Err(e) => {
                if o.ok() {
                    o.status =
                        Status::NotStarted(format!("kubectl's output is not one document: {e}"));
                }
                continue;
            }
        };
        let objects = match v {
            Value::Object(mut m) if m.get("items").is_some_and(Value::is_array) => {
                match m.remove("items") {
                    Some(Value::Array(a)) => a,
                    _ => Vec::new(),
                }
            }
            other => vec![other],
        };
        for mut obj in objects {
            annotate(&mut obj, &o.name);
            items.push(obj);
        }
    }
    let list = json!({
        "apiVersion": "v1",
        "kind": "List",
        "metadata": {"resourceVersion": ""},
        "items": items,
    });
    if mode == Mode::Json {
        println!("{}", serde_json::to_string_pretty(&list)?);
    } else {
        print!(
            "{}",
            serde_saphyr::to_string(&list).context("cannot print YAML")?
        );
    }
    Ok(())
}

fn annotate(obj: &mut Value, cluster: &str) {
    let Some(o) = obj.as_object_mut() else { return };
    // `null` (or anything but an object) where a map belongs is a map:
    // left alone, an item with `"annotations": null` came out with no
    // word of its member.
    let meta = o.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    let Some(meta) = meta.as_object_mut() else {
        return;
    };
    let ann = meta.entry("annotations").or_insert_with(|| json!({}));
    if !ann.is_object() {
        *ann = json!({});
    }
    if let Some(ann) = ann.as_object_mut() {
        ann.insert(CLUSTER_ANNOTATION.into(), Value::String(cluster.into()));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_item_is_annotated_with_its_member_even_with_null_maps() {
        use serde_json::json;
        for mut item in [
            json!({"metadata": {"name": "a"}}),
            json!({"metadata": {"name": "a", "annotations": null}}),
            json!({"metadata": null}),
            json!({}),
        ] {
            super::annotate(&mut item, "alpha");
            assert_eq!(
                item["metadata"]["annotations"][super::CLUSTER_ANNOTATION],
                "alpha",
                "{item}"
            );
        }
    }

    #[test]
    fn the_server_short_flag_is_found_as_pflag_reads_it() {
        for yes in [
            "-s",
            "-shttps://x",
            "-s=https://x",
            "-As",
            "-As=https://x",
            "-wAs",
        ] {
            assert!(super::server_short_flag(yes), "{yes}");
        }
        for no in [
            "--sort-by=x",
            "-lapp=sales",
            "-oyaml",
            "-n",
            "-f",
            "-",
            "-cs",
            "--since",
            "sales",
        ] {
            assert!(!super::server_short_flag(no), "{no}");
        }
    }

    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn follows_and_watches_print_as_they_come() {
        assert!(follows(&args("logs -f deploy/web")));
        assert!(follows(&args("logs deploy/web --follow=true")));
        assert!(follows(&args("get pods -w")));
        assert!(follows(&args("get pods --watch-only -o json")));
        assert_eq!(mode(&args("get pods -w -o json")), Mode::Lines);
        assert!(!follows(&args("apply -f manifest.yaml")));
        assert!(!follows(&args("logs deploy/web")));
        assert!(!follows(&args("exec web -- tail -f x")));
        assert!(!follows(&args("-n logs apply -f x.yaml")));
        assert!(follows(&args("-n prod logs -f web")));
    }

    #[test]
    fn output_mode_follows_kubectls_flags() {
        assert_eq!(mode(&args("get ns")), Mode::Table);
        assert_eq!(mode(&args("-n x get pods -o wide")), Mode::Table);
        assert_eq!(mode(&args("get ns -o json")), Mode::Json);
        assert_eq!(mode(&args("get ns -ojson")), Mode::Json);
        assert_eq!(mode(&args("get ns --output=yaml")), Mode::Yaml);
        assert_eq!(mode(&args("get ns -o name")), Mode::Lines);
        assert_eq!(mode(&args("get ns --no-headers")), Mode::Lines);
        assert_eq!(mode(&args("get --raw /version")), Mode::Lines);
        assert_eq!(mode(&args("version")), Mode::Lines);
        assert_eq!(mode(&args("exec web -- get -o json")), Mode::Lines);
    }

    #[test]
    fn tables_split_where_the_header_says() {
        let h: Vec<char> = "NAME          STATUS   AGE   NOMINATED NODE"
            .chars()
            .collect();
        let starts = column_starts(&h);
        assert_eq!(starts, vec![0, 14, 23, 29]);
        let row: Vec<char> = "kube-system   Active   5d    <none>".chars().collect();
        assert_eq!(
            cells(&row, &starts),
            vec!["kube-system", "Active", "5d", "<none>"]
        );
        let short: Vec<char> = "x".chars().collect();
        assert_eq!(cells(&short, &starts), vec!["x", "", "", ""]);
    }

    #[test]
    fn objects_carry_their_member() {
        let mut o = json!({"kind": "Namespace", "metadata": {"name": "a"}});
        annotate(&mut o, "alpha");
        assert_eq!(o["metadata"]["annotations"][CLUSTER_ANNOTATION], "alpha");
    }
}
