//! The raw-channel answer: the first line an agent writes on a channel
//! that carries bytes to a target in its member (CONNECT, port-forward,
//! push mode). `OK\n`, then the target's bytes; or `ERR <code> <text>\n`
//! and the channel closes. Written by the agent, read by the gateway: both
//! use this type, so the two ends cannot drift apart.

use http::StatusCode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Longest answer line accepted; an agent that sends more is broken or
/// hostile, and the gateway must not buffer it.
pub const MAX_LINE: usize = 4096;

/// Why an agent could not dial a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DialCode {
    /// The agent's dial policy (or the member's RBAC) refused it.
    Denied,
    /// The target does not exist (no such service, pod, port or name).
    NotFound,
    /// The target exists but has nothing ready behind it.
    Unavailable,
    /// The target was found but the connection to it failed.
    DialFailed,
}

impl DialCode {
    pub fn as_str(self) -> &'static str {
        match self {
            DialCode::Denied => "denied",
            DialCode::NotFound => "not_found",
            DialCode::Unavailable => "unavailable",
            DialCode::DialFailed => "dial_failed",
        }
    }

    /// Unknown codes (a newer agent) read as a failed dial.
    pub fn parse(s: &str) -> DialCode {
        match s {
            "denied" => DialCode::Denied,
            "not_found" => DialCode::NotFound,
            "unavailable" => DialCode::Unavailable,
            _ => DialCode::DialFailed,
        }
    }

    /// The HTTP status the gateway answers with.
    pub fn http_status(self) -> StatusCode {
        match self {
            DialCode::Denied => StatusCode::FORBIDDEN,
            DialCode::NotFound => StatusCode::NOT_FOUND,
            DialCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            DialCode::DialFailed => StatusCode::BAD_GATEWAY,
        }
    }
}

/// The agent's answer on a raw channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawAnswer {
    Ok,
    Err(DialCode, String),
}

impl RawAnswer {
    /// The line as sent (newlines in the message become spaces, and the
    /// message is cut so the line fits [`MAX_LINE`]).
    pub fn to_line(&self) -> String {
        match self {
            RawAnswer::Ok => "OK\n".to_string(),
            RawAnswer::Err(code, msg) => {
                let mut m = crate::tunnel::printable(msg, MAX_LINE);
                let room = MAX_LINE - 32;
                if m.len() > room {
                    let mut cut = room;
                    while !m.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    m.truncate(cut);
                }
                format!("ERR {} {m}\n", code.as_str())
            }
        }
    }

    pub fn parse(line: &str) -> RawAnswer {
        if line == "OK" {
            return RawAnswer::Ok;
        }
        let rest = line.strip_prefix("ERR ").unwrap_or(line);
        let (code, msg) = rest.split_once(' ').unwrap_or(("dial_failed", rest));
        // The agent's words reach operators' terminals (the gateway's
        // answer, `towerctl port-forward`'s error): never its escapes.
        RawAnswer::Err(
            DialCode::parse(code),
            crate::tunnel::printable(msg, MAX_LINE),
        )
    }

    pub async fn write<W: AsyncWrite + Unpin>(&self, w: &mut W) -> std::io::Result<()> {
        w.write_all(self.to_line().as_bytes()).await
    }

    /// Reads the answer byte by byte, so that nothing after it (the
    /// target's first bytes) is consumed.
    pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<RawAnswer> {
        let mut line = Vec::with_capacity(64);
        loop {
            let b = r.read_u8().await?;
            if b == b'\n' {
                return Ok(RawAnswer::parse(&String::from_utf8_lossy(&line)));
            }
            if line.len() >= MAX_LINE {
                return Err(std::io::Error::other("raw-channel answer line too long"));
            }
            line.push(b);
        }
    }
}

