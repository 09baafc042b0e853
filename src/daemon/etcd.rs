//! A small etcd v3 client over etcd's JSON gateway (`/v3/kv/*`,
//! `/v3/lease/*`, `/v3/watch`): keys and values base64, 64-bit integers as
//! strings. No gRPC or protoc in the build.
//!
//! Blocking on purpose: the hub's [`Store`](super::store::Store) trait is
//! synchronous, and the etcd-backed store answers every read from a cache
//! kept current by one watch stream, so only writes (rare: joins, registry
//! changes, session ownership) wait on the network, each bounded by
//! [`TIMEOUT`]. The watch and the lease keepalive run on their own threads.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

/// Bound on one unary request (connect, send, answer).
pub const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd at {endpoints} did not answer ({reason}); registry changes and new joins fail until it is back (a change sent just now may still apply then: check with 'towerctl cluster list'); established tunnels keep working")]
    Unreachable { endpoints: String, reason: String },
    #[error("etcd at {endpoint} refused the request: {reason}")]
    Refused { endpoint: String, reason: String },
}

/// One key-value pair as etcd returns it (key relative to nothing: raw).
#[derive(Debug, Clone)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub mod_revision: i64,
}

/// One watch event.
#[derive(Debug, Clone)]
pub enum Event {
    Put(Kv),
    Delete { key: String, revision: i64 },
}

