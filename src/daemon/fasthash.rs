//! The hasher of the maps a gateway request looks up several times (open
//! streams, live sessions, the operator cache): foldhash instead of std's
//! SipHash, which was ~3 % of the hub's instructions per request. Their
//! keys are names and token hashes the hub registered itself (a member
//! name made up in a request path stays only while its stream is open, or
//! among the few kept empty), and the seed is drawn from the OS once per
//! process, so nobody outside can choose colliding keys.

use std::hash::BuildHasher;
use std::sync::OnceLock;

/// A `HashMap` hashed with [`FastHash`]; make one with `FastMap::default()`.
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastHash>;

/// foldhash with this process's seed.
#[derive(Clone, Debug)]
pub struct FastHash(foldhash::fast::FixedState);

impl Default for FastHash {
    fn default() -> FastHash {
        static SEED: OnceLock<u64> = OnceLock::new();
        let seed = *SEED.get_or_init(|| {
            let mut b = [0u8; 8];
            if getrandom::fill(&mut b).is_err() {
                // No OS randomness (not seen on Linux): the clock and an
                // address are still a seed nobody outside chose.
                let t = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                b = (t ^ (&b as *const _ as u64)).to_ne_bytes();
            }
            u64::from_ne_bytes(b)
        });
        FastHash(foldhash::fast::FixedState::with_seed(seed))
    }
}

impl BuildHasher for FastHash {
    type Hasher = foldhash::fast::FoldHasher<'static>;

    fn build_hasher(&self) -> Self::Hasher {
        self.0.build_hasher()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_hash_with_the_process_seed_and_work_as_maps() {
        let (a, b) = (FastHash::default(), FastHash::default());
        assert_eq!(
            a.hash_one("alpha"),
            b.hash_one("alpha"),
            "one seed per process"
        );
        assert_ne!(a.hash_one("alpha"), a.hash_one("beta"));
        // Not foldhash's fixed default seed.
        assert_ne!(
            a.hash_one("alpha"),
            foldhash::fast::FixedState::default().hash_one("alpha")
        );
        let mut m: FastMap<String, u32> = FastMap::default();
        for i in 0..1000 {
            m.insert(format!("member-{i}"), i);
        }
        assert_eq!(m.len(), 1000);
        assert_eq!(m.get("member-999"), Some(&999));
        assert_eq!(m.remove("member-0"), Some(0));
        assert!(!m.contains_key("member-0"));
    }
}
