//! The cache's secret and the keys derived from it (issue 13, pv13).
//!
//! One secret per cache (32 random bytes). The keys of [`CacheKey`](super::CacheKey)s are
//! derived from it: the tenant partition's keyed hash, the NH key of the body digest and the
//! key of the keyed BLAKE3 that makes the cache key (see the [module docs](super), *Keys*).
//! Where it comes from: [`CacheLayer::secret`](super::CacheLayer::secret), else the store's
//! own ([`CacheStore::secret`](super::CacheStore::secret): a random one per [`MemoryStore`],
//! one kept in the file of a `DiskStore`, one shared through Redis by `RedisStore`s), else a
//! random one per layer.
//!
//! [`MemoryStore`]: super::MemoryStore

use std::fmt;

use crate::anthropic::CanonicalSink;

/// The secret of a response cache: 32 bytes that key every hash of its [`CacheKey`]s.
///
/// Without it, nobody can tell which request a key belongs to, link a partition to an API
/// key, or find two requests with the same key. It is never logged, and `Debug` prints
/// nothing of it. Entries written under one secret are unreachable under another.
///
/// ```
/// use tower_claude::cache::CacheSecret;
///
/// let secret = CacheSecret::from_hex(&"ab".repeat(32)).unwrap();
/// assert_eq!(secret.as_bytes(), &[0xab; 32]);
/// assert_eq!(format!("{secret:?}"), "CacheSecret(..)");
/// assert!(CacheSecret::from_hex("not hex").is_none());
/// assert_ne!(CacheSecret::random(), CacheSecret::random());
/// ```
///
/// [`CacheKey`]: super::CacheKey
#[derive(Clone, PartialEq, Eq)]
pub struct CacheSecret([u8; 32]);

impl CacheSecret {
    /// A secret of the given bytes (which should be random: 32 bytes from a CSPRNG).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// A fresh random secret from the operating system's generator.
    ///
    /// Should the generator fail (it does not on supported systems), the secret is derived
    /// from the time, the process id and addresses of this process instead, and a warning is
    /// logged: unpredictable enough to an outsider for a per-process secret, but not a secret
    /// worth persisting; pass one of your own then.
    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        if let Err(e) = getrandom::fill(&mut bytes) {
            tracing::warn!(error = %e, "cache secret: the OS random generator failed; derived one from the time and the process");
            let mut h = blake3::Hasher::new_derive_key(FALLBACK_CONTEXT);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            h.update(&now.as_nanos().to_le_bytes());
            h.update(&std::process::id().to_le_bytes());
            let local = 0u8;
            h.update(&(std::ptr::addr_of!(local) as usize).to_le_bytes());
            h.update(&(Box::new(0u8).as_ref() as *const u8 as usize).to_le_bytes());
            h.update(&fastrand::u64(..).to_le_bytes());
            bytes = *h.finalize().as_bytes();
        }
        Self(bytes)
    }

    /// A secret from 64 hexadecimal digits (as the proxy's `--cache-secret` takes it);
    /// `None` for anything else.
    pub fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.trim().as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let digit = |c: u8| (c as char).to_digit(16);
        let mut bytes = [0u8; 32];
        for (b, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
            *b = u8::try_from(digit(pair[0])? << 4 | digit(pair[1])?).ok()?;
        }
        Some(Self(bytes))
    }

    /// The secret's bytes (for a store that keeps it).
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for CacheSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CacheSecret(..)")
    }
}

/// The context of [`CacheSecret::random`]'s fallback derivation.
const FALLBACK_CONTEXT: &str = "tower-claude 2026-12 cache secret fallback v1";

/// The context of the derivation of [`Keys`] from a secret. Changing it changes every key.
const KEYS_CONTEXT: &str = "tower-claude 2026-12 cache keys v4";

/// The bytes of a body chunk one NH pass covers (see [`Keys::nh`]): 4 KiB, so that the usual
/// request body has one digest, and the PRF after it one BLAKE3 block to compress (key layout
/// v4; 1 KiB in v3). NH's bound does not depend on the chunk's length; its key grows with it
/// (4 KiB per cache).
pub(crate) const NH_CHUNK: usize = 4096;

/// NH key words: one per 8 bytes of a chunk, and two more for the second (Toeplitz-shifted)
/// pass.
const NH_KEY_WORDS: usize = NH_CHUNK / 8 + 2;

/// The keys of one cache, derived from its [`CacheSecret`] (BLAKE3 in key-derivation mode,
/// extended output), independent of each other.
pub(crate) struct Keys {
    /// The keyed BLAKE3 of [`Partition`](super::key::Partition), whose value keys the PRF
    /// of the cache key.
    pub(crate) partition: [u8; 32],
    /// The NH key of the body digest.
    nh: [u64; NH_KEY_WORDS],
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(..)")
    }
}

