//! Admission of unauthenticated connections to the hub's listeners.
//!
//! Every connection starts unauthenticated and holds a [`Ticket`] until it
//! proves who it is (an operator's bearer token on the gateway, a finished
//! SSH login on the tunnel) or its pre-authentication deadline passes.
//! Tickets are capped per source address and in total, well under the
//! process's file-descriptor limit, so half-open or silent connections can
//! never starve the listeners of descriptors.
//!
//! Past a cap, the *oldest* unauthenticated connection of the same source
//! (the per-source cap) or of the network holding the most (the total
//! cap; an IPv4 address, an IPv6 /48) is closed to make room. Refusing the new
//! one instead would hand the listener to whoever holds the most idle
//! sockets: an attacker who opens connections and says nothing would lock
//! out every new kubectl and agent until the deadlines expire, while a
//! legitimate client finishes its handshake in milliseconds and leaves the
//! unauthenticated pool long before it could be evicted. Authenticated
//! connections never hold a ticket, so they are never touched.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Caps of one listener.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub total: usize,
    pub per_source: usize,
}

impl Caps {
    /// Caps sized from the file-descriptor limit: the listeners together
    /// may hold at most half of it unauthenticated (each of two listeners
    /// a quarter), so authenticated traffic, upstream channels, the
    /// registry and logs always have room.
    pub fn from_fd_limit(limit: u64) -> Caps {
        let total = ((limit / 4) as usize).clamp(16, 4096);
        Caps {
            total,
            per_source: (total / 2).max(8),
        }
    }
}

/// What a source is counted as for limits per source: an IPv4 address
/// itself, an IPv6 address its /64 (the least a host or a customer is
/// given, SLAAC's prefix): one client holds a whole /64 and could move
/// through it, one address per connection, past any limit per address; an
/// address under NAT64's `64:ff9b::/96` the IPv4 address it carries.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        // An IPv4 client behind a NAT64 or SIIT translator (the well-known
        // prefix, RFC 6052) is its IPv4 address: by /64, every IPv4 client
        // of the translator was one source (one cap, one penalty).
        IpAddr::V6(v6) if v6.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0] => {
            let [.., a, b, c, d] = v6.octets();
            IpAddr::from([a, b, c, d])
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

/// What a source's network is, for choosing whom to close at the total
/// cap: an IPv4 address itself, an IPv6 source's /48 (a site's, as
/// tunnel brokers hand out for free). Counted by /64, one client with a
/// /48 holds 65,536 sources of one connection each, and closing the oldest
/// connection among them all, at a high enough connection rate, closed
/// every handshake in progress (anyone's agent, anyone's kubectl).
fn network_key(source: IpAddr) -> IpAddr {
    match source {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 80) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[derive(Default)]
struct State {
    next: u64,
    /// Oldest first.
    open: BTreeMap<u64, (IpAddr, CancellationToken)>,
    per_source: HashMap<IpAddr, usize>,
    /// The same, by [`network_key`].
    per_network: HashMap<IpAddr, usize>,
    evicted: u64,
}

impl State {
    fn count(&mut self, source: IpAddr) {
        *self.per_source.entry(source).or_insert(0) += 1;
        *self.per_network.entry(network_key(source)).or_insert(0) += 1;
    }
}

/// The unauthenticated connections of one listener.
pub struct Admission {
    what: &'static str,
    caps: Caps,
    state: Mutex<State>,
}

/// A connection's place among the unauthenticated ones; dropping it (on
/// authentication or when the connection ends) frees the place.
pub struct Ticket {
    adm: Arc<Admission>,
    id: u64,
    /// Fires when the connection must close to make room for a newer one.
    pub evicted: CancellationToken,
}

impl Ticket {
    /// The connection turned out to be some client's behind a trusted
    /// proxy (a PROXY protocol header, `X-Forwarded-For` on the tunnel's
    /// upgrade): it counts as that client's from now on, so the per-source
    /// cap (and eviction, that source's oldest first) falls on each client
    /// behind a load balancer rather than on all of them together.
    pub fn rekey(&self, source: IpAddr) {
        let source = source_key(source);
        let adm = &self.adm;
        let mut st = adm.state.lock().unwrap_or_else(|p| p.into_inner());
        let Some(old) = st.open.get(&self.id).map(|(ip, _)| *ip) else {
            return; // evicted already
        };
        if old == source {
            return;
        }
        Admission::forget(&mut st, old);
        if st.per_source.get(&source).copied().unwrap_or(0) >= adm.caps.per_source {
            let victim = st
                .open
                .iter()
                .find(|(id, (ip, _))| *ip == source && **id != self.id)
                .map(|(id, _)| *id);
            if let Some(v) = victim {
                adm.evict(&mut st, v);
            }
        }
        if let Some(entry) = st.open.get_mut(&self.id) {
            entry.0 = source;
        }
        st.count(source);
    }
}

impl Admission {
    pub fn new(what: &'static str, caps: Caps) -> Arc<Admission> {
        Arc::new(Admission {
            what,
            caps,
            state: Mutex::new(State::default()),
        })
    }

    /// Admits a new connection from `source`, evicting the oldest
    /// unauthenticated one when a cap is reached.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Ticket {
        let source = source_key(source);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let from_source = st.per_source.get(&source).copied().unwrap_or(0);
        let victim = if from_source >= self.caps.per_source {
            st.open
                .iter()
                .find(|(_, (ip, _))| *ip == source)
                .map(|(id, _)| *id)
        } else if st.open.len() >= self.caps.total {
            // The oldest of the networks holding the most ([`network_key`]:
            // an IPv4 address, an IPv6 /48): a flood (from one address, a
            // site's many addresses, or one client behind a trusted
            // balancer) gives up its own connections before anyone
            // else's. Among networks that hold as many (a flood from many
            // IPv4 addresses, one each), the oldest connection goes: a
            // legitimate handshake takes milliseconds, so it is seldom the
            // oldest. Ties used to go by the hash map's order, and the
            // same few addresses lost their handshakes again and again (a
            // black-box probe: 80 % of one client's attempts under a churn
            // from many addresses).
            let most = st.per_network.values().copied().max().unwrap_or(0);
            st.open
                .iter()
                .find(|(_, (ip, _))| st.per_network.get(&network_key(*ip)).copied() == Some(most))
                .or_else(|| st.open.iter().next())
                .map(|(id, _)| *id)
        } else {
            None
        };
        if let Some(v) = victim {
            self.evict(&mut st, v);
        }
        let id = st.next;
        st.next += 1;
        let evicted = CancellationToken::new();
        st.open.insert(id, (source, evicted.clone()));
        st.count(source);
        Ticket {
            adm: self.clone(),
            id,
            evicted,
        }
    }

    /// Closes unauthenticated connection `id` to make room.
    fn evict(&self, st: &mut State, id: u64) {
        let Some((ip, token)) = st.open.remove(&id) else {
            return;
        };
        token.cancel();
        Self::forget(st, ip);
        st.evicted += 1;
        if st.evicted.is_power_of_two() {
            tracing::warn!(
                "{}: {} unauthenticated connections closed to make room so far (caps: {} in total, {} per source)",
                self.what,
                st.evicted,
                self.caps.total,
                self.caps.per_source
            );
        }
    }

    fn forget(st: &mut State, ip: IpAddr) {
        for (map, key) in [
            (&mut st.per_source, ip),
            (&mut st.per_network, network_key(ip)),
        ] {
            if let Some(n) = map.get_mut(&key) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&key);
                }
            }
        }
    }

    /// The listener's name, for logs and metrics.
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Unauthenticated connections held right now.
    pub fn open(&self) -> usize {
        self.state.lock().map(|s| s.open.len()).unwrap_or(0)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut st = self.adm.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((ip, _)) = st.open.remove(&self.id) {
            Admission::forget(&mut st, ip);
        }
    }
}

