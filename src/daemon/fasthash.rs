//! The hasher of the maps a gateway request looks up several times (open
//! streams, live sessions, the operator cache): foldhash instead of std's
//! SipHash, which was ~3 % of the hub's instructions per request. Their
//! keys are names and token hashes the hub registered itself (a member
//! name made up in a request path stays only while its stream is open, or
//! among the few kept empty), and both of foldhash's seeds are drawn from
//! the OS once per process: a client cannot compute which keys collide.

use std::hash::BuildHasher;
use std::sync::OnceLock;

use foldhash::fast::SeedableRandomState;
use foldhash::SharedSeed;

/// A `HashMap` hashed with [`FastHash`]; make one with `FastMap::default()`.
pub type FastMap<K, V> = std::collections::HashMap<K, V, FastHash>;

/// foldhash with this process's seeds.
#[derive(Clone, Debug)]
pub struct FastHash(SeedableRandomState);

/// Both of foldhash's seeds, drawn once: the per-hasher one and the shared
/// one (foldhash's `FixedState` randomizes only the first and keeps its
/// published constants for the second).
struct Seeds {
    per_hasher: u64,
    shared: SharedSeed,
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        // std's `RandomState` takes its keys from the OS.
        let os = std::collections::hash_map::RandomState::new();
        Seeds {
            per_hasher: os.hash_one(1u8),
            shared: SharedSeed::from_u64(os.hash_one(2u8)),
        }
    })
}

impl Default for FastHash {
    fn default() -> FastHash {
        let s = seeds();
        FastHash(SeedableRandomState::with_seed(s.per_hasher, &s.shared))
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
        // Neither half of the seed is foldhash's published one.
        let per = seeds().per_hasher;
        for fixed in [
            foldhash::fast::FixedState::with_seed(per).hash_one("alpha"),
            SeedableRandomState::with_seed(per, SharedSeed::global_fixed()).hash_one("alpha"),
            foldhash::fast::FixedState::default().hash_one("alpha"),
        ] {
            assert_ne!(a.hash_one("alpha"), fixed);
        }
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