impl Keys {
    pub(crate) fn derive(secret: &CacheSecret) -> Self {
        let mut h = blake3::Hasher::new_derive_key(KEYS_CONTEXT);
        h.update(&secret.0);
        let mut xof = h.finalize_xof();
        let mut partition = [0u8; 32];
        xof.fill(&mut partition);
        let mut nh = [0u64; NH_KEY_WORDS];
        for word in &mut nh {
            let mut b = [0u8; 8];
            xof.fill(&mut b);
            *word = u64::from_le_bytes(b);
        }
        Self { partition, nh }
    }

    /// NH of one chunk of at most [`NH_CHUNK`] bytes (the last chunk of a body may be
    /// shorter: it is padded with zeros to whole 16 bytes; the body's length, which enters
    /// the key beside the digests, tells the padding from bytes), two passes: 32 bytes.
    ///
    /// NH (Black, Halevi, Krawczyk, Krovetz and Rogaway, *UMAC: Fast and Secure Message
    /// Authentication*, CRYPTO 1999, §4; RFC 4418 §5.2 with 32-bit words; VMAC's VHASH with
    /// 64-bit words, as here) sums, over the chunk's 64-bit word pairs `(m0, m1)`, the 128-bit
    /// product `(m0 + k[2i]) · (m1 + k[2i+1])` (additions mod 2^64, the sum mod 2^128). For
    /// two different chunks of equal length, the probability over a uniform key that their
    /// NH values are equal is at most 2^-64; the second pass uses the key shifted by two
    /// words (the Toeplitz construction, UMAC §4.4), which makes it at most 2^-128 for both
    /// passes together.
    pub(crate) fn nh(&self, chunk: &[u8]) -> [u8; 32] {
        debug_assert!(chunk.len() <= NH_CHUNK);
        let chunk = &chunk[..chunk.len().min(NH_CHUNK)];
        let mut sums = Sums::default();
        let whole = chunk.len() / 16 * 16;
        sums.absorb(&self.nh, 0, &chunk[..whole]);
        let rest = &chunk[whole..];
        if !rest.is_empty() {
            let mut p = [0u8; 16];
            p[..rest.len()].copy_from_slice(rest);
            sums.absorb(&self.nh, whole / 16, &p);
        }
        sums.digest()
    }

    /// NH of each [`NH_CHUNK`] of bytes given piece by piece (see [`NhStream`]).
    pub(crate) fn nh_stream(&self) -> NhStream<'_> {
        NhStream {
            keys: self,
            sums: Sums::default(),
            pairs: 0,
            carry: [0; 16],
            carried: 0,
            len: 0,
            digests: [[0; 32]; NH_STREAM_CHUNKS],
            chunks: 0,
        }
    }
}

/// The two sums of NH over one chunk (see [`Keys::nh`]).
#[derive(Default)]
struct Sums {
    a: u128,
    b: u128,
}

impl Sums {
    /// Adds the 16-byte pairs of `pairs` (a whole number of them), the first being pair
    /// `first` of its chunk (`first + pairs.len() / 16` at most `NH_CHUNK / 16`).
    #[inline]
    fn absorb(&mut self, k: &[u64; NH_KEY_WORDS], first: usize, pairs: &[u8]) {
        debug_assert!(pairs.len() % 16 == 0 && first + pairs.len() / 16 <= NH_CHUNK / 16);
        let (mut a, mut b) = (self.a, self.b);
        let mut step = |k: &[u64], m0: u64, m1: u64| {
            a = a.wrapping_add(
                u128::from(m0.wrapping_add(k[0])) * u128::from(m1.wrapping_add(k[1])),
            );
            b = b.wrapping_add(
                u128::from(m0.wrapping_add(k[2])) * u128::from(m1.wrapping_add(k[3])),
            );
        };
        // Four pairs a step while they are there (the loop's own instructions once per 64
        // bytes: 2.37k -> ~2.1k instructions for a 2 KB body), then one at a time. The key
        // words a step reads are one slice of known length: no bounds check per word.
        let mut j = first;
        let mut quads = pairs.chunks_exact(64);
        for q in &mut quads {
            let Some(kq) = k.get(2 * j..2 * j + 10) else {
                break;
            };
            for i in 0..4 {
                let (m0, m1) = words(&q[16 * i..16 * i + 16]);
                step(&kq[2 * i..2 * i + 4], m0, m1);
            }
            j += 4;
        }
        for p in quads.remainder().chunks_exact(16) {
            let Some(kp) = k.get(2 * j..2 * j + 4) else {
                break;
            };
            let (m0, m1) = words(p);
            step(kp, m0, m1);
            j += 1;
        }
        (self.a, self.b) = (a, b);
    }

