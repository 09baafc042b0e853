//! Editing the user's kubeconfig the way client-go does, without losing
//! anything.
//!
//! - Which file: `--kubeconfig` alone, else the `KUBECONFIG` list (new
//!   entries go to the first file that exists), else `~/.kube/config`.
//! - How: a `<file>.lock` taken with O_EXCL (the lock kubectl itself uses),
//!   a backup `<file>.towerctl.bak`, a temp file in the same directory and a
//!   rename; a symlinked file is followed so the link survives; the mode is
//!   kept (0600 for a new file).
//! - What: only the entries we own (`tower-*`) and `current-context`; the
//!   rest of the document is carried over as parsed. We never write back a
//!   merged view of several files (that would copy other files' entries and
//!   turn relative paths absolute).

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::paths;

/// The kubeconfig files in effect, in precedence order.
pub fn files(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    if let Some(v) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) {
        let list: Vec<PathBuf> = std::env::split_paths(&v)
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        if !list.is_empty() {
            return list;
        }
    }
    vec![dirs::home_dir()
        .unwrap_or_else(|| PathBuf::from("."))
        .join(".kube")
        .join("config")]
}

/// The file new entries go to: the first that exists, else the first listed.
pub fn target(files: &[PathBuf]) -> PathBuf {
    files
        .iter()
        .find(|p| p.exists())
        .unwrap_or(&files[0])
        .clone()
}

/// Largest kubeconfig read: far above any real one (hundreds of contexts
/// with embedded certificates stay under a few MiB).
const MAX_KUBECONFIG: u64 = 64 * 1024 * 1024;

/// Reads a kubeconfig document; a missing or empty file is an empty config.
pub fn read(path: &Path) -> Result<Value> {
    let bytes = paths::read_regular(path, MAX_KUBECONFIG)
        .with_context(|| {
            format!(
                "cannot read the kubeconfig '{}'; fix it or pass another file with --kubeconfig",
                path.display()
            )
        })?
        .unwrap_or_default();
    let text = String::from_utf8(bytes).map_err(|_| {
        anyhow::anyhow!(
            "the kubeconfig '{}' is not UTF-8 text; fix it or pass another file with --kubeconfig",
            path.display()
        )
    })?;
    if text.trim().is_empty() {
        return Ok(Value::Object(Map::new()));
    }
    // Without the library's snippet of the lines around the error: a
    // kubeconfig holds tokens, passwords and keys, and the error goes to a
    // terminal or a CI log. Line and column say where to look.
    let mut options = serde_saphyr::Options::default();
    options.with_snippet = false;
    // Budgets for the largest file read (`MAX_KUBECONFIG`): the parser's
    // defaults (250,000 nodes) refused a valid 4 MB kubeconfig of 30,000
    // contexts that kubectl reads. Aliases and anchors keep their
    // defaults, which stop alias bombs.
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = 4_000_000;
    budget.max_events = 16_000_000;
    options.budget = Some(budget);
    let v: Value = match serde_saphyr::from_str_with_options(&text, options) {
        Ok(v) => v,
        Err(e) => {
            let e = e.to_string();
            if e.contains("budget breached") || e.contains("alias replay limit") {
                bail!(
                    "the kubeconfig '{}' is larger, more nested or more aliased than towerctl reads (the YAML parser's limit: {}): pass a smaller file with --kubeconfig, or one without YAML aliases (kubectl writes none)",
                    path.display(),
                    crate::tunnel::printable(&e, 120)
                );
            }
            // A second document after `---`: kubectl reads one.
            let documents = text
                .lines()
                .skip_while(|l| l.trim().is_empty() || l.starts_with('#') || *l == "---")
                .any(|l| l == "---" || l.starts_with("--- "));
            let backup = backup_path(path);
            return Err(anyhow::anyhow!("{}", crate::tunnel::printable(&e, 300))).context(format!(
                "the kubeconfig '{}' is not valid YAML{}; fix it{} or pass another file with --kubeconfig",
                path.display(),
                if documents { " (it holds more than one YAML document: a kubeconfig is one)" } else { "" },
                if backup.exists() { format!(" (towerctl's backup of it is '{}')", backup.display()) } else { String::new() },
            ));
        }
    };
    match v {
        Value::Object(_) => Ok(v),
        Value::Null => Ok(Value::Object(Map::new())),
        _ => bail!(
            "the kubeconfig '{}' is not a mapping; fix it or pass another file with --kubeconfig",
            path.display()
        ),
    }
}

