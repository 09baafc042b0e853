//! Where towerctl keeps its files.
//!
//! Every location honours the XDG variable first and falls back to `dirs`,
//! so a test (or an operator running two installations side by side) can
//! isolate a whole installation by pointing `HOME` and `XDG_*` at a temp dir.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

const APP: &str = "towerctl";

fn xdg(var: &str, fallback: impl FnOnce() -> Option<PathBuf>, rel: &str) -> PathBuf {
    if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
        let p = PathBuf::from(v);
        // The XDG spec says relative values are invalid and must be ignored.
        if p.is_absolute() {
            return p.join(APP);
        }
    }
    fallback()
        .or_else(|| dirs::home_dir().map(|h| h.join(rel)))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join(APP)
}

/// Configuration: agent definitions, operator credentials.
pub fn config_dir() -> PathBuf {
    xdg("XDG_CONFIG_HOME", dirs::config_dir, ".config")
}

/// Durable data: the hub's store, host key, CA.
pub fn data_dir() -> PathBuf {
    xdg("XDG_DATA_HOME", dirs::data_dir, ".local/share")
}

/// Logs of the background daemons.
pub fn state_dir() -> PathBuf {
    xdg("XDG_STATE_HOME", dirs::state_dir, ".local/state")
}

/// Pid files and control sockets. `XDG_RUNTIME_DIR` when set; otherwise a
/// private directory under the state dir. (Not `/tmp/towerctl-$UID`: a
/// path another user can pre-create is a path another user can own.)
pub fn runtime_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(v) if Path::new(&v).is_absolute() => PathBuf::from(v).join(APP),
        _ => state_dir().join("run"),
    }
}

/// Creates `dir` (and parents) with mode 0700 when missing; an existing
/// `dir` must be ours and writable by nobody else, or another local user
/// could swap the files towerctl keeps there (tokens, keys, sockets).
pub fn ensure_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| {
            // "File exists" for a file where the directory goes (or where
            // one of its parents goes).
            let file = dir
                .ancestors()
                .find(|a| std::fs::metadata(a).is_ok_and(|m| !m.is_dir()));
            match file {
                Some(f) => format!(
                    "cannot create directory '{}': '{}' is a file, not a directory; move it away",
                    dir.display(),
                    f.display()
                ),
                None => format!("cannot create directory '{}'", dir.display()),
            }
        })?;
    check_private_dir(dir)
}

/// Refuses a directory owned by another user or writable by group or
/// others, naming the fix.
pub fn check_private_dir(dir: &Path) -> Result<()> {
    check_dir(dir, false)
}

/// `sticky_ok`: a sticky directory owned by root or us (like `/tmp`) is
/// accepted for atomic writes of a file the caller chose: nobody else can
/// rename or remove our files there, and our temp names are random,
/// `O_EXCL` and `O_NOFOLLOW`.
fn check_dir(dir: &Path, sticky_ok: bool) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(dir)
        .with_context(|| format!("cannot inspect directory '{}'", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let sticky = sticky_ok && m.mode() & 0o1000 != 0 && (m.uid() == 0 || m.uid() == me);
    if m.uid() != me && !sticky {
        anyhow::bail!(
            "directory '{}' is owned by uid {}, not by you (uid {me}); towerctl keeps secrets there: remove it or run 'chown {me} {}'",
            dir.display(),
            m.uid(),
            dir.display()
        );
    }
    if m.mode() & 0o022 != 0 && !sticky {
        // Set-group-ID and group-writable: how the kubelet leaves every
        // directory of a volume mounted with `fsGroup`, at each mount.
        let kubelet = if m.mode() & 0o2020 == 0o2020 {
            "; in a Kubernetes pod, the kubelet makes every directory of a volume mounted with \
             securityContext.fsGroup so at each mount: set securityContext.fsGroupChangePolicy: \
             OnRootMismatch (directories towerctl made inside the volume are then left as they \
             are), or mount it without fsGroup"
        } else {
            ""
        };
        anyhow::bail!(
            "directory '{}' is writable by group or others (mode {:o}); towerctl keeps secrets there: run 'chmod go-w {}'{kubelet}",
            dir.display(),
            m.mode() & 0o7777,
            dir.display()
        );
    }
    Ok(())
}

/// Creates a new temp file next to `path` for an atomic replace: a random
/// name, `O_EXCL` (never an existing file) and `O_NOFOLLOW` (never through
/// a planted symlink).
pub fn create_temp(path: &Path, mode: u32) -> std::io::Result<(std::fs::File, PathBuf)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut last = None;
    for _ in 0..8 {
        let mut r = [0u8; 8];
        getrandom::fill(&mut r).map_err(|e| std::io::Error::other(e.to_string()))?;
        let hex: String = r.iter().map(|b| format!("{b:02x}")).collect();
        let tmp = dir.join(format!(".{name}.tmp.{hex}"));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(mode)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no temp name")))
}

/// Writes `contents` to `path` atomically (temp file in the same directory,
/// fsync, rename) with the given mode, so a crash never leaves a half-written
/// file and a secret is never briefly world-readable.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if dir.as_os_str().is_empty() || dir.exists() {
        check_dir(
            if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            },
            true,
        )?;
    } else {
        ensure_private_dir(dir)?;
    }
    replace(path, contents, mode, None)
}