pub struct Etcd {
    endpoints: Vec<String>,
    next: AtomicUsize,
    /// After every endpoint failed: fail at once until then, so callers
    /// do not each wait out [`TIMEOUT`] while etcd is away.
    down_until: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

fn unb64(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        .unwrap_or_default()
}

/// etcd's JSON gateway writes 64-bit integers as strings, and leaves out
/// zero values.
pub fn int(v: &Value) -> i64 {
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

/// The end of the range of every key starting with `prefix`.
pub fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn kv(v: &Value) -> Kv {
    Kv {
        key: String::from_utf8_lossy(&unb64(&v["key"])).into_owned(),
        value: unb64(&v["value"]),
        mod_revision: int(&v["mod_revision"]),
    }
}

impl Etcd {
    /// `spec`: `etcd://HOST:PORT[,HOST:PORT…]` (or `http://…`).
    pub fn new(spec: &str) -> Result<Etcd, String> {
        let rest = spec
            .strip_prefix("etcd://")
            .or_else(|| spec.strip_prefix("http://"))
            .ok_or_else(|| format!("invalid --store '{spec}': use etcd://HOST:PORT[,HOST:PORT…] (https and client certificates are not supported yet: reach etcd over a private network or a local TLS proxy)"))?;
        let endpoints: Vec<String> = rest
            .split(',')
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() || endpoints.iter().any(|e| !e.contains(':')) {
            return Err(format!(
                "invalid --store '{spec}': every etcd endpoint needs HOST:PORT"
            ));
        }
        Ok(Etcd {
            endpoints,
            next: AtomicUsize::new(0),
            down_until: std::sync::Mutex::new(None),
        })
    }

    pub fn endpoints(&self) -> String {
        self.endpoints.join(",")
    }

    fn open(endpoint: &str, read_timeout: Option<Duration>) -> std::io::Result<TcpStream> {
        let mut last = None;
        for a in endpoint.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, TIMEOUT) {
                Ok(s) => {
                    s.set_read_timeout(read_timeout)?;
                    s.set_write_timeout(Some(TIMEOUT))?;
                    let _ = s.set_nodelay(true);
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
    }

    /// Sends one POST and returns the reader positioned at the body, and
    /// whether the body is chunked (else its length).
    fn send(
        endpoint: &str,
        path: &str,
        body: &Value,
        read_timeout: Option<Duration>,
    ) -> std::io::Result<(u16, BufReader<TcpStream>, Option<usize>)> {
        let mut s = Self::open(endpoint, read_timeout)?;
        let body = body.to_string();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes())?;
        s.write_all(body.as_bytes())?;
        let mut r = BufReader::new(s);
        let mut line = String::new();
        r.read_line(&mut line)?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {line:?}")))?;
        let mut length = None;
        loop {
            line.clear();
            if r.read_line(&mut line)? == 0 {
                break;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().ok();
                }
            }
        }
        Ok((status, r, length))
    }

    /// Reads a chunk of a chunked body; `None` at its end.
    fn chunk(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<u8>>> {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            return Ok(None);
        }
        let mut buf = vec![0; size + 2];
        r.read_exact(&mut buf)?;
        buf.truncate(size);
        Ok(Some(buf))
    }

    fn read_body(r: &mut BufReader<TcpStream>, length: Option<usize>) -> std::io::Result<Vec<u8>> {
        match length {
            Some(n) => {
                let mut b = vec![0; n];
                r.read_exact(&mut b)?;
                Ok(b)
            }
            None => {
                let mut out = Vec::new();
                while let Some(c) = Self::chunk(r)? {
                    out.extend(c);
                    if out.len() > 64 << 20 {
                        return Err(std::io::Error::other("answer too large"));
                    }
                }
                Ok(out)
            }
        }
    }

    /// One unary call, trying each endpoint in turn.
    pub fn call(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        if let Ok(d) = self.down_until.lock() {
            if let Some((until, reason)) = d.as_ref() {
                if std::time::Instant::now() < *until {
                    return Err(EtcdError::Unreachable {
                        endpoints: self.endpoints(),
                        reason: reason.clone(),
                    });
                }
            }
        }
        let n = self.endpoints.len();
        let first = self.next.load(Ordering::Relaxed);
        let mut reason = String::new();
        for i in 0..n {
            let idx = (first + i) % n;
            let ep = &self.endpoints[idx];
            let attempt = Self::send(ep, path, body, Some(TIMEOUT))
                .and_then(|(st, mut r, len)| Self::read_body(&mut r, len).map(|b| (st, b)));
            match attempt {
                Ok((200, b)) => {
                    self.next.store(idx, Ordering::Relaxed);
                    if let Ok(mut d) = self.down_until.lock() {
                        *d = None;
                    }
                    return serde_json::from_slice(&b).map_err(|e| EtcdError::Refused {
                        endpoint: ep.clone(),
                        reason: format!("unreadable answer: {e}"),
                    });
                }
                Ok((st, b)) => {
                    let v: Value = serde_json::from_slice(&b).unwrap_or_default();
                    let msg = v["error"]
                        .as_str()
                        .or(v["message"].as_str())
                        .map(str::to_string)
                        .unwrap_or_else(|| String::from_utf8_lossy(&b).into_owned());
                    // etcd answers 503 while it has no leader: try another.
                    if st >= 500 {
                        reason = format!("{ep}: HTTP {st}: {msg}");
                        continue;
                    }
                    return Err(EtcdError::Refused {
                        endpoint: ep.clone(),
                        reason: format!("HTTP {st}: {msg}"),
                    });
                }
                Err(e) => reason = format!("{ep}: {e}"),
            }
        }
        if let Ok(mut d) = self.down_until.lock() {
            *d = Some((std::time::Instant::now() + TIMEOUT, reason.clone()));
        }
        Err(EtcdError::Unreachable {
            endpoints: self.endpoints(),
            reason,
        })
    }

    /// Every key under `prefix` and the store's revision.
    pub fn range_prefix(&self, prefix: &str) -> Result<(i64, Vec<Kv>), EtcdError> {
        let v = self.call(
            "/v3/kv/range",
            &json!({"key": b64(prefix.as_bytes()), "range_end": b64(&prefix_end(prefix))}),
        )?;
        let kvs = v["kvs"]
            .as_array()
            .map(|a| a.iter().map(kv).collect())
            .unwrap_or_default();
        Ok((int(&v["header"]["revision"]), kvs))
    }

    pub fn get(&self, key: &str) -> Result<Option<Kv>, EtcdError> {
        let v = self.call("/v3/kv/range", &json!({"key": b64(key.as_bytes())}))?;
        Ok(v["kvs"].as_array().and_then(|a| a.first()).map(kv))
    }

    /// Puts `key`; returns the revision it was written at.
    pub fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<i64, EtcdError> {
        let mut req = json!({"key": b64(key.as_bytes()), "value": b64(value)});
        if lease != 0 {
            req["lease"] = json!(lease.to_string());
        }
        let v = self.call("/v3/kv/put", &req)?;
        Ok(int(&v["header"]["revision"]))
    }

    /// A transaction; returns whether the comparisons held and the revision.
    pub fn txn(
        &self,
        compare: Vec<Value>,
        success: Vec<Value>,
        failure: Vec<Value>,
    ) -> Result<(bool, i64, Value), EtcdError> {
        let v = self.call(
            "/v3/kv/txn",
            &json!({"compare": compare, "success": success, "failure": failure}),
        )?;
        Ok((
            v["succeeded"].as_bool().unwrap_or(false),
            int(&v["header"]["revision"]),
            v,
        ))
    }

    pub fn lease_grant(&self, ttl_secs: i64) -> Result<i64, EtcdError> {
        let v = self.call("/v3/lease/grant", &json!({"TTL": ttl_secs.to_string()}))?;
        Ok(int(&v["ID"]))
    }

    /// Renews a lease; `Ok(false)` when etcd no longer knows it (expired).
    pub fn lease_keepalive(&self, id: i64) -> Result<bool, EtcdError> {
        let v = self.call("/v3/lease/keepalive", &json!({"ID": id.to_string()}))?;
        Ok(int(&v["result"]["TTL"]) > 0)
    }

    pub fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", &json!({"ID": id.to_string()}))
            .map(|_| ())
    }