/// Raises the soft open-files limit to the hard one, else to 10,240 where
/// the hard one is refused (macOS's unlimited), (the default soft limit of
/// 1,024 is what a connection flood exhausts first) and returns the limit
/// now in force.
pub fn raise_fd_limit() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 1024;
        }
        // The hard limit, else (macOS refuses an unlimited hard limit as
        // the soft one) OPEN_MAX's 10,240.
        for to in [rl.rlim_max, rl.rlim_max.min(10_240)] {
            if rl.rlim_cur >= to {
                break;
            }
            let want = libc::rlimit {
                rlim_cur: to,
                rlim_max: rl.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                rl.rlim_cur = to;
                break;
            }
        }
    }
    rl.rlim_cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_source_is_its_64() {
        use super::source_key;
        assert_eq!(source_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            source_key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            source_key(ip("2001:db8:1:2::7"))
        );
        assert_ne!(
            source_key(ip("2001:db8:1:3::1")),
            source_key(ip("2001:db8:1:2::1"))
        );
        assert_eq!(source_key(ip("10.0.0.7")), ip("10.0.0.7"));
        assert_eq!(source_key(ip("::ffff:10.0.0.7")), ip("10.0.0.7"));
        // Through a NAT64 translator's well-known prefix: its IPv4 client.
        assert_eq!(source_key(ip("64:ff9b::c000:207")), ip("192.0.2.7"));
        assert_ne!(
            source_key(ip("64:ff9b::c000:207")),
            source_key(ip("64:ff9b::c000:208"))
        );
        // Many addresses of one /64 share one source's cap.
        let adm = Admission::new(
            "test",
            Caps {
                total: 100,
                per_source: 3,
            },
        );
        let tickets: Vec<_> = (1..=5u16)
            .map(|i| adm.admit(ip(&format!("2001:db8:1:2::{i:x}"))))
            .collect();
        let evicted = tickets.iter().filter(|t| t.evicted.is_cancelled()).count();
        assert_eq!(evicted, 2, "the /64's oldest evicted past its cap");
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn evicts_the_oldest_of_the_same_source_first() {
        let adm = Admission::new(
            "test",
            Caps {
                total: 4,
                per_source: 2,
            },
        );
        let a1 = adm.admit(ip("10.0.0.1"));
        let b1 = adm.admit(ip("10.0.0.2"));
        let a2 = adm.admit(ip("10.0.0.1"));
        assert_eq!(adm.open(), 3);
        // A third from 10.0.0.1 pushes out its own oldest, not b1.
        let a3 = adm.admit(ip("10.0.0.1"));
        assert!(a1.evicted.is_cancelled());
        assert!(!b1.evicted.is_cancelled() && !a2.evicted.is_cancelled());
        assert_eq!(adm.open(), 3);
        // Total cap: the oldest of the source holding the most goes
        // (10.0.0.1's a2), not the oldest overall (b1).
        let _c1 = adm.admit(ip("10.0.0.3"));
        let _d1 = adm.admit(ip("10.0.0.4"));
        assert!(a2.evicted.is_cancelled());
        assert!(!b1.evicted.is_cancelled() && !a3.evicted.is_cancelled());
        assert_eq!(adm.open(), 4);
        // Authenticating (dropping the ticket) frees the place.
        drop(a3);
        drop(a1);
        assert_eq!(adm.open(), 3);
    }

    #[test]
    fn a_connection_rekeyed_to_its_client_counts_as_that_clients() {
        let adm = Admission::new(
            "test",
            Caps {
                total: 8,
                per_source: 2,
            },
        );
        let lb = ip("10.0.0.9");
        // Two clients behind one balancer: its cap would hold only two.
        let a1 = adm.admit(lb);
        a1.rekey(ip("192.0.2.1"));
        let b1 = adm.admit(lb);
        b1.rekey(ip("192.0.2.2"));
        let a2 = adm.admit(lb);
        a2.rekey(ip("192.0.2.1"));
        let b2 = adm.admit(lb);
        b2.rekey(ip("192.0.2.2"));
        assert_eq!(adm.open(), 4);
        assert!([&a1, &b1, &a2, &b2]
            .iter()
            .all(|t| !t.evicted.is_cancelled()));
        // A third from 192.0.2.1 pushes out that client's oldest, not the
        // other client's (nor itself).
        let a3 = adm.admit(lb);
        a3.rekey(ip("192.0.2.1"));
        assert!(a1.evicted.is_cancelled());
        assert!(!a2.evicted.is_cancelled() && !a3.evicted.is_cancelled());
        assert!(!b1.evicted.is_cancelled() && !b2.evicted.is_cancelled());
        assert_eq!(adm.open(), 4);
        // Rekeying an evicted ticket, or to its own source, changes nothing;
        // dropping them all frees every place.
        a1.rekey(ip("192.0.2.3"));
        a2.rekey(ip("192.0.2.1"));
        assert_eq!(adm.open(), 4);
        drop((a1, a2, a3, b1, b2));
        assert_eq!(adm.open(), 0);
        assert!(adm.state.lock().unwrap().per_source.is_empty());
    }

    /// A flood from many addresses, one connection each: whatever the
    /// addresses, the oldest connection makes room, never a young one
    /// (which the hash map's order could pick before).
    #[test]
    fn among_sources_holding_as_many_the_oldest_connection_goes() {
        for round in 0..20u8 {
            let adm = Admission::new(
                "test",
                Caps {
                    total: 32,
                    per_source: 4,
                },
            );
            let held: Vec<Ticket> = (0..32u8)
                .map(|i| adm.admit(IpAddr::from([10, round, 0, i])))
                .collect();
            let mut newer = Vec::new();
            for (k, t) in held.iter().enumerate() {
                newer.push(adm.admit(IpAddr::from([10, round, 1, k as u8])));
                assert!(t.evicted.is_cancelled(), "round {round}: {k} kept");
                assert!(
                    held[k + 1..].iter().all(|y| !y.evicted.is_cancelled()),
                    "round {round}: a younger one than {k} went"
                );
            }
        }
    }

    /// A churn from many /64s of one /48 (a tunnel broker's free prefix),
    /// one connection each, closes its own connections, never another
    /// network's handshake in progress: counted by /64 alone, the oldest
    /// connection overall went, whoever's it was.
    #[test]
    fn a_churn_from_one_ipv6_site_closes_its_own_connections() {
        let adm = Admission::new(
            "test",
            Caps {
                total: 16,
                per_source: 8,
            },
        );
        let agent = adm.admit(ip("192.0.2.7"));
        let kubectl = adm.admit(ip("2001:db8:ffff:1::5"));
        let churn: Vec<Ticket> = (0..200u32)
            .map(|i| adm.admit(ip(&format!("2001:db8:77:{:x}::1", i + 1))))
            .collect();
        assert!(!agent.evicted.is_cancelled() && !kubectl.evicted.is_cancelled());
        assert_eq!(
            churn.iter().filter(|t| !t.evicted.is_cancelled()).count(),
            14
        );
        drop((agent, kubectl, churn));
        let st = adm.state.lock().unwrap();
        assert!(st.per_source.is_empty() && st.per_network.is_empty());
    }

    #[test]
    fn caps_follow_the_fd_limit() {
        let c = Caps::from_fd_limit(1024);
        assert_eq!(c.total, 256);
        assert!(c.per_source <= c.total);
        assert_eq!(Caps::from_fd_limit(1_048_576).total, 4096);
    }
}