/// `current-context` as kubectl sees it: the first non-empty one in the list.
pub fn current_context(files: &[PathBuf]) -> Option<String> {
    files.iter().find_map(|f| {
        read(f)
            .ok()?
            .get("current-context")?
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    })
}

fn backup_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".towerctl.bak");
    PathBuf::from(s)
}

fn lock_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".lock");
    PathBuf::from(s)
}

/// A kubeconfig lock: the `<file>.lock` kubectl also takes (made with
/// O_EXCL, removed when done), held together with towerctl's own lock on
/// the directory (`flock`, gone with the process that held it).
struct Lock {
    path: PathBuf,
    dir: Option<DirLock>,
}

impl Drop for Lock {
    fn drop(&mut self) {
        // The lock file first, then the directory's lock (field order).
        let _ = std::fs::remove_file(&self.path);
        self.dir.take();
    }
}

/// What towerctl writes in a lock file it holds, with its PID (kubectl's
/// are empty).
const LOCK_OWNER: &str = "towerctl pid ";

/// This process's `flock`s on kubeconfig directories, by device and inode,
/// with how many of its locks use each (a symlinked kubeconfig takes two
/// lock files, often in one directory: a second `flock` there on another
/// descriptor would wait on the first).
static DIR_LOCKS: std::sync::Mutex<Vec<HeldDir>> = std::sync::Mutex::new(Vec::new());

/// A directory's (device, inode), its locked descriptor, and its users.
type HeldDir = ((u64, u64), std::fs::File, usize);

/// One use of this process's `flock` on a directory.
struct DirLock((u64, u64));

impl DirLock {
    /// The directory's lock, if this process has it or gets it now;
    /// `Ok(None)` when another process holds it; `Err` when the directory
    /// cannot be locked at all.
    fn take(dir: &Path) -> std::io::Result<Option<DirLock>> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(dir)?;
        let key = (m.dev(), m.ino());
        let mut held = DIR_LOCKS
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        if let Some(h) = held.iter_mut().find(|h| h.0 == key) {
            h.2 += 1;
            return Ok(Some(DirLock(key)));
        }
        let f = std::fs::File::open(dir)?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) => Ok(None),
                _ => Err(e),
            };
        }
        held.push((key, f, 1));
        Ok(Some(DirLock(key)))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        if let Ok(mut held) = DIR_LOCKS.lock() {
            if let Some(i) = held.iter().position(|h| h.0 == self.0) {
                held[i].2 -= 1;
                if held[i].2 == 0 {
                    // Closing the descriptor releases the flock.
                    held.swap_remove(i);
                }
            }
        }
    }
}

/// Whether the lock file at `lp` is one a towerctl wrote. Found while this
/// process holds the directory's lock, it is one a towerctl left (killed,
/// or interrupted: Ctrl-C on a large file), whatever became of its PID:
/// a running towerctl holds the directory's lock while its file exists.
fn written_by_towerctl(lp: &Path) -> bool {
    std::fs::read_to_string(lp).is_ok_and(|t| t.starts_with(LOCK_OWNER))
}

