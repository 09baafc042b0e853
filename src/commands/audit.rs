//! `towerctl audit`: read the hub's audit log (on the hub machine).

use std::io::{Seek, SeekFrom};
use std::time::Duration;

use anyhow::Result;

use super::exit;
use crate::daemon::audit::{self, Record};
use crate::paths;

pub struct Filter {
    pub cluster: Option<String>,
    pub operator: Option<String>,
}

impl Filter {
    fn keep(&self, r: &Record) -> bool {
        self.cluster.as_ref().is_none_or(|c| &r.cluster == c)
            && self.operator.as_ref().is_none_or(|o| &r.operator == o)
    }
}

fn print(r: &Record, json: bool) {
    if json {
        if let Ok(s) = serde_json::to_string(r) {
            // JSON leaves C1 controls and bidirectional overrides raw.
            println!("{}", crate::tunnel::json_shown(&s));
        }
    } else {
        // Long-lived streams have a start and an end record.
        let verb = match &r.phase {
            Some(p) => format!("{}/{p}", r.verb),
            None => r.verb.clone(),
        };
        // Paths and names come from clients (unauthenticated ones too):
        // a C1 control or a bidirectional override must not reach the
        // terminal as itself.
        use crate::tunnel::shown;
        let operator = match &r.acting_as {
            Some(a) => format!("{} as {a}", r.operator),
            None => r.operator.clone(),
        };
        println!(
            "{:<20} {:<12} {:<14} {:<16} {:>4} {:>8}ms {:>10}  {}",
            shown(&r.time),
            shown(&operator),
            shown(&r.cluster),
            shown(&verb),
            r.status,
            r.duration_ms,
            r.bytes,
            shown(&r.path)
        );
    }
}

/// Lines of the log that are not a record (torn by a crash or a full
/// disk, written by hand): left out, and counted to be said.
static UNREADABLE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn emit(line: &str, f: &Filter, json: bool) {
    match serde_json::from_str::<Record>(line) {
        Ok(r) if f.keep(&r) => print(&r, json),
        Ok(_) => {}
        Err(_) if line.trim().is_empty() => {}
        Err(_) => {
            UNREADABLE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Says how many lines were left out since last said, on stderr.
fn say_unreadable() {
    let n = UNREADABLE.swap(0, std::sync::atomic::Ordering::Relaxed);
    if n > 0 {
        eprintln!(
            "{n} line(s) of the audit log are not records (torn by a crash or a full disk, or edited) and were left out"
        );
    }
}

pub async fn run(filter: Filter, follow: bool, output: &str) -> Result<u8> {
    let path = paths::state_dir().join("audit.log");
    let json = output == "json";
    if !json {
        println!(
            "{:<20} {:<12} {:<14} {:<16} {:>4} {:>10} {:>10}  PATH",
            "TIME", "OPERATOR", "CLUSTER", "VERB", "CODE", "DURATION", "BYTES"
        );
    }
    let files = audit::files(&path);
    if files.is_empty() && !follow {
        eprintln!(
            "no audit records yet at '{}' (the hub writes one per gateway request)",
            path.display()
        );
        return Ok(exit::OK);
    }
    // The current file through one handle, opened before anything is
    // read, and followed from where this reading of it ended: nothing
    // written in between is skipped. Lines are split on bytes: a torn or
    // non-UTF-8 line (a hub killed mid-write) is one record left out, not
    // the end of the listing.
    use std::os::unix::fs::MetadataExt;
    let mut current = std::fs::File::open(&path).ok();
    let mut partial = Vec::new();
    for f in files.iter().filter(|f| **f != path) {
        if let Ok(mut file) = std::fs::File::open(f) {
            read_new(&mut file, &mut partial, &filter, json)?;
            partial.clear();
        }
    }
    let mut pos = match current.as_mut() {
        Some(file) => read_new(file, &mut partial, &filter, json)?,
        None => 0,
    };
    say_unreadable();
    if !follow {
        return Ok(exit::OK);
    }
    // When the hub rotates the file (a new one under the same name), the
    // old one is read to its end first, then the new one from its start:
    // no record lost at the rotation, none shown twice.
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Some(file) = current.as_mut() else {
            current = std::fs::File::open(&path).ok();
            pos = 0;
            partial.clear();
            continue;
        };
        file.seek(SeekFrom::Start(pos))?;
        pos += read_new(file, &mut partial, &filter, json)?;
        say_unreadable();
        match std::fs::metadata(&path) {
            Ok(m) if m.ino() != file.metadata()?.ino() => {
                // Renamed away: what the hub wrote to it before it did
                // (after the read above) is read now. What it ended with,
                // unterminated, is not glued to the new file's first line.
                read_new(file, &mut partial, &filter, json)?;
                partial.clear();
                current = std::fs::File::open(&path).ok();
                pos = 0;
            }
            // Truncated in place (by hand): from the top again.
            Ok(m) if m.len() < pos => {
                partial.clear();
                pos = 0;
            }
            _ => {}
        }
    }
}

/// Emits the complete lines read from `file` (from where it stands) to
/// its end, keeping an unterminated last one in `partial`; how many bytes
/// were read.
fn read_new(
    file: &mut std::fs::File,
    partial: &mut Vec<u8>,
    filter: &Filter,
    json: bool,
) -> Result<u64> {
    use std::io::Read;
    let mut buf = Vec::new();
    let n = file.read_to_end(&mut buf)?;
    let mut rest: &[u8] = &buf;
    while let Some(i) = rest.iter().position(|b| *b == b'\n') {
        partial.extend_from_slice(&rest[..i]);
        emit(String::from_utf8_lossy(partial).trim_end(), filter, json);
        partial.clear();
        rest = &rest[i + 1..];
    }
    partial.extend_from_slice(rest);
    // A line past any record's size is no record: dropped, not kept
    // growing.
    if partial.len() > 1 << 20 {
        partial.clear();
    }
    Ok(n as u64)
}
