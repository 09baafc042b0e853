//! `towerctl audit`: read the hub's audit log (on the hub machine).

use std::io::{BufRead, BufReader, Seek, SeekFrom};
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

fn emit(line: &str, f: &Filter, json: bool) {
    if let Ok(r) = serde_json::from_str::<Record>(line) {
        if f.keep(&r) {
            print(&r, json);
        }
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
    for f in &files {
        if let Ok(file) = std::fs::File::open(f) {
            for line in BufReader::new(file).lines().map_while(Result::ok) {
                emit(&line, &filter, json);
            }
        }
    }
    if !follow {
        return Ok(exit::OK);
    }
    // Follow the current file, reopening it when it is rotated.
    let mut pos = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let mut partial = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Ok(mut file) = std::fs::File::open(&path) else {
            continue;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < pos {
            pos = 0; // rotated
        }
        if len == pos {
            continue;
        }
        file.seek(SeekFrom::Start(pos))?;
        let mut reader = BufReader::new(file);
        let mut buf = String::new();
        while reader.read_line(&mut buf)? > 0 {
            pos += buf.len() as u64;
            if buf.ends_with('\n') {
                partial.push_str(&buf);
                emit(partial.trim_end(), &filter, json);
                partial.clear();
            } else {
                partial.push_str(&buf);
            }
            buf.clear();
        }
    }
}