fn lock(path: &Path) -> Result<Lock> {
    let lp = lock_path(path);
    let dir = lp
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let deadline = Instant::now() + Duration::from_secs(5);
    // Without the directory's lock (a directory that cannot be opened),
    // no lock file is ever taken over.
    let mut dir_lock: Option<DirLock> = None;
    let mut lockable = true;
    loop {
        if dir_lock.is_none() && lockable {
            match DirLock::take(&dir) {
                Ok(Some(l)) => dir_lock = Some(l),
                Ok(None) => {
                    if Instant::now() >= deadline {
                        bail!("the kubeconfig '{}' is being edited by another towerctl (it holds the lock on '{}'); retry when it is done", path.display(), dir.display());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(_) => lockable = false,
            }
        }
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&lp)
        {
            Ok(mut f) => {
                // Whose it is: a towerctl killed or interrupted while it
                // held the lock left it behind, and every later `use` and
                // kubectl edit failed until it was removed by hand.
                use std::io::Write as _;
                let _ = writeln!(f, "{LOCK_OWNER}{}", std::process::id());
                return Ok(Lock {
                    path: lp,
                    dir: dir_lock,
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                if dir_lock.is_some()
                    && written_by_towerctl(&lp)
                    && std::fs::remove_file(&lp).is_ok()
                {
                    continue;
                }
                if Instant::now() >= deadline {
                    bail!("the kubeconfig '{}' is locked by another program ('{}' exists); if no kubectl or towerctl is running, remove that file and retry", path.display(), lp.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot lock the kubeconfig '{}' (its lock file '{}' cannot be made); pass a kubeconfig you can write with --kubeconfig",
                        path.display(),
                        lp.display()
                    )
                })
            }
        }
    }
}

/// Applies `f` to the kubeconfig at `path` under the lock, then writes it
/// back atomically. Returns the path actually written (the symlink target).
pub fn edit(path: &Path, f: impl FnOnce(&mut Value) -> Result<()>) -> Result<PathBuf> {
    // One edit at a time in this process (the dashboard runs each Enter on
    // a thread of its own): the directory's lock is this process's, and
    // a second thread took the first one's lock file for a left one, and
    // one of two edits was lost.
    static EDITS: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = EDITS.lock().unwrap_or_else(|p| p.into_inner());
    // Follow a symlinked kubeconfig instead of replacing the link.
    let real = if path.is_symlink() {
        std::fs::canonicalize(path).with_context(|| {
            format!(
                "the kubeconfig '{}' is a dangling symlink; fix the link",
                path.display()
            )
        })?
    } else {
        path.to_path_buf()
    };
    // A file not there yet, written as root (`sudo -E towerctl use` on a
    // fresh machine): it, and a directory made for it, are given to the
    // owner of the directory it goes in (the user's home), or the user's
    // kubectl could read neither.
    let inherited = (!real.exists()).then(|| inherited_owner(&real)).flatten();
    if let Some(dir) = real.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            paths::ensure_private_dir(dir)?;
            if let Some((uid, gid)) = inherited {
                std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                    .with_context(|| format!("cannot give '{}' to uid {uid}", dir.display()))?;
            }
        }
    }
    // kubectl locks the path it was given ('<link>.lock'), not the
    // link's target: both are taken, the given one first (as kubectl
    // would), so that neither program's edit is lost to the other's.
    let _given = (real != path).then(|| lock(path)).transpose()?;
    let _lock = lock(&real)?;
    let mut doc = read(&real)?;
    let meta = std::fs::metadata(&real).ok();
    let mode = meta
        .as_ref()
        .map(|m| m.permissions().mode() & 0o777)
        .unwrap_or(0o600);
    // Kept as they are: the new file is renamed into place, and was
    // owned by whoever ran towerctl (root under `sudo -E`).
    let owner = meta
        .as_ref()
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.uid(), m.gid())
        })
        .or(inherited);
    if meta.is_some() && !writable(&real) {
        bail!(
            "the kubeconfig '{}' is read-only for you (mode {mode:o}): make it writable ('chmod u+w'), or pass another file with --kubeconfig",
            real.display()
        );
    }
    if real.exists() {
        // Written like the kubeconfig itself (a new file never opened
        // through a link, renamed into place; a directory anyone may write
        // refused): a planted `.towerctl.bak` symlink used to receive the
        // copy.
        let bak = backup_path(&real);
        let current = std::fs::read(&real)
            .with_context(|| format!("cannot read the kubeconfig '{}'", real.display()))?;
        paths::write_atomic_user_file(&bak, &current, 0o600, owner)
            .with_context(|| format!("cannot back up the kubeconfig to '{}'", bak.display()))?;
    }
    f(&mut doc)?;
    let obj = doc.as_object_mut().context("kubeconfig is not a mapping")?;
    obj.entry("apiVersion").or_insert_with(|| json!("v1"));
    obj.entry("kind").or_insert_with(|| json!("Config"));
    let yaml = serde_saphyr::to_string(&doc).context("cannot encode the kubeconfig")?;
    paths::write_atomic_user_file(&real, yaml.as_bytes(), mode, owner)?;
    Ok(real)
}

/// For root only: the owner of the nearest directory above `path` that
/// exists, unless that is root itself.
fn inherited_owner(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let m = path.ancestors().skip(1).find_map(|d| {
        let d = if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        };
        std::fs::metadata(d).ok()
    })?;
    (m.uid() != 0).then(|| (m.uid(), m.gid()))
}

/// Whether this user may write `path` as it is (kubectl would): a file
/// made read-only on purpose was replaced by the rename.
fn writable(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated path.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// The payload (under `item_key`) of the entry `name` in `list_key`.
pub fn find<'a>(doc: &'a Value, list_key: &str, item_key: &str, name: &str) -> Option<&'a Value> {
    doc.get(list_key)?
        .as_array()?
        .iter()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))?
        .get(item_key)
}