    fn digest(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..16].copy_from_slice(&self.a.to_le_bytes());
        out[16..].copy_from_slice(&self.b.to_le_bytes());
        out
    }
}

/// The most chunks an [`NhStream`] digests (32 KiB): a longer stream says so
/// ([`NhStream::finish`] returns `None`) and the caller hashes a buffer instead.
pub(crate) const NH_STREAM_CHUNKS: usize = 8;

/// [`Keys::nh`] of each [`NH_CHUNK`] of the bytes [`put`](CanonicalSink::put) into it, as
/// they come: the digests of the concatenation, without the concatenation (the cache key of a
/// body written from the scan's hints is hashed from the body's own bytes, span by span; the
/// canonical form is never copied). Pairs split across pieces wait in a 16-byte carry.
pub(crate) struct NhStream<'k> {
    keys: &'k Keys,
    /// The sums of the chunk being digested.
    sums: Sums,
    /// Whole pairs in the chunk being digested.
    pairs: usize,
    carry: [u8; 16],
    carried: usize,
    /// Bytes put.
    len: usize,
    digests: [[u8; 32]; NH_STREAM_CHUNKS],
    /// Chunks digested (more than `NH_STREAM_CHUNKS`: only counted).
    chunks: usize,
}

impl NhStream<'_> {
    /// A chunk is whole: its digest is kept.
    fn end_chunk(&mut self) {
        if let Some(d) = self.digests.get_mut(self.chunks) {
            *d = self.sums.digest();
        }
        self.chunks += 1;
        self.sums = Sums::default();
        self.pairs = 0;
    }

    /// The length of the bytes put and their chunks' digests (the last chunk padded with
    /// zeros to a whole pair, as [`Keys::nh`] pads it); `None` past
    /// [`NH_STREAM_CHUNKS`] chunks.
    pub(crate) fn finish(mut self) -> Option<(usize, [[u8; 32]; NH_STREAM_CHUNKS], usize)> {
        if self.carried > 0 {
            self.carry[self.carried..].fill(0);
            let pair = self.carry;
            self.sums.absorb(&self.keys.nh, self.pairs, &pair);
            self.pairs += 1;
        }
        if self.pairs > 0 {
            self.end_chunk();
        }
        (self.chunks <= NH_STREAM_CHUNKS).then_some((self.len, self.digests, self.chunks))
    }
}

impl CanonicalSink for NhStream<'_> {
    fn put(&mut self, mut bytes: &[u8]) {
        self.len += bytes.len();
        if self.carried > 0 {
            let take = (16 - self.carried).min(bytes.len());
            self.carry[self.carried..self.carried + take].copy_from_slice(&bytes[..take]);
            self.carried += take;
            bytes = &bytes[take..];
            if self.carried < 16 {
                return;
            }
            let pair = self.carry;
            self.sums.absorb(&self.keys.nh, self.pairs, &pair);
            self.carried = 0;
            self.pairs += 1;
            if self.pairs == NH_CHUNK / 16 {
                self.end_chunk();
            }
        }
        while bytes.len() >= 16 {
            let room = (NH_CHUNK / 16 - self.pairs) * 16;
            let n = (bytes.len() / 16 * 16).min(room);
            self.sums.absorb(&self.keys.nh, self.pairs, &bytes[..n]);
            self.pairs += n / 16;
            bytes = &bytes[n..];
            if self.pairs == NH_CHUNK / 16 {
                self.end_chunk();
            }
        }
        self.carry[..bytes.len()].copy_from_slice(bytes);
        self.carried = bytes.len();
    }
}

