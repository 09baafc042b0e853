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
    /// Dialed: the target's bytes follow. With the window the agent asks
    /// the hub to keep to (`OK window=N`), said here instead of in a
    /// window frame to a hub whose open told its own ([`RawOpen::window`]:
    /// an older hub would read the longer line as an error).
    Ok(Option<u64>),
    Err(DialCode, String),
}

impl RawAnswer {
    /// The line as sent (newlines in the message become spaces, and the
    /// message is cut so the line fits [`MAX_LINE`]).
    pub fn to_line(&self) -> String {
        match self {
            RawAnswer::Ok(None) => "OK\n".to_string(),
            RawAnswer::Ok(Some(window)) => format!("OK window={window}\n"),
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
            return RawAnswer::Ok(None);
        }
        if let Some(w) = line
            .strip_prefix("OK window=")
            .and_then(|w| w.parse::<u64>().ok())
        {
            return RawAnswer::Ok(Some(w));
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

/// The most of a client's first bytes a raw channel's open carries
/// ([`RawOpen::early`]).
pub const EARLY_MAX: usize = 16 * 1024;

/// The request header in which `towerctl port-forward` sends, with its
/// CONNECT to the gateway, what the local client has already sent
/// (base64, at most [`EARLY_MAX`] decoded): the hub puts them in the
/// channel's open ([`RawOpen`]), and a client that speaks first (HTTP) has
/// its answer one round trip to the agent sooner. The gateway's 200 says
/// in [`EARLY_TAKEN_HEADER`] how many it took (a hub that carries the
/// CONNECT on to the hub holding the member passes the header on and
/// relays that hub's count); a hub that says nothing (an older one) took
/// none, and port-forward sends them on the stream.
pub const EARLY_HEADER: &str = "towerctl-early";

/// The gateway's answer to a CONNECT with [`EARLY_HEADER`]: how many of
/// those bytes went to the target.
pub const EARLY_TAKEN_HEADER: &str = "towerctl-early-taken";

/// The bytes of an [`EARLY_HEADER`] value, or why there are none to take.
pub fn decode_early(value: &[u8]) -> Result<Vec<u8>, String> {
    if value.len() > EARLY_MAX.div_ceil(3) * 4 {
        return Err(format!(
            "the {EARLY_HEADER} header carries more than {EARLY_MAX} bytes; send the rest on the stream"
        ));
    }
    early_bytes(value).ok_or_else(|| {
        format!("the {EARLY_HEADER} header is not base64 of at most {EARLY_MAX} bytes")
    })
}

/// Base64 of at most [`EARLY_MAX`] bytes, decoded (in the header and in
/// the open alike).
fn early_bytes(b64: &[u8]) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .ok()
        .filter(|b| b.len() <= EARLY_MAX)
}

/// An [`EARLY_HEADER`] value for `bytes` (at most [`EARLY_MAX`]).
pub fn encode_early(bytes: &[u8]) -> String {
    use base64::Engine;
    debug_assert!(bytes.len() <= EARLY_MAX);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Longest originator field an agent reads: the identity (names and
/// groups, a few hundred bytes; at most [`MAX_LINE`] as before the
/// client's bytes came with it) and up to [`EARLY_MAX`] bytes in base64
/// with their key. The hub leaves the bytes out of an open they would make
/// longer (an operator with very many groups) and sends them on the stream.
pub const MAX_OPEN: usize = MAX_LINE + 64 + EARLY_MAX.div_ceil(3) * 4;

/// What the hub says in a raw channel's open: the operator and, to an
/// agent that takes them ([`crate::tunnel::FEATURE_OPEN_EARLY`]), the
/// window the hub asks the agent to keep to and the bytes the client sent
/// before the stream opened. With those in the open, a port-forwarded
/// connection whose client speaks first (HTTP) reaches its target one
/// round trip to the agent sooner: the agent writes them to the target as
/// soon as it has dialed, instead of the hub sending them (and its window)
/// once the agent has confirmed the channel. An older agent ignores the
/// two fields, so the hub sends them only to agents that said they take
/// them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RawOpen {
    #[serde(flatten)]
    pub who: RawIdentity,
    /// The window the hub asks for (as a window frame would).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
    /// The client's first bytes, base64, at most [`EARLY_MAX`] decoded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub early: Option<String>,
    /// `early` decoded, by [`RawOpen::decode`] (which checks it that way).
    #[serde(skip)]
    decoded: Vec<u8>,
}

impl RawOpen {
    /// An open naming `who` only.
    pub fn new(who: RawIdentity) -> RawOpen {
        RawOpen {
            who,
            window: None,
            early: None,
            decoded: Vec::new(),
        }
    }

    /// Carries `bytes` (at most [`EARLY_MAX`]) as the client's first bytes.
    pub fn set_early(&mut self, bytes: &[u8]) {
        self.early = (!bytes.is_empty()).then(|| encode_early(bytes));
        self.decoded = bytes.to_vec();
    }

    /// Leaves the client's first bytes out.
    pub fn clear_early(&mut self) {
        self.early = None;
        self.decoded = Vec::new();
    }

    /// The client's first bytes (empty when there are none), taken out.
    pub fn take_early(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.decoded)
    }

    pub fn encode(&self) -> String {
        format!(
            "{IDENTITY_PREFIX}{}",
            serde_json::to_string(self).unwrap_or_default()
        )
    }

    /// `Ok(None)` for an originator that is no open of ours (an older
    /// hub's client address); `Err` for one that is but cannot be read
    /// (no user, bytes that are not base64 or more than [`EARLY_MAX`]): its
    /// stream is refused, as its first bytes would be lost.
    pub fn decode(s: &str) -> Result<Option<RawOpen>, &'static str> {
        let Some(json) = s.strip_prefix(IDENTITY_PREFIX) else {
            return Ok(None);
        };
        if json.len() > MAX_OPEN {
            return Err("the stream's open from the hub is too long");
        }
        let mut open: RawOpen = serde_json::from_str(json)
            .map_err(|_| "the stream's open from the hub could not be read")?;
        if open.who.user.is_empty() {
            return Err("the stream's open from the hub names no operator");
        }
        if let Some(e) = &open.early {
            open.decoded = early_bytes(e.as_bytes())
                .ok_or("the client's first bytes in the stream's open are not valid")?;
        }
        Ok(Some(open))
    }
}

/// The first bytes of the request on an API channel, carried by the hub
/// in the channel's originator-address field (`towerctl-request BASE64`,
/// at most [`EARLY_MAX`] bytes decoded) to agents that take them
/// ([`crate::tunnel::FEATURE_REQUEST_IN_OPEN`]): the agent reads them
/// ahead of the channel's bytes, and the request reaches the member with
/// the open instead of a round trip after it. An older hub's originator
/// (the client's address) carries none.
pub struct FirstRequest;

const REQUEST_PREFIX: &str = "towerctl-request ";

impl FirstRequest {
    /// The originator field carrying `bytes` (at most [`EARLY_MAX`]).
    pub fn encode(bytes: &[u8]) -> String {
        format!("{REQUEST_PREFIX}{}", encode_early(bytes))
    }