/// Inserts or replaces the entry `name` in the list `list_key` (`clusters`,
/// `users`, `contexts`), whose payload lives under `item_key`. Duplicates of
/// the same name (left by other tools) are collapsed into one.
pub fn upsert(
    doc: &mut Value,
    list_key: &str,
    item_key: &str,
    name: &str,
    payload: Value,
) -> Result<()> {
    let obj = doc.as_object_mut().context("kubeconfig is not a mapping")?;
    let list = obj.entry(list_key).or_insert_with(|| json!([]));
    if list.is_null() {
        *list = json!([]);
    }
    let arr = list
        .as_array_mut()
        .with_context(|| format!("'{list_key}' in the kubeconfig is not a list"))?;
    let entry = json!({ "name": name, item_key: payload });
    let mut placed = false;
    arr.retain_mut(|e| {
        if e.get("name").and_then(Value::as_str) == Some(name) {
            if placed {
                return false;
            }
            *e = entry.clone();
            placed = true;
        }
        true
    });
    if !placed {
        arr.push(entry);
    }
    Ok(())
}

pub fn set_current(doc: &mut Value, ctx: &str) -> Result<()> {
    doc.as_object_mut()
        .context("kubeconfig is not a mapping")?
        .insert("current-context".into(), json!(ctx));
    Ok(())
}

/// Whether a context of that name exists in any of the files. A file that
/// cannot be read is an error naming it (it used to count as holding no
/// context, and `use -` then said the previous context was gone).
pub fn has_context(files: &[PathBuf], name: &str) -> Result<bool> {
    Ok(defining(files, name)?.is_some())
}