/// [`write_atomic`] for a file of the user's own choosing in a directory
/// towerctl does not own (the kubeconfig and its backup): refused only
/// where anyone may plant or swap files (writable by others, not sticky).
/// A `~/.kube` made group-writable under umask 002 (as kubeadm's steps do
/// on Ubuntu), or a user's directory written to under `sudo -E`, was
/// refused as if towerctl kept its own secrets there, while kubectl
/// writes it.
///
/// `owner` (uid, gid): the file's owner and group to keep (those of the
/// file it replaces). A rename puts a new file in place, owned by whoever
/// wrote it: under `sudo -E` a user's kubeconfig became root's, and their
/// kubectl could no longer read it.
pub fn write_atomic_user_file(
    path: &Path,
    contents: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.exists() {
        ensure_private_dir(dir)?;
    }
    let m = std::fs::metadata(dir)
        .with_context(|| format!("cannot inspect directory '{}'", dir.display()))?;
    if m.mode() & 0o002 != 0 && m.mode() & 0o1000 == 0 {
        anyhow::bail!(
            "directory '{}' is writable by everyone (mode {:o}): anyone could swap the file written there; run 'chmod o-w {}'",
            dir.display(),
            m.mode() & 0o7777,
            dir.display()
        );
    }
    replace(path, contents, mode, owner)
}

/// The temp-file, fsync and rename of [`write_atomic`], its directory
/// checked.
fn replace(path: &Path, contents: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    use std::os::unix::io::AsRawFd;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = None;
    let mut write = || -> std::io::Result<()> {
        let (mut f, t) = create_temp(path, mode)?;
        let t = tmp.insert(t).clone();
        // Only as root (another user cannot give a file away, nor to a
        // group it is not in: a kubeconfig left in group root by `sudo
        // chown USER` was refused): what a user writes stays theirs.
        // SAFETY: geteuid has no preconditions.
        if let Some((uid, gid)) = owner.filter(|_| unsafe { libc::geteuid() } == 0) {
            let m = f.metadata()?;
            if (m.uid(), m.gid()) != (uid, gid) {
                // SAFETY: fchown on a valid, open descriptor.
                if unsafe { libc::fchown(f.as_raw_fd(), uid, gid) } != 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("it is owned by uid {uid} and gid {gid}, which a file written by this user cannot keep ({e}); run towerctl as its owner, or pass another file with --kubeconfig"),
                    ));
                }
            }
        }
        // `mode` above is filtered by the umask; make it exact.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&t, path)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write()
        .inspect_err(|_| {
            if let Some(t) = &tmp {
                let _ = std::fs::remove_file(t);
            }
        })
        .with_context(|| format!("cannot write '{}'", path.display()))
}

/// Reads a file the user points towerctl at (a kubeconfig), within `max`
/// bytes. `Ok(None)` when it does not exist. A FIFO, a device or a
/// directory is refused at once (opened without blocking: reading a FIFO
/// waited for a writer forever), and so is a file larger than `max`.
pub fn read_regular(path: &Path, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = f.metadata()?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "not a regular file (a FIFO, socket or device)"
        };
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("it is {what}"),
        ));
    }
    // Blocking again for the read: some network and FUSE file systems
    // answer EAGAIN to a non-blocking read of a regular file.
    // SAFETY: fcntl on a descriptor this function owns.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = f.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    let mut buf = Vec::with_capacity(meta.len().min(max) as usize);
    f.take(max + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("it is larger than {} MiB", max / (1024 * 1024)),
        ));
    }
    Ok(Some(buf))
}