    /// The bytes an originator field carries: none for one that is no
    /// open of ours; `Err` for one that is but cannot be read (the
    /// request would be lost, so its stream is refused).
    pub fn decode(originator: &str) -> Result<Vec<u8>, &'static str> {
        let Some(b64) = originator.strip_prefix(REQUEST_PREFIX) else {
            return Ok(Vec::new());
        };
        early_bytes(b64.as_bytes())
            .ok_or("the request in the stream's open from the hub is not valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_with_a_connect_round_trip_within_their_bound() {
        for bytes in [b"x".to_vec(), (0..=255u8).collect(), vec![7u8; EARLY_MAX]] {
            assert_eq!(decode_early(encode_early(&bytes).as_bytes()), Ok(bytes));
        }
        use base64::Engine;
        let b64 = |n: usize| base64::engine::general_purpose::STANDARD.encode(vec![7u8; n]);
        assert!(decode_early(b64(20_000).as_bytes())
            .unwrap_err()
            .contains("more than 16384 bytes"));
        // As long as a value of EARLY_MAX bytes can be, and two more.
        let edge = b64(EARLY_MAX + 2);
        assert_eq!(edge.len(), EARLY_MAX.div_ceil(3) * 4);
        assert!(decode_early(edge.as_bytes())
            .unwrap_err()
            .contains("at most 16384 bytes"));
        for bad in ["not base64!", "aGVsbG8", "aGVs\nbG8="] {
            assert!(
                decode_early(bad.as_bytes())
                    .unwrap_err()
                    .contains("towerctl-early header is not base64"),
                "{bad}"
            );
        }
        assert_eq!(decode_early(b""), Ok(Vec::new()));
    }