/// The first file of the list that defines context `name` (the one
/// kubectl reads it from, and edits it in).
pub fn defining(files: &[PathBuf], name: &str) -> Result<Option<PathBuf>> {
    for f in files {
        let d = read(f)?;
        if d.get("contexts")
            .and_then(Value::as_array)
            .is_some_and(|a| {
                a.iter()
                    .any(|c| c.get("name").and_then(Value::as_str) == Some(name))
            })
        {
            return Ok(Some(f.clone()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(doc: &Value) -> Vec<String> {
        doc["contexts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// A kubeconfig rewritten by root (`sudo -E towerctl use`) keeps its
    /// owner and group, and so does its backup: the user's kubectl read
    /// neither after (root:root 0600). Run as root only (it chowns).
    #[test]
    fn a_kubeconfig_keeps_its_owner_when_root_rewrites_it() {
        use std::os::unix::fs::MetadataExt;
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root to give the file another owner");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(&path, "apiVersion: v1\nkind: Config\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(&path, Some(65534), Some(65533)).unwrap();
        edit(&path, |d| set_current(d, "tower-alpha")).unwrap();
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o777), (65534, 65533, 0o640));
        let b = std::fs::metadata(backup_path(&path)).unwrap();
        assert_eq!((b.uid(), b.gid()), (65534, 65533));
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("tower-alpha"));

        // A new one (and its new directory) in a user's home is the user's.
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(65534), Some(65533)).unwrap();
        let fresh = home.join(".kube").join("config");
        edit(&fresh, |d| set_current(d, "tower-alpha")).unwrap();
        for p in [fresh.parent().unwrap(), fresh.as_path()] {
            let m = std::fs::metadata(p).unwrap();
            assert_eq!((m.uid(), m.gid()), (65534, 65533), "{}", p.display());
        }
    }

    /// Two documents in one file are said as such, and a backup is named
    /// only where there is one.
    #[test]
    fn a_kubeconfig_of_two_documents_is_said_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(&path, "apiVersion: v1\nkind: Config\n---\napiVersion: v1\n").unwrap();
        let msg = format!("{:#}", read(&path).unwrap_err());
        assert!(
            msg.contains("more than one YAML document") && !msg.contains("backup"),
            "{msg}"
        );
        std::fs::write(&path, "---\napiVersion: v1\nkind: Config\n").unwrap();
        assert!(read(&path).is_ok(), "a leading '---' is one document");
        std::fs::write(backup_path(&path), "").unwrap();
        std::fs::write(&path, "users: [\n").unwrap();
        let msg = format!("{:#}", read(&path).unwrap_err());
        assert!(msg.contains("towerctl's backup of it is"), "{msg}");
    }

    /// A kubeconfig that is not valid YAML is named with where it broke,
    /// never with its lines: those next to the error hold tokens and keys.
    #[test]
    fn a_broken_kubeconfig_is_refused_without_quoting_its_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        for doc in [
            "users:\n- name: u\n  user:\n    token: sekrit-token-1\n    token: sekrit-token-2\n",
            "users:\n- name: u\n  user:\n    password: sekrit-password\n\t  bad: [\n",
            "users:\n- name: u\n  user:\n    client-key-data: c2Vrcml0\n  - ]]\n",
        ] {
            std::fs::write(&path, doc).unwrap();
            let msg = format!("{:#}", read(&path).unwrap_err());
            assert!(
                msg.contains("not valid YAML") && msg.contains("line"),
                "{msg}"
            );
            assert!(
                !msg.contains("sekrit") && !msg.contains("c2Vrcml0"),
                "{msg}"
            );
        }
    }

    #[test]
    fn a_fifo_or_an_oversized_file_is_refused_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("config");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        // Reading a FIFO with no writer used to block forever.
        let (tx, rx) = std::sync::mpsc::channel();
        let f = fifo.clone();
        std::thread::spawn(move || tx.send(read(&f).map(|_| ())).unwrap());
        let err = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("reading a FIFO kubeconfig hung")
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("not a regular file") && msg.contains("--kubeconfig"),
            "{msg}"
        );

        let big = dir.path().join("big");
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(MAX_KUBECONFIG + 1).unwrap();
        let msg = format!("{:#}", read(&big).unwrap_err());
        assert!(msg.contains("larger than 64 MiB"), "{msg}");
        let msg = format!("{:#}", read(dir.path()).unwrap_err());
        assert!(msg.contains("is a directory"), "{msg}");
    }

    #[test]
    fn upsert_never_duplicates_and_keeps_others() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config");
        std::fs::write(&p, "apiVersion: v1\nkind: Config\nclusters:\n- name: other\n  cluster:\n    server: https://x\n    certificate-authority: ca.crt\ncontexts:\n- name: other\n  context: {cluster: other, user: other}\ncurrent-context: other\nusers:\n- name: other\n  user: {token: abc}\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        for _ in 0..3 {
            edit(&p, |d| {
                upsert(
                    d,
                    "contexts",
                    "context",
                    "tower-a",
                    json!({"cluster": "tower-a", "user": "tower-a"}),
                )?;
                set_current(d, "tower-a")
            })
            .unwrap();
        }
        let d = read(&p).unwrap();
        assert_eq!(ctx(&d), vec!["other", "tower-a"]);
        assert_eq!(d["current-context"], "tower-a");
        // Relative paths of other entries stay relative; other users untouched.
        assert_eq!(
            d["clusters"][0]["cluster"]["certificate-authority"],
            "ca.crt"
        );
        assert_eq!(d["users"][0]["user"]["token"], "abc");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(backup_path(&p).exists());
        assert!(!lock_path(&p).exists());
    }

    #[test]
    fn follows_symlinks_and_creates_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap_err_or_create(&real);
        let written = edit(&link, |d| set_current(d, "x")).unwrap();
        assert!(link.is_symlink(), "the symlink must survive");
        assert_eq!(written, std::fs::canonicalize(&real).unwrap());
        assert_eq!(read(&real).unwrap()["current-context"], "x");
        // An existing file keeps its mode.
        assert_eq!(
            std::fs::metadata(&real).unwrap().permissions().mode() & 0o777,
            0o644
        );

        let fresh = dir.path().join("sub").join("new");
        edit(&fresh, |d| set_current(d, "y")).unwrap();
        assert_eq!(
            std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    trait CreateTarget {
        fn unwrap_err_or_create(self, p: &Path);
    }
    impl CreateTarget for std::io::Result<()> {
        fn unwrap_err_or_create(self, p: &Path) {
            self.unwrap();
            std::fs::write(p, "").unwrap();
        }
    }

    #[test]
    fn target_is_first_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&b, "").unwrap();
        assert_eq!(target(&[a.clone(), b.clone()]), b);
        assert_eq!(target(std::slice::from_ref(&a)), a);
    }

    /// A large valid kubeconfig is read (30,000 contexts, some 300,000
    /// YAML nodes: past the parser's default budget); an alias bomb is
    /// refused with words, quickly.
    #[test]
    fn large_kubeconfigs_are_read_and_alias_bombs_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config");
        let mut text = String::from("apiVersion: v1\nkind: Config\ncontexts:\n");
        for i in 0..30_000 {
            text.push_str(&format!(
                "- name: ctx-{i}\n  context:\n    cluster: c-{i}\n    user: u-{i}\n    namespace: ns-{i}\n"
            ));
        }
        std::fs::write(&p, &text).unwrap();
        let v = read(&p).unwrap();
        assert_eq!(v["contexts"].as_array().unwrap().len(), 30_000);

        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let prev = format!("*a{}", i - 1);
            bomb.push_str(&format!("a{i}: &a{i} [{}]\n", vec![prev; 10].join(", ")));
        }
        std::fs::write(&p, &bomb).unwrap();
        let start = Instant::now();
        let e = format!("{:#}", read(&p).unwrap_err());
        assert!(
            e.contains("larger, more nested or more aliased than towerctl reads"),
            "{e}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn held_lock_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config");
        std::fs::write(lock_path(&p), "").unwrap();
        let err = edit(&p, |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("locked"), "{err}");
        // A running towerctl's: it holds the directory's lock too.
        let child = std::process::Command::new("flock")
            .arg("--no-fork")
            .arg(dir.path())
            .args(["sleep", "10"])
            .spawn();
        if let Ok(mut child) = child {
            std::fs::write(lock_path(&p), format!("{LOCK_OWNER}{}\n", child.id())).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            let err = edit(&p, |_| Ok(())).unwrap_err().to_string();
            let _ = child.kill();
            let _ = child.wait();
            assert!(err.contains("another towerctl"), "{err}");
        }
    }

    /// Edits from several threads of one process (the dashboard's) take
    /// turns: the second took the first one's lock file for one left
    /// behind, and one of the edits was lost.
    #[test]
    fn edits_from_threads_of_one_process_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config");
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || {
                    edit(&p, |doc| {
                        std::thread::sleep(Duration::from_millis(100));
                        upsert(doc, "contexts", "context", &format!("c{i}"), json!({}))
                    })
                    .unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let doc = read(&p).unwrap();
        assert_eq!(ctx(&doc).len(), 4, "{doc}");
    }

    /// A lock left by a towerctl that is gone (Ctrl-C, kill -9) is taken
    /// over; while it is held, its PID is in it.
    #[test]
    fn a_lock_left_by_a_gone_towerctl_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        std::fs::write(lock_path(&p), format!("{LOCK_OWNER}{gone}\n")).unwrap();
        let start = Instant::now();
        edit(&p, |doc| {
            let held = std::fs::read_to_string(lock_path(&p)).unwrap();
            assert_eq!(held.trim(), format!("{LOCK_OWNER}{}", std::process::id()));
            doc["current-context"] = json!("a");
            Ok(())
        })
        .unwrap();
        assert!(start.elapsed() < Duration::from_secs(2));
        assert!(!lock_path(&p).exists());
    }

    #[test]
    fn a_kubeconfig_that_cannot_be_read_is_named_not_taken_for_empty() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        let bad = dir.path().join("bad");
        std::fs::write(&good, "contexts:\n- name: a\n  context: {}\n").unwrap();
        std::fs::write(&bad, "current-context: a\ncurrent-context: b\n").unwrap();
        assert!(has_context(std::slice::from_ref(&good), "a").unwrap());
        assert!(!has_context(std::slice::from_ref(&good), "b").unwrap());
        let missing = dir.path().join("missing");
        assert!(!has_context(&[missing, good.clone()], "b").unwrap());
        let e = format!("{:#}", has_context(&[bad.clone(), good], "a").unwrap_err());
        assert!(e.contains("not valid YAML") && e.contains("bad"), "{e}");
    }

    /// kubectl locks the path it is given, not a symlink's target: a
    /// `<link>.lock` it holds keeps towerctl out too (before, only the
    /// target's lock was taken, and either program's edit could be lost).
    #[test]
    fn a_symlinked_kubeconfig_is_locked_where_kubectl_locks_it() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        let link = dir.path().join("link");
        std::fs::write(&real, "").unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        std::fs::write(lock_path(&link), "").unwrap();
        let err = edit(&link, |_| Ok(())).unwrap_err().to_string();
        assert!(err.contains("locked") && err.contains("link.lock"), "{err}");
        std::fs::remove_file(lock_path(&link)).unwrap();
        edit(&link, |d| set_current(d, "z")).unwrap();
        assert!(!lock_path(&link).exists() && !lock_path(&real).exists());
    }
}