/// The path of this towerctl for what outlives the command (kubeconfig
/// exec entries, unit files): the one it was run by (as typed, or as
/// found on `PATH`) when that is this very program, else the resolved one.
/// `current_exe` resolves symbolic links, to a package manager's
/// versioned path (Homebrew's Cellar, the Nix store) that the next upgrade
/// removes, and every `tower-*` context then failed with "no such file".
pub fn stable_exe() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let real = std::fs::canonicalize(&exe).ok();
    let same = |p: &Path| real.is_some() && std::fs::canonicalize(p).ok() == real;
    let Some(arg0) = std::env::args_os().next().map(PathBuf::from) else {
        return Ok(exe);
    };
    let candidate = if arg0.components().count() > 1 {
        // A path: made absolute, not resolved.
        std::env::current_dir().ok().map(|d| d.join(&arg0))
    } else {
        std::env::var_os("PATH").and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(&arg0))
                .find(|c| c.is_absolute() && same(c))
        })
    };
    Ok(candidate
        .map(|c| normalize(&c))
        .filter(|c| c.is_absolute() && same(c))
        .unwrap_or(exe))
}

/// `path` without `.` components and with `..` applied lexically (links
/// left as they are).
fn normalize(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Path of a daemon's anchor (`hub` or `agent-NAME`): a file in the
/// state directory, which does not depend on `XDG_RUNTIME_DIR`, that the
/// running daemon holds locked and that names its pid and its runtime
/// directory. A daemon started from a shell with `XDG_RUNTIME_DIR` (a
/// login) and managed from one without (cron, `sudo -u`, a container's
/// exec), or whose `/run/user/UID` logind removed at logout, is still
/// found, and never started twice.
pub fn anchor_file(daemon: &str) -> PathBuf {
    state_dir().join(format!("{daemon}.anchor"))
}

/// Whether a live process holds `path` locked (`flock`, as daemons hold
/// their pid files and anchors, and background forwards their locks): a
/// shared lock taken and given back at once is refused then.
pub fn locked_by_someone(path: &Path) -> bool {
    use std::os::unix::io::AsRawFd;
    let Ok(f) = std::fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock on a valid, open descriptor; released right away.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        return false;
    }
    // Only a lock held elsewhere says so: where locks do not work at all
    // (`ENOLCK` on an NFS home without its lock service), a pid left in
    // the file by a daemon that crashed was taken for a running daemon's,
    // and `down` signalled whatever process has that pid now.
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
}

/// What a running daemon's anchor says: its pid and runtime directory.
/// `None` when no daemon holds it.
pub fn anchored(daemon: &str) -> Option<(u32, PathBuf)> {
    let path = anchor_file(daemon);
    if !locked_by_someone(&path) {
        return None;
    }
    let text = read_regular(&path, 4096).ok()??;
    let mut lines = text.split(|&b| b == b'\n');
    let pid = std::str::from_utf8(lines.next()?)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let dir = lines.next().filter(|d| !d.is_empty())?;
    let dir = PathBuf::from(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(dir));
    dir.is_absolute().then_some((pid, dir))
}

/// The runtime directory of `daemon`: the running one's (its anchor),
/// else this process's [`runtime_dir`].
fn daemon_dir(daemon: &str) -> PathBuf {
    anchored(daemon).map(|(_, d)| d).unwrap_or_else(runtime_dir)
}

/// Path of the hub's control socket.
pub fn hub_socket() -> PathBuf {
    daemon_dir("hub").join("hub.sock")
}

/// Path of an agent's control socket.
pub fn agent_socket(name: &str) -> PathBuf {
    let daemon = format!("agent-{name}");
    daemon_dir(&daemon).join(format!("{daemon}.sock"))
}

/// Adds to `names` the agents running for this user that it lacks, found
/// by what they hold locked (their anchors in the state directory, their
/// pid files in the runtime directory), whether or not `join` saved their
/// settings: an agent a pod runs (`agent run`) has none, and `towerctl
/// status` in the pod showed nothing.
pub fn add_running_agents(names: &mut Vec<String>) {
    let known = names.len();
    for (dir, suffix) in [(state_dir(), ".anchor"), (runtime_dir(), ".pid")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten().take(10_000) {
            let file = e.file_name();
            let Some(name) = file
                .to_str()
                .and_then(|f| f.strip_prefix("agent-"))
                .and_then(|f| f.strip_suffix(suffix))
            else {
                continue;
            };
            if crate::daemon::names::validate_name(name).is_ok()
                && !names.iter().any(|n| n == name)
                && locked_by_someone(&e.path())
            {
                names.push(name.to_string());
            }
        }
    }
    names[known..].sort();
}

