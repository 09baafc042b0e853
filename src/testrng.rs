//! What the randomized tests share: a small deterministic generator
//! (splitmix64, no crate: a case is rebuilt from its number alone), used
//! by the WebSocket reader's, `FrameCap`'s and the PROXY header parser's
//! tests, and a WebSocket frame header written independently of the code
//! under test.

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    /// True about once in `n` times.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.next().is_multiple_of(n)
    }

    pub fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.range(0, from.len() - 1)]
    }

    /// `n` bytes drawn from `alphabet`.
    pub fn text(&mut self, n: usize, alphabet: &[u8]) -> Vec<u8> {
        (0..n).map(|_| self.pick(alphabet)).collect()
    }

    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// Appends a WebSocket frame header: the first byte `first` (FIN, RSV,
/// opcode), the declared length `len` in `width` (0: as short as it goes,
/// 1: at least 16 bits, 2: 64 bits), and the mask key if any.
pub fn push_ws_header(out: &mut Vec<u8>, first: u8, len: u64, width: usize, key: Option<[u8; 4]>) {
    out.push(first);
    let m = if key.is_some() { 0x80 } else { 0 };
    if len < 126 && width == 0 {
        out.push(m | len as u8);
    } else if len < 1 << 16 && width < 2 {
        out.push(m | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(m | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    if let Some(k) = key {
        out.extend_from_slice(&k);
    }
}
