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
        let k = &self.nh;
        let mut a = 0u128;
        let mut b = 0u128;
        let mut step = |i: usize, m0: u64, m1: u64| {
            a = a.wrapping_add(
                u128::from(m0.wrapping_add(k[i])) * u128::from(m1.wrapping_add(k[i + 1])),
            );
            b = b.wrapping_add(
                u128::from(m0.wrapping_add(k[i + 2])) * u128::from(m1.wrapping_add(k[i + 3])),
            );
        };
        // At most `NH_CHUNK / 16` pairs: with the pair index bounded so, the key words it
        // reads (up to `2 * 63 + 3`) are known to be in the key, and the loop has no bounds
        // checks (2.7k → 2.4k instructions for a 2 KB body).
        let mut pairs = chunk.chunks_exact(16);
        for j in 0..NH_CHUNK / 16 {
            let Some(p) = pairs.next() else { break };
            let (m0, m1) = words(p);
            step(2 * j, m0, m1);
        }
        let rest = pairs.remainder();
        if !rest.is_empty() {
            let mut p = [0u8; 16];
            p[..rest.len()].copy_from_slice(rest);
            let (m0, m1) = words(&p);
            step(2 * (chunk.len() / 16), m0, m1);
        }
        let mut out = [0u8; 32];
        out[..16].copy_from_slice(&a.to_le_bytes());
        out[16..].copy_from_slice(&b.to_le_bytes());
        out
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