/// Path of a daemon's pid file (`hub` or `agent-NAME`).
pub fn pid_file(daemon: &str) -> PathBuf {
    daemon_dir(daemon).join(format!("{daemon}.pid"))
}

/// Path of a daemon's log file.
pub fn log_file(daemon: &str) -> PathBuf {
    state_dir().join(format!("{daemon}.log"))
}

#[cfg(test)]
mod tests {
    /// A kubeconfig's directory is the user's: group-writable is theirs to
    /// choose (kubectl writes there); writable by everyone without the
    /// sticky bit, anyone could swap the file, and it is refused.
    #[test]
    fn a_users_file_is_written_unless_anyone_may_swap_it() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let kube = d.path().join("kube");
        std::fs::create_dir(&kube).unwrap();
        let config = kube.join("config");
        std::fs::set_permissions(&kube, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(super::write_atomic(&config, b"a", 0o600).is_err());
        super::write_atomic_user_file(&config, b"b", 0o600, None).unwrap();
        assert_eq!(std::fs::read(&config).unwrap(), b"b");
        std::fs::set_permissions(&kube, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = super::write_atomic_user_file(&config, b"c", 0o600, None).unwrap_err();
        assert!(format!("{e:#}").contains("chmod o-w"), "{e:#}");
        std::fs::set_permissions(&kube, std::fs::Permissions::from_mode(0o1777)).unwrap();
        super::write_atomic_user_file(&config, b"d", 0o600, None).unwrap();
        assert_eq!(std::fs::read(&config).unwrap(), b"d");
    }

    use super::*;

    #[test]
    fn a_file_where_a_directory_goes_is_named() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("towerctl");
        std::fs::write(&file, "").unwrap();
        for dir in [file.clone(), file.join("agents")] {
            let e = format!("{:#}", ensure_private_dir(&dir).unwrap_err());
            assert!(
                e.contains(&format!("'{}' is a file, not a directory", file.display())),
                "{e}"
            );
        }
    }

    #[test]
    fn shared_or_foreign_dirs_are_refused_with_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let open = d.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_private_dir(&open).unwrap_err().to_string();
        assert!(e.contains("chmod go-w") && e.contains("open"), "{e}");
        let e = write_atomic(&open.join("x"), b"s", 0o600).unwrap_err();
        assert!(
            format!("{e:#}").contains("writable by group or others"),
            "{e:#}"
        );
        assert!(!format!("{e:#}").contains("fsGroup"), "{e:#}");
        // As the kubelet leaves a volume mounted with fsGroup.
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o2770)).unwrap();
        let e = ensure_private_dir(&open).unwrap_err().to_string();
        assert!(
            e.contains("chmod go-w") && e.contains("fsGroupChangePolicy: OnRootMismatch"),
            "{e}"
        );
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        write_atomic(&open.join("x"), b"s", 0o600).unwrap();
        assert_eq!(std::fs::read(open.join("x")).unwrap(), b"s");
        // Only the target is left: the temp file was renamed.
        assert_eq!(std::fs::read_dir(&open).unwrap().count(), 1);
        // A sticky shared directory (like /tmp) is fine for a chosen file.
        let tmp = d.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).unwrap();
        write_atomic(&tmp.join("kc"), b"k", 0o600).unwrap();
        assert!(ensure_private_dir(&tmp).is_err());
    }

    #[test]
    fn temp_files_never_follow_or_reuse_a_planted_name() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("secret");
        let elsewhere = d.path().join("elsewhere");
        std::fs::write(&elsewhere, "untouched").unwrap();
        let (_f, t1) = create_temp(&target, 0o600).unwrap();
        let (_g, t2) = create_temp(&target, 0o600).unwrap();
        assert_ne!(t1, t2);
        // A symlink planted at a temp name is not followed.
        std::fs::remove_file(&t1).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &t1).unwrap();
        let e = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&t1)
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "untouched");
    }
}