/// The two little-endian 64-bit words of a 16-byte pair.
fn words(p: &[u8]) -> (u64, u64) {
    let mut w0 = [0u8; 8];
    let mut w1 = [0u8; 8];
    w0.copy_from_slice(&p[..8]);
    w1.copy_from_slice(&p[8..16]);
    (u64::from_le_bytes(w0), u64::from_le_bytes(w1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_refuses_what_is_not_64_digits() {
        let s = CacheSecret::from_hex(&"0123456789abcdefABCDEF".repeat(3)[..64]).unwrap();
        assert_eq!(s.as_bytes()[0], 0x01);
        assert_eq!(s.as_bytes()[7], 0xef);
        for bad in [
            "",
            "ab",
            &"g".repeat(64),
            &"a".repeat(63),
            &"a".repeat(65),
            "+a",
        ] {
            assert!(CacheSecret::from_hex(bad).is_none(), "{bad}");
        }
        assert!(!format!("{s:?}").contains("01"));
    }

    #[test]
    fn keys_differ_by_secret_and_from_each_other() {
        let a = Keys::derive(&CacheSecret::from_bytes([1; 32]));
        let b = Keys::derive(&CacheSecret::from_bytes([2; 32]));
        assert_ne!(a.partition, b.partition);
        assert_ne!(a.nh, b.nh);
        assert_eq!(a.nh, Keys::derive(&CacheSecret::from_bytes([1; 32])).nh);
    }

    /// The stream digests the concatenation of its pieces as `nh` digests each chunk of it,
    /// whatever the pieces: lengths around pairs and chunks, pieces of 0 to 100 bytes and
    /// whole spans, and says when there are more chunks than it keeps.
    #[test]
    fn the_stream_digests_what_nh_digests_chunk_by_chunk() {
        let keys = Keys::derive(&CacheSecret::from_bytes([9; 32]));
        let data: Vec<u8> = (0..NH_CHUNK * NH_STREAM_CHUNKS + 100)
            .map(|i| (i * 31 + 7) as u8)
            .collect();
        let lens = [
            1, 15, 16, 17, 31, 33, 64, 65, 100, 2047, 4095, 4096, 4097, 8191, 8192, 12_345,
        ];
        for len in lens.into_iter().chain([NH_CHUNK * NH_STREAM_CHUNKS]) {
            let body = &data[..len];
            let expected: Vec<[u8; 32]> = body.chunks(NH_CHUNK).map(|c| keys.nh(c)).collect();
            for split in [0usize, 1, 3, 16, 17, 100, 5000] {
                let mut nh = keys.nh_stream();
                let mut at = 0;
                let mut n = 0;
                while at < len {
                    // Piece lengths vary: 0, then `split`, then small odd ones.
                    let piece = match n % 4 {
                        0 => 0,
                        1 => split,
                        2 => 1 + n % 13,
                        _ => 7 * n % 41,
                    }
                    .min(len - at);
                    nh.put(&body[at..at + piece]);
                    at += piece;
                    n += 1;
                }
                let (got_len, digests, chunks) = nh.finish().unwrap();
                assert_eq!(got_len, len);
                assert_eq!(
                    &digests[..chunks],
                    &expected[..],
                    "len {len}, split {split}"
                );
            }
        }
        let mut nh = keys.nh_stream();
        nh.put(&data[..NH_CHUNK * NH_STREAM_CHUNKS + 1]);
        assert!(nh.finish().is_none(), "more chunks than the stream keeps");
    }

    /// NH of a chunk against its definition (words summed one by one in `u128`), for every
    /// length from 0 to a whole chunk, and a change in any byte changes it.
    #[test]
    fn nh_is_the_definition_and_sees_every_byte() {
        let keys = Keys::derive(&CacheSecret::from_bytes([5; 32]));
        let chunk: Vec<u8> = (0..NH_CHUNK).map(|i| (i * 7 + 3) as u8).collect();
        for len in [0, 1, 8, 15, 16, 17, 100, 1000, 1023, 1024, 4080, 4095, 4096] {
            let mut padded = chunk[..len].to_vec();
            padded.resize(len.div_ceil(16) * 16, 0);
            let (mut a, mut b) = (0u128, 0u128);
            for (i, p) in padded.chunks_exact(16).enumerate() {
                let m0 = u64::from_le_bytes(p[..8].try_into().unwrap());
                let m1 = u64::from_le_bytes(p[8..].try_into().unwrap());
                let k = |j: usize| keys.nh[2 * i + j];
                a = a.wrapping_add(
                    u128::from(m0.wrapping_add(k(0))) * u128::from(m1.wrapping_add(k(1))),
                );
                b = b.wrapping_add(
                    u128::from(m0.wrapping_add(k(2))) * u128::from(m1.wrapping_add(k(3))),
                );
            }
            let got = keys.nh(&chunk[..len]);
            assert_eq!(got[..16], a.to_le_bytes(), "{len}");
            assert_eq!(got[16..], b.to_le_bytes(), "{len}");
        }
        let whole = keys.nh(&chunk);
        for at in [0, 1, 7, 8, 15, 511, 1016, 1023, 4088, 4095] {
            let mut other = chunk.clone();
            other[at] ^= 0x40;
            assert_ne!(keys.nh(&other), whole, "byte {at}");
        }
    }
}