    /// Watches every key under `prefix` from revision `from`, calling
    /// `on` for each batch of events with the batch's revision, until the
    /// stream ends or `on` returns false. Errors when the stream cannot be
    /// opened or breaks.
    pub fn watch(
        &self,
        prefix: &str,
        from: i64,
        mut on: impl FnMut(i64, Vec<Event>) -> bool,
    ) -> Result<(), String> {
        let ep = &self.endpoints[self.next.load(Ordering::Relaxed) % self.endpoints.len()];
        let req = json!({"create_request": {
            "key": b64(prefix.as_bytes()),
            "range_end": b64(&prefix_end(prefix)),
            "start_revision": from.to_string(),
        }});
        let (st, mut r, len) =
            Self::send(ep, "/v3/watch", &req, None).map_err(|e| format!("{ep}: {e}"))?;
        if st != 200 {
            let b = Self::read_body(&mut r, len).unwrap_or_default();
            return Err(format!("{ep}: HTTP {st}: {}", String::from_utf8_lossy(&b)));
        }
        let mut buf: Vec<u8> = Vec::new();
        loop {
            let Some(c) = Self::chunk(&mut r).map_err(|e| format!("{ep}: {e}"))? else {
                return Err(format!("{ep}: the watch stream ended"));
            };
            buf.extend(c);
            let mut consumed = 0;
            {
                let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
                while let Some(Ok(v)) = it.next() {
                    consumed = it.byte_offset();
                    let res = &v["result"];
                    if int(&res["compact_revision"]) > 0 {
                        return Err("the watch fell behind a compaction".into());
                    }
                    if !v["error"].is_null() {
                        return Err(format!("{ep}: watch error: {}", v["error"]));
                    }
                    let rev = int(&res["header"]["revision"]);
                    let events: Vec<Event> = res["events"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .map(|e| {
                                    let k = kv(&e["kv"]);
                                    if e["type"].as_str() == Some("DELETE") {
                                        Event::Delete {
                                            key: k.key,
                                            revision: k.mod_revision,
                                        }
                                    } else {
                                        Event::Put(k)
                                    }
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    if !on(rev, events) {
                        return Ok(());
                    }
                }
            }
            buf.drain(..consumed);
            if buf.len() > 64 << 20 {
                return Err("watch message too large".into());
            }
        }
    }
}

/// Comparison: `key` does not exist.
pub fn absent(key: &str) -> Value {
    json!({"key": b64(key.as_bytes()), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
}

/// Comparison: `key` was last written at `rev`.
pub fn mod_is(key: &str, rev: i64) -> Value {
    json!({"key": b64(key.as_bytes()), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string()})
}

/// Comparison: `key` holds `value`.
pub fn value_is(key: &str, value: &[u8]) -> Value {
    json!({"key": b64(key.as_bytes()), "target": "VALUE", "result": "EQUAL", "value": b64(value)})
}

pub fn op_put(key: &str, value: &[u8], lease: i64) -> Value {
    let mut p = json!({"key": b64(key.as_bytes()), "value": b64(value)});
    if lease != 0 {
        p["lease"] = json!(lease.to_string());
    }
    json!({"request_put": p})
}

pub fn op_delete(key: &str) -> Value {
    json!({"request_delete_range": {"key": b64(key.as_bytes())}})
}

pub fn op_get(key: &str) -> Value {
    json!({"request_range": {"key": b64(key.as_bytes())}})
}

/// The first key-value of a transaction's `i`-th range answer.
pub fn txn_range(v: &Value, i: usize) -> Option<Kv> {
    v["responses"][i]["response_range"]["kvs"]
        .as_array()
        .and_then(|a| a.first())
        .map(kv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end("/a/"), b"/a0".to_vec());
        assert_eq!(int(&json!("42")), 42);
        assert_eq!(int(&Value::Null), 0);
        assert!(Etcd::new("etcd://127.0.0.1:2379,h:1").is_ok());
        assert!(Etcd::new("127.0.0.1:2379").is_err());
        assert!(Etcd::new("etcd://nohostport").is_err());
    }
}