/// The operator behind a raw channel, carried by the hub in the
/// `forwarded-tcpip` channel's originator-address field (an SSH string the
/// tunnel does not interpret): `towerctl-operator {"user":…,"groups":[…]}`.
/// Chosen over a first line written by the hub because the agent knows it
/// before it answers, and because an older agent simply ignores the field
/// (it used to hold the client's IP). An agent that requires impersonation
/// refuses raw channels without it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RawIdentity {
    pub user: String,
    pub groups: Vec<String>,
}

const IDENTITY_PREFIX: &str = "towerctl-operator ";

impl RawIdentity {
    pub fn encode(&self) -> String {
        format!(
            "{IDENTITY_PREFIX}{}",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    /// `None` for anything else (an older hub's client address).
    pub fn decode(s: &str) -> Option<RawIdentity> {
        let json = s.strip_prefix(IDENTITY_PREFIX)?;
        if json.len() > MAX_LINE {
            return None;
        }
        serde_json::from_str::<RawIdentity>(json)
            .ok()
            .filter(|i| !i.user.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_round_trip_and_leave_the_payload() {
        for a in [
            RawAnswer::Ok,
            RawAnswer::Err(DialCode::Denied, "no rule allows 10.0.0.1:22".into()),
            RawAnswer::Err(DialCode::NotFound, "service web".into()),
            RawAnswer::Err(DialCode::Unavailable, "no ready endpoint".into()),
            RawAnswer::Err(DialCode::DialFailed, "refused".into()),
        ] {
            let mut buf = Vec::new();
            a.write(&mut buf).await.unwrap();
            buf.extend_from_slice(b"payload");
            let mut r = &buf[..];
            assert_eq!(RawAnswer::read(&mut r).await.unwrap(), a);
            assert_eq!(r, b"payload");
        }
    }

    #[test]
    fn raw_identity_round_trips_and_ignores_addresses() {
        let who = RawIdentity {
            user: "bob".into(),
            groups: vec!["devs".into()],
        };
        assert_eq!(RawIdentity::decode(&who.encode()), Some(who));
        assert_eq!(RawIdentity::decode("127.0.0.1"), None);
        assert_eq!(
            RawIdentity::decode("towerctl-operator {\"user\":\"\",\"groups\":[]}"),
            None
        );
    }

    #[test]
    fn messages_stay_on_one_bounded_line() {
        let a = RawAnswer::Err(
            DialCode::DialFailed,
            format!("a\nb\r{}", "x".repeat(10_000)),
        );
        let l = a.to_line();
        assert!(l.len() <= MAX_LINE && l.ends_with('\n'));
        assert_eq!(l.matches('\n').count(), 1);
        assert_eq!(
            RawAnswer::parse("ERR what else"),
            RawAnswer::Err(DialCode::DialFailed, "else".into())
        );
    }

    #[test]
    fn an_agents_words_reach_the_hub_without_escapes() {
        // A title-set sequence, colours, a carriage return that would write
        // over the line, a right-to-left override and a zero-width space.
        let hostile = "ERR denied \u{1b}]0;PWNED\u{7}\u{1b}[31mno\rFAKE: granted\u{202e}x\u{200b}y";
        let RawAnswer::Err(code, msg) = RawAnswer::parse(hostile) else {
            panic!("not an error");
        };
        assert_eq!(code, DialCode::Denied);
        assert!(
            msg.chars()
                .all(|c| !c.is_control() && !('\u{2000}'..='\u{206f}').contains(&c)),
            "{msg:?}"
        );
        assert!(
            msg.contains("FAKE: granted") && msg.contains("PWNED"),
            "{msg:?}"
        );
    }

    #[tokio::test]
    async fn refuses_an_endless_line() {
        let buf = vec![b'x'; MAX_LINE + 10];
        assert!(RawAnswer::read(&mut &buf[..]).await.is_err());
    }

    #[test]
    fn codes_map_to_statuses() {
        assert_eq!(DialCode::Denied.http_status(), StatusCode::FORBIDDEN);
        assert_eq!(DialCode::parse("bogus"), DialCode::DialFailed);
    }
}