    #[test]
    fn a_request_in_an_open_round_trips_and_a_bad_one_is_refused() {
        let head = b"GET /version HTTP/1.1\r\nhost: kube-apiserver\r\n\r\n";
        assert_eq!(
            FirstRequest::decode(&FirstRequest::encode(head)).unwrap(),
            head
        );
        // An older hub's originator: the client's address, no bytes.
        for old in ["127.0.0.1", "::1", ""] {
            assert_eq!(FirstRequest::decode(old), Ok(Vec::new()));
        }
        use base64::Engine;
        let long = base64::engine::general_purpose::STANDARD.encode(vec![1u8; EARLY_MAX + 1]);
        for bad in ["towerctl-request !!", &format!("towerctl-request {long}")] {
            assert!(FirstRequest::decode(bad).unwrap_err().contains("not valid"));
        }
    }

    #[tokio::test]
    async fn answers_round_trip_and_leave_the_payload() {
        for a in [
            RawAnswer::Ok(None),
            RawAnswer::Ok(Some(8 << 20)),
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
    fn raw_opens_round_trip_and_ignore_addresses() {
        let who = RawIdentity {
            user: "bob".into(),
            groups: vec!["devs".into()],
        };
        let open = RawOpen::new(who.clone());
        assert_eq!(RawOpen::decode(&open.encode()), Ok(Some(open.clone())));
        // What an older hub sends, and what it sent before the identity.
        assert_eq!(
            RawOpen::decode("towerctl-operator {\"user\":\"bob\",\"groups\":[\"devs\"]}"),
            Ok(Some(open))
        );
        assert_eq!(RawOpen::decode("127.0.0.1"), Ok(None));
        assert!(RawOpen::decode("towerctl-operator {\"user\":\"\",\"groups\":[]}").is_err());
        assert!(RawOpen::decode("towerctl-operator {\"user\":").is_err());
        // With a window and the client's first bytes, up to the most.
        let mut full = RawOpen::new(who);
        full.window = Some(1 << 20);
        let first: Vec<u8> = (0..EARLY_MAX).map(|i| (i % 251) as u8).collect();
        full.set_early(&first);
        let got = RawOpen::decode(&full.encode()).unwrap().unwrap();
        assert_eq!(got, full);
        assert_eq!(got.clone().take_early(), first);
        assert_eq!(got.window, Some(1 << 20));
        // Fields an older agent does not know are ignored by its parser.
        let old: RawIdentity =
            serde_json::from_str(full.encode().strip_prefix(IDENTITY_PREFIX).unwrap()).unwrap();
        assert_eq!(old.user, "bob");
        let mut none = RawOpen::new(old);
        none.set_early(b"");
        assert_eq!(none.early, None);
        assert!(none.take_early().is_empty());
    }

    #[test]
    fn an_open_fits_the_agents_limit_with_the_most_first_bytes_unless_its_groups_are_many() {
        let full: Vec<u8> = vec![0xa5; EARLY_MAX];
        // An operator with a few long groups: the open with the most
        // first bytes fits, and reads back.
        let mut open = RawOpen::new(RawIdentity {
            user: "u".repeat(253),
            groups: (0..8).map(|i| format!("{i}{}", "g".repeat(250))).collect(),
        });
        open.window = Some(u64::MAX);
        open.set_early(&full);
        assert!(open.encode().len() <= MAX_OPEN, "{}", open.encode().len());
        assert_eq!(
            RawOpen::decode(&open.encode())
                .unwrap()
                .unwrap()
                .take_early(),
            full
        );
        // Sixteen of them: too long with the bytes, which the hub then
        // sends on the stream instead (the agent would refuse the open);
        // without them it fits.
        open.who.groups = (0..16)
            .map(|i| format!("{i:02}{}", "g".repeat(251)))
            .collect();
        assert!(open.encode().len() > MAX_OPEN);
        assert!(RawOpen::decode(&open.encode()).is_err());
        open.clear_early();
        assert!(open.encode().len() <= MAX_OPEN);
        assert!(RawOpen::decode(&open.encode()).unwrap().is_some());
    }

    #[test]
    fn an_open_whose_first_bytes_cannot_be_read_is_refused() {
        let who = RawIdentity {
            user: "bob".into(),
            groups: vec![],
        };
        let mut open = RawOpen::new(who);
        open.early = Some("not base64!".into());
        assert!(RawOpen::decode(&open.encode()).is_err());
        use base64::Engine;
        open.early =
            Some(base64::engine::general_purpose::STANDARD.encode(vec![0u8; EARLY_MAX + 1]));
        assert!(RawOpen::decode(&open.encode()).is_err());
        let long = format!(
            "towerctl-operator {{\"user\":\"{}\",\"groups\":[]}}",
            "x".repeat(MAX_OPEN)
        );
        assert!(RawOpen::decode(&long).is_err());
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
