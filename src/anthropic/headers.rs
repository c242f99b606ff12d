//! Rate-limit and retry headers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Header names used by the Anthropic API and by this crate.
pub mod header_names {
    /// API key header.
    pub const X_API_KEY: &str = "x-api-key";
    /// API version header.
    pub const ANTHROPIC_VERSION: &str = "anthropic-version";
    /// Beta features header.
    pub const ANTHROPIC_BETA: &str = "anthropic-beta";
    /// Request id set by the server on every response.
    pub const REQUEST_ID: &str = "request-id";
    /// Seconds (or an HTTP date) to wait before retrying.
    pub const RETRY_AFTER: &str = "retry-after";
    /// Milliseconds to wait before retrying (set by the SDK-facing edge).
    pub const RETRY_AFTER_MS: &str = "retry-after-ms";
    /// `true` / `false`: whether the server wants the client to retry.
    pub const X_SHOULD_RETRY: &str = "x-should-retry";
    /// Prefix of every rate-limit header.
    pub const RATELIMIT_PREFIX: &str = "anthropic-ratelimit-";
    /// The attempt number this crate adds to a replayed request (1 for the first attempt).
    pub const X_TOWER_CLAUDE_ATTEMPT: &str = "x-tower-claude-attempt";
    /// The model that served the request, set by the fallback layer.
    pub const X_TOWER_CLAUDE_MODEL: &str = "x-tower-claude-model";
    /// `hit`, `miss` or `bypass`, set by the cache layer.
    pub const X_TOWER_CLAUDE_CACHE: &str = "x-tower-claude-cache";
    /// Per-request opt-out of model fallback (`off`).
    pub const X_TOWER_CLAUDE_FALLBACK: &str = "x-tower-claude-fallback";
}

/// The names of [`header_names`] the layers look up or set on every request, parsed once: a
/// lookup or insert by `&str` parses (and checks) the name on every call.
pub(crate) mod parsed_names {
    use http::HeaderName;

    use super::header_names as name;

    pub(crate) static X_API_KEY: HeaderName = HeaderName::from_static(name::X_API_KEY);
    pub(crate) static ANTHROPIC_BETA: HeaderName = HeaderName::from_static(name::ANTHROPIC_BETA);
    pub(crate) static RETRY_AFTER: HeaderName = HeaderName::from_static(name::RETRY_AFTER);
    pub(crate) static RETRY_AFTER_MS: HeaderName = HeaderName::from_static(name::RETRY_AFTER_MS);
    pub(crate) static X_TOWER_CLAUDE_ATTEMPT: HeaderName =
        HeaderName::from_static(name::X_TOWER_CLAUDE_ATTEMPT);
    pub(crate) static X_TOWER_CLAUDE_MODEL: HeaderName =
        HeaderName::from_static(name::X_TOWER_CLAUDE_MODEL);
    pub(crate) static X_TOWER_CLAUDE_CACHE: HeaderName =
        HeaderName::from_static(name::X_TOWER_CLAUDE_CACHE);
    pub(crate) static X_TOWER_CLAUDE_FALLBACK: HeaderName =
        HeaderName::from_static(name::X_TOWER_CLAUDE_FALLBACK);

    /// A map of at most this many values is walked by [`get`] and [`contains`] rather than
    /// looked up.
    const WALKED: usize = 8;

    /// The first value of `name` in `headers`: [`HeaderMap::get`]'s answer. A small map (at
    /// most [`WALKED`] values: the head of a request or an answer inside the stack) is
    /// walked, its names compared with `name`: a lookup hashes a custom name byte by byte
    /// first (callgrind: `x-api-key` ~170 instructions, `x-tower-claude-cache` ~160, where
    /// the walk of the stack's heads of one to three values, call included, is ~80). Names
    /// that differ in length differ at their first test.
    ///
    /// [`HeaderMap::get`]: http::HeaderMap::get
    #[inline]
    pub(crate) fn get<'a>(
        headers: &'a http::HeaderMap,
        name: &HeaderName,
    ) -> Option<&'a http::HeaderValue> {
        if headers.len() > WALKED {
            return headers.get(name);
        }
        // The map's iterator gives each name's values in order, its first value first.
        let name = name.as_str().as_bytes();
        headers
            .iter()
            .find_map(|(n, value)| same(n.as_str().as_bytes(), name).then_some(value))
    }

    /// Whether two header names are the same: their bytes (a name's bytes are its identity:
    /// a standard name is never held as a custom one), compared eight at a time in line. The
    /// slice comparison called `bcmp` for names of one length (`x-tower-claude-cache` beside
    /// `x-tower-claude-model`: ~30 instructions a call).
    #[inline]
    fn same(a: &[u8], b: &[u8]) -> bool {
        let n = a.len();
        if n != b.len() {
            return false;
        }
        if n < 8 {
            return a == b;
        }
        let word = |s: &[u8], at: usize| s.get(at..).and_then(<[u8]>::first_chunk::<8>).copied();
        let mut at = 0;
        // Whole words, then the last eight bytes (overlapping the words before when the
        // length is not a multiple of eight).
        while at + 8 < n {
            if word(a, at) != word(b, at) {
                return false;
            }
            at += 8;
        }
        word(a, n - 8) == word(b, n - 8)
    }

    /// Whether `headers` holds `name`: [`HeaderMap::contains_key`]'s answer, by a walk of
    /// a small map's names as [`get`].
    ///
    /// [`HeaderMap::contains_key`]: http::HeaderMap::contains_key
    #[inline]
    pub(crate) fn contains(headers: &http::HeaderMap, name: &HeaderName) -> bool {
        if headers.keys_len() > WALKED {
            return headers.contains_key(name);
        }
        let name = name.as_str().as_bytes();
        headers.keys().any(|n| same(n.as_str().as_bytes(), name))
    }

    #[cfg(test)]
    mod tests {
        use http::{HeaderMap, HeaderName, HeaderValue};

        /// Names compare as their bytes, at every length and at every byte.
        #[test]
        fn names_compare_as_their_bytes() {
            for n in 0..40usize {
                let a: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
                assert!(super::same(&a, &a.clone()));
                for at in 0..n {
                    let mut b = a.clone();
                    b[at] = b'-';
                    assert!(!super::same(&a, &b), "{n} {at}");
                }
                let mut longer = a.clone();
                longer.push(b'a');
                assert!(!super::same(&a, &longer));
            }
        }

        /// The walk answers as the map's lookup, on maps below and above the size walked:
        /// standard and custom names, names of one length, repeated names (the first value),
        /// absent names.
        #[test]
        fn the_walk_answers_as_the_lookup() {
            let names: Vec<HeaderName> = [
                "x-api-key",
                "x-api-kez",
                "content-type",
                "anthropic-version",
                "x-tower-claude-cache",
                "x-tower-claude-model",
                "authorization",
                "request-id",
            ]
            .into_iter()
            .map(HeaderName::from_static)
            .collect();
            let mut probes = names.clone();
            probes.extend(
                ["x-tower-claude-fallback", "retry-after", "x-api-ke"].map(HeaderName::from_static),
            );
            for size in 0..=12usize {
                for repeat in [false, true] {
                    let mut map = HeaderMap::new();
                    for i in 0..size {
                        let name = &names[(i * 3) % names.len()];
                        let value = HeaderValue::from_str(&format!("v{i}")).unwrap();
                        if repeat {
                            map.append(name, value);
                        } else {
                            map.insert(name, value);
                        }
                    }
                    for probe in &probes {
                        assert_eq!(super::get(&map, probe), map.get(probe), "{size} {probe}");
                        assert_eq!(
                            super::contains(&map, probe),
                            map.contains_key(probe),
                            "{size} {probe}"
                        );
                    }
                }
            }
        }
    }
}

/// One rate-limit bucket as the server reported it.
///
/// Token `remaining` values are rounded by the server (to thousands); `reset` is the time at
/// which the bucket is full again.
///
/// Values that cannot be true are read as absent, so that one broken or hostile answer
/// cannot lock a key out: a `limit` of 0 (no request could ever pass: the server would not
/// have answered) or above [`BucketSnapshot::MAX_LIMIT`], and a `remaining` above the limit is
/// read as the limit.
///
/// ```
/// use http::HeaderMap;
/// use tower_claude::anthropic::RateLimitSnapshot;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("anthropic-ratelimit-requests-limit", "0".parse().unwrap());
/// headers.insert("anthropic-ratelimit-requests-remaining", "0".parse().unwrap());
/// headers.insert("anthropic-ratelimit-input-tokens-limit", "1000".parse().unwrap());
/// headers.insert("anthropic-ratelimit-input-tokens-remaining", "99999".parse().unwrap());
/// let snap = RateLimitSnapshot::from_headers(&headers);
/// assert_eq!(snap.requests.limit, None);
/// assert_eq!(snap.input_tokens.remaining, Some(1000));
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BucketSnapshot {
    /// `anthropic-ratelimit-*-limit`.
    pub limit: Option<u64>,
    /// `anthropic-ratelimit-*-remaining`.
    pub remaining: Option<u64>,
    /// `anthropic-ratelimit-*-reset` (RFC 3339).
    pub reset: Option<SystemTime>,
}

impl BucketSnapshot {
    /// The largest `limit` taken as credible (10^12 per minute); above it the header is
    /// ignored.
    pub const MAX_LIMIT: u64 = 1_000_000_000_000;
}

/// Every `anthropic-ratelimit-*` header of one response.
///
/// ```
/// use http::HeaderMap;
/// use tower_claude::anthropic::RateLimitSnapshot;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("anthropic-ratelimit-requests-limit", "50".parse().unwrap());
/// headers.insert("anthropic-ratelimit-requests-remaining", "49".parse().unwrap());
/// headers.insert("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:01Z".parse().unwrap());
/// headers.insert("anthropic-ratelimit-input-tokens-remaining", "oops".parse().unwrap());
/// let snap = RateLimitSnapshot::from_headers(&headers);
/// assert_eq!(snap.requests.limit, Some(50));
/// assert_eq!(snap.requests.remaining, Some(49));
/// assert!(snap.requests.reset.is_some());
/// assert_eq!(snap.input_tokens.remaining, None); // malformed: skipped
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitSnapshot {
    /// `anthropic-ratelimit-requests-*`.
    pub requests: BucketSnapshot,
    /// `anthropic-ratelimit-tokens-*` (the most restrictive token limit).
    pub tokens: BucketSnapshot,
    /// `anthropic-ratelimit-input-tokens-*`.
    pub input_tokens: BucketSnapshot,
    /// `anthropic-ratelimit-output-tokens-*`.
    pub output_tokens: BucketSnapshot,
}

impl RateLimitSnapshot {
    /// Reads every rate-limit header; missing or malformed values are skipped. A header sent
    /// twice counts with its first value.
    pub fn from_headers(headers: &HeaderMap) -> Self {
        if headers.is_empty() {
            // An answer without headers (a mock, an in-process service): not even the pass
            // below's table of slots to set up (callgrind: ~70 instructions a call, two calls
            // per answer of `benches/rate_limit.rs`).
            return Self::default();
        }
        // One pass over the headers, matching names by prefix: a lookup per name parsed and
        // hashed twelve names per answer (callgrind: ~11k instructions per call, ~2k now).
        // `[bucket][limit, remaining, reset]`: the first value of each header, as
        // `HeaderMap::get` would give it.
        let mut seen: [[Option<&HeaderValue>; 3]; 4] = [[None; 3]; 4];
        let mut any = false;
        for (name, value) in headers {
            let Some(slot) = ratelimit_slot(name.as_str().as_bytes()) else {
                continue;
            };
            let (bucket, field) = slot;
            let slot = &mut seen[bucket][field];
            if slot.is_none() {
                *slot = Some(value);
                any = true;
            }
        }
        if !any {
            // An answer without rate-limit headers (an error from a proxy, a mock, another
            // upstream): nothing to parse (callgrind: ~350 instructions down to ~60).
            return Self::default();
        }
        // Each bucket built in place, in the order of `ratelimit_slot` (a loop over `BUCKETS`
        // copied that table, 224 bytes, and wrote the buckets through a `match`).
        let bucket = |[limit, remaining, reset]: [Option<&HeaderValue>; 3]| {
            BucketSnapshot::from_parsed(
                limit.and_then(count_of),
                remaining.and_then(count_of),
                reset.and_then(reset_of),
            )
        };
        let [requests, tokens, input_tokens, output_tokens] = seen.map(bucket);
        Self {
            requests,
            tokens,
            input_tokens,
            output_tokens,
        }
    }

    #[cfg(test)]
    fn bucket_mut(&mut self, name: BucketName) -> &mut BucketSnapshot {
        match name {
            BucketName::Requests => &mut self.requests,
            BucketName::Tokens => &mut self.tokens,
            BucketName::InputTokens => &mut self.input_tokens,
            BucketName::OutputTokens => &mut self.output_tokens,
        }
    }

    fn bucket(&self, name: BucketName) -> &BucketSnapshot {
        match name {
            BucketName::Requests => &self.requests,
            BucketName::Tokens => &self.tokens,
            BucketName::InputTokens => &self.input_tokens,
            BucketName::OutputTokens => &self.output_tokens,
        }
    }

    /// Whether no rate-limit header was present.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Writes the snapshot as `anthropic-ratelimit-*` headers (used by the simulator and proxy).
    ///
    /// Only the fields that are set are written; `reset` is written with second precision in
    /// UTC (`2026-01-01T00:00:01Z`). A reset time that cannot be represented is skipped.
    ///
    /// ```
    /// use http::HeaderMap;
    /// use tower_claude::anthropic::{BucketSnapshot, RateLimitSnapshot};
    ///
    /// let snap = RateLimitSnapshot {
    ///     output_tokens: BucketSnapshot { limit: Some(8000), remaining: Some(7000), reset: None },
    ///     ..Default::default()
    /// };
    /// let mut headers = HeaderMap::new();
    /// snap.write_headers(&mut headers);
    /// assert_eq!(headers["anthropic-ratelimit-output-tokens-remaining"], "7000");
    /// assert_eq!(RateLimitSnapshot::from_headers(&headers), snap);
    /// ```
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        for (name, bucket) in BUCKETS {
            self.bucket(name).write(headers, bucket);
        }
    }
}

/// `(bucket, field)` of an `anthropic-ratelimit-*` header name (`[limit, remaining, reset]`),
/// `None` for any other name. The prefix and each suffix are compared as fixed-size arrays
/// (loads and integer compares in line): a `strip_prefix` and a `match` on the `str` called
/// `memcmp` a dozen times per answer (callgrind, `from_headers`: 12 calls, ~0.24k
/// instructions).
fn ratelimit_slot(name: &[u8]) -> Option<(usize, usize)> {
    const PREFIX: &[u8; 20] = b"anthropic-ratelimit-";
    const _: () = assert!(PREFIX.len() == header_names::RATELIMIT_PREFIX.len());
    let (prefix, rest) = name.split_first_chunk::<20>()?;
    if prefix != PREFIX {
        return None;
    }
    /// `rest` is `suffix`, compared as an array of its length.
    fn is<const N: usize>(rest: &[u8], suffix: &[u8; N]) -> bool {
        <&[u8; N]>::try_from(rest).is_ok_and(|r| r == suffix)
    }
    // A jump on the length, then at most two comparisons.
    Some(match rest.len() {
        12 if is(rest, b"tokens-limit") => (1, 0),
        12 if is(rest, b"tokens-reset") => (1, 2),
        14 if is(rest, b"requests-limit") => (0, 0),
        14 if is(rest, b"requests-reset") => (0, 2),
        16 if is(rest, b"tokens-remaining") => (1, 1),
        18 if is(rest, b"requests-remaining") => (0, 1),
        18 if is(rest, b"input-tokens-limit") => (2, 0),
        18 if is(rest, b"input-tokens-reset") => (2, 2),
        19 if is(rest, b"output-tokens-limit") => (3, 0),
        19 if is(rest, b"output-tokens-reset") => (3, 2),
        22 if is(rest, b"input-tokens-remaining") => (2, 1),
        23 if is(rest, b"output-tokens-remaining") => (3, 1),
        _ => return None,
    })
}

#[derive(Clone, Copy)]
enum BucketName {
    Requests,
    Tokens,
    InputTokens,
    OutputTokens,
}

/// (bucket, header names: limit, remaining, reset)
const BUCKETS: [(BucketName, [&str; 3]); 4] = [
    (
        BucketName::Requests,
        [
            "anthropic-ratelimit-requests-limit",
            "anthropic-ratelimit-requests-remaining",
            "anthropic-ratelimit-requests-reset",
        ],
    ),
    (
        BucketName::Tokens,
        [
            "anthropic-ratelimit-tokens-limit",
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-tokens-reset",
        ],
    ),
    (
        BucketName::InputTokens,
        [
            "anthropic-ratelimit-input-tokens-limit",
            "anthropic-ratelimit-input-tokens-remaining",
            "anthropic-ratelimit-input-tokens-reset",
        ],
    ),
    (
        BucketName::OutputTokens,
        [
            "anthropic-ratelimit-output-tokens-limit",
            "anthropic-ratelimit-output-tokens-remaining",
            "anthropic-ratelimit-output-tokens-reset",
        ],
    ),
];

impl BucketSnapshot {
    /// A bucket from its three header values (trimmed UTF-8), read one by one (the tests'
    /// reference for [`RateLimitSnapshot::from_headers`]).
    #[cfg(test)]
    fn from_values(limit: Option<&str>, remaining: Option<&str>, reset: Option<&str>) -> Self {
        Self::from_parsed(
            limit.and_then(|v| v.parse::<u64>().ok()),
            remaining.and_then(|v| v.parse::<u64>().ok()),
            reset.and_then(parse_reset),
        )
    }

    /// A bucket from its parsed values: a limit out of range is none, the remaining count is
    /// at most the limit.
    fn from_parsed(limit: Option<u64>, remaining: Option<u64>, reset: Option<SystemTime>) -> Self {
        let limit = limit.filter(|l| (1..=Self::MAX_LIMIT).contains(l));
        let remaining = remaining.map(|r| limit.map_or(r, |l| r.min(l)));
        Self {
            limit,
            remaining,
            reset,
        }
    }

    fn write(&self, headers: &mut HeaderMap, names: [&'static str; 3]) {
        let [limit, remaining, reset] = names;
        if let Some(v) = self.limit {
            headers.insert(limit, HeaderValue::from(v));
        }
        if let Some(v) = self.remaining {
            headers.insert(remaining, HeaderValue::from(v));
        }
        if let Some(v) = self.reset.and_then(format_rfc3339) {
            if let Ok(v) = HeaderValue::from_str(&v) {
                headers.insert(reset, v);
            }
        }
    }
}

/// `value` with spaces and tabs around it cut off (`str::trim` of a header value that
/// `to_str` accepts cuts just those), as bytes.
fn trim_blanks(value: &[u8]) -> &[u8] {
    let start = value
        .iter()
        .position(|b| !matches!(b, b' ' | b'\t'))
        .unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !matches!(b, b' ' | b'\t'))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// A count header (`limit`, `remaining`): `to_str`, `trim` and `parse::<u64>` of the value,
/// straight from its bytes when they are at most 19 digits between blanks (no UTF-8 check, no
/// `str` trim: callgrind ~0.9k of ~3.9k instructions per answer's headers).
fn count_of(value: &HeaderValue) -> Option<u64> {
    // The usual value, digits alone (a value with blanks or anything else takes the path
    // below).
    if let Some(v) = plain_count(value.as_bytes()) {
        return Some(v);
    }
    if let Some(v) = plain_count(trim_blanks(value.as_bytes())) {
        return Some(v);
    }
    value.to_str().ok()?.trim().parse().ok()
}

/// `bytes` read as a decimal count when they are 1 to 19 ASCII digits (never more than
/// `u64::MAX`), eight at a time: a check and three multiplies per eight digits, then the
/// rest byte by byte (callgrind: ~130 instructions per 13-digit count byte by byte).
fn plain_count(mut bytes: &[u8]) -> Option<u64> {
    if !(1..=19).contains(&bytes.len()) {
        return None;
    }
    let (mut v, mut plain) = (0u64, true);
    while let Some((eight, rest)) = bytes.split_first_chunk::<8>() {
        let w = u64::from_le_bytes(*eight);
        plain &= eight_digits(w);
        v = v
            .wrapping_mul(100_000_000)
            .wrapping_add(eight_digits_value(w));
        bytes = rest;
    }
    for &b in bytes {
        let d = b.wrapping_sub(b'0');
        plain &= d <= 9;
        v = v.wrapping_mul(10).wrapping_add(u64::from(d));
    }
    plain.then_some(v)
}

/// Whether the eight bytes of `w` (little-endian) are all ASCII digits: each high nibble 3,
/// and adding 6 to each low nibble does not carry into it.
fn eight_digits(w: u64) -> bool {
    const HIGH: u64 = 0xf0f0_f0f0_f0f0_f0f0;
    const THREES: u64 = 0x3030_3030_3030_3030;
    (w & HIGH) == THREES && (w.wrapping_add(0x0606_0606_0606_0606) & HIGH) == THREES
}

/// The value of eight ASCII digits read little-endian (the first digit the lowest byte),
/// below 10^8; any value for other bytes (then [`eight_digits`] is false).
fn eight_digits_value(w: u64) -> u64 {
    // Pairs, then fours, then the eight (the low nibbles hold the digits).
    let w = ((w & 0x0f0f_0f0f_0f0f_0f0f).wrapping_mul(10 << 8 | 1)) >> 8;
    let w = ((w & 0x00ff_00ff_00ff_00ff).wrapping_mul(100 << 16 | 1)) >> 16;
    ((w & 0x0000_ffff_0000_ffff).wrapping_mul(10_000 << 32 | 1)) >> 32
}

/// A `reset` header: [`parse_reset`] of its trimmed UTF-8 value; a value this thread parsed
/// last is found by its bytes (between blanks) without checking them again.
fn reset_of(value: &HeaderValue) -> Option<SystemTime> {
    if let Some(known) = recent_reset(trim_blanks(value.as_bytes())) {
        return known;
    }
    parse_reset(value.to_str().ok()?.trim())
}

/// A header as trimmed UTF-8, when present and valid.
fn header_str(headers: &HeaderMap, name: impl http::header::AsHeaderName) -> Option<&str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// [`parse_rfc3339`] through this thread's last few reset values: answers within one second
/// carry the same `reset` times, and parsing them was a third of reading the headers
/// (callgrind: 1.1k of 3k instructions per answer).
fn parse_reset(value: &str) -> Option<SystemTime> {
    if let Some(known) = recent_reset(value.as_bytes()) {
        return known;
    }
    let parsed = parse_rfc3339(value);
    let _ = RECENT_RESETS.try_with(|r| r.borrow_mut().put(value.as_bytes(), parsed));
    parsed
}

thread_local! {
    /// The reset values this thread parsed last (keys: trimmed UTF-8 values). RFC 3339 times
    /// with a fraction and an offset are about 35 bytes.
    static RECENT_RESETS: std::cell::RefCell<super::recent::Recent<Option<SystemTime>>> =
        const { std::cell::RefCell::new(super::recent::Recent::new(64)) };
}

/// The parse of `value` if this thread made it last (`Some(None)`: it did not parse).
fn recent_reset(value: &[u8]) -> Option<Option<SystemTime>> {
    RECENT_RESETS
        .try_with(|r| r.borrow().get(value))
        .ok()
        .flatten()
}

fn parse_rfc3339(value: &str) -> Option<SystemTime> {
    let t = OffsetDateTime::parse(value, &Rfc3339).ok()?;
    let secs = t.unix_timestamp();
    let nanos = t.nanosecond();
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs.unsigned_abs(), nanos))
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))?
            .checked_add(Duration::from_nanos(u64::from(nanos)))
    }
}

/// Second precision, UTC, `Z` suffix. `None` for times `time` cannot represent.
fn format_rfc3339(at: SystemTime) -> Option<String> {
    let secs = match at.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok()?,
        Err(e) => {
            // Round towards the past, like the non-negative case truncates.
            let d = e.duration();
            let whole = i64::try_from(d.as_secs()).ok()?;
            if d.subsec_nanos() > 0 {
                -whole - 1
            } else {
                -whole
            }
        }
    };
    let t = OffsetDateTime::from_unix_timestamp(secs).ok()?;
    t.format(&Rfc3339).ok()
}

/// The delay the server asked for: `retry-after-ms`, then `retry-after` as (fractional) seconds
/// or an HTTP date (measured from `now`). `None` when absent or malformed.
///
/// Numbers must be plain non-negative decimals (`1500`, `0.25`); negative values, `NaN`, `inf`
/// and exponents are malformed, and a malformed `retry-after-ms` falls through to
/// `retry-after`. An HTTP date in the past gives [`Duration::ZERO`]. Delays longer than
/// [`MAX_RETRY_AFTER`] (one day) are clamped to it.
///
/// ```
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use http::HeaderMap;
/// use tower_claude::anthropic::retry_after;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("retry-after", "2".parse().unwrap());
/// assert_eq!(retry_after(&headers, SystemTime::now()), Some(Duration::from_secs(2)));
/// headers.insert("retry-after-ms", "1500".parse().unwrap());
/// assert_eq!(retry_after(&headers, SystemTime::now()), Some(Duration::from_millis(1500)));
/// ```
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    if let Some(ms) = header_str(headers, &parsed_names::RETRY_AFTER_MS).and_then(parse_number) {
        return Some(clamp_delay(ms / 1000.0));
    }
    let value = header_str(headers, &parsed_names::RETRY_AFTER)?;
    if let Some(secs) = parse_number(value) {
        return Some(clamp_delay(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    // A date in the past means "now".
    let delay = at.duration_since(now).unwrap_or(Duration::ZERO);
    Some(delay.min(MAX_RETRY_AFTER))
}

/// The longest delay [`retry_after`] returns: one day. Larger (or infinite) values are clamped
/// to it rather than dropped, so that a caller still sees that the server asked for a very long
/// wait (and can decide by its own deadline) instead of retrying at once.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

/// A finite or infinite non-negative number; negative numbers and NaN are malformed.
fn parse_number(value: &str) -> Option<f64> {
    // Plain decimal only: `f64::from_str` would also accept `inf`, `NaN` and exponents.
    let digits = value.strip_prefix('+').unwrap_or(value);
    let valid = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        && digits.bytes().filter(|&b| b == b'.').count() <= 1
        && digits.bytes().any(|b| b.is_ascii_digit());
    if !valid {
        return None;
    }
    digits.parse::<f64>().ok().filter(|v| *v >= 0.0)
}

fn clamp_delay(secs: f64) -> Duration {
    if secs.is_nan() || secs <= 0.0 {
        Duration::ZERO
    } else if secs >= MAX_RETRY_AFTER.as_secs_f64() {
        MAX_RETRY_AFTER
    } else {
        Duration::from_secs_f64(secs)
    }
}

/// The `x-should-retry` header: `Some(true)` / `Some(false)` when present and valid
/// (case-insensitive, surrounding whitespace ignored).
///
/// ```
/// use http::HeaderMap;
/// use tower_claude::anthropic::should_retry;
///
/// let mut headers = HeaderMap::new();
/// assert_eq!(should_retry(&headers), None);
/// headers.insert("x-should-retry", " False ".parse().unwrap());
/// assert_eq!(should_retry(&headers), Some(false));
/// ```
pub fn should_retry(headers: &HeaderMap) -> Option<bool> {
    let value = header_str(headers, header_names::X_SHOULD_RETRY)?;
    if value.eq_ignore_ascii_case("true") {
        Some(true)
    } else if value.eq_ignore_ascii_case("false") {
        Some(false)
    } else {
        None
    }
}

/// The `request-id` header, when present and valid UTF-8.
///
/// ```
/// use http::HeaderMap;
/// use tower_claude::anthropic::request_id;
///
/// let mut headers = HeaderMap::new();
/// headers.insert("request-id", "req_011CS".parse().unwrap());
/// assert_eq!(request_id(&headers), Some("req_011CS"));
/// ```
pub fn request_id(headers: &HeaderMap) -> Option<&str> {
    headers.get(header_names::REQUEST_ID)?.to_str().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_is_what_parse_reads_from_the_trimmed_value() {
        let mut values: Vec<String> = [
            "0",
            "7",
            "50",
            "4000000",
            " 42",
            "42 ",
            "\t42\t",
            "",
            " ",
            "+5",
            "-5",
            "4 2",
            "1e3",
            "0x10",
            "9999999999999999999",
            "18446744073709551615",
            "18446744073709551616",
            "99999999999999999999",
            "00000000000000000001",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        for n in [1u64, 9, 10, 99, 100, 12_345, u64::MAX / 10, u64::MAX] {
            values.push(n.to_string());
        }
        for v in &values {
            let value = HeaderValue::from_str(v).unwrap();
            let expected = v.trim().parse::<u64>().ok();
            assert_eq!(count_of(&value), expected, "{v:?}");
        }
    }

    /// Every length from 0 to 21 digits, each with every byte class at every position: the
    /// eight-at-a-time read answers as `parse` does.
    #[test]
    fn counts_read_eight_digits_at_a_time_as_parse_does() {
        let digits = b"9876543210987654321098";
        for len in 0..=21 {
            let base = &digits[..len];
            let mut values = vec![base.to_vec()];
            for at in 0..len {
                for b in [
                    b'/',
                    b':',
                    b' ',
                    b'\t',
                    b'+',
                    b'a',
                    b'0',
                    b'9',
                    0x80,
                    0xff,
                    b'0' + 16,
                ] {
                    let mut v = base.to_vec();
                    v[at] = b;
                    values.push(v);
                }
            }
            values.push(vec![b'9'; len]);
            values.push(vec![b'0'; len]);
            for v in values {
                let value = HeaderValue::from_bytes(&v).unwrap();
                let expected = value
                    .to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok());
                assert_eq!(count_of(&value), expected, "{v:?}");
            }
        }
    }

    /// The name match answers as the `str` match it replaced, for the twelve names and for
    /// every name one byte off or one byte short of them.
    #[test]
    fn ratelimit_names_match_as_the_str_match_did() {
        fn by_str(name: &[u8]) -> Option<(usize, usize)> {
            let rest = std::str::from_utf8(name)
                .ok()?
                .strip_prefix(header_names::RATELIMIT_PREFIX)?;
            Some(match rest {
                "requests-limit" => (0, 0),
                "requests-remaining" => (0, 1),
                "requests-reset" => (0, 2),
                "tokens-limit" => (1, 0),
                "tokens-remaining" => (1, 1),
                "tokens-reset" => (1, 2),
                "input-tokens-limit" => (2, 0),
                "input-tokens-remaining" => (2, 1),
                "input-tokens-reset" => (2, 2),
                "output-tokens-limit" => (3, 0),
                "output-tokens-remaining" => (3, 1),
                "output-tokens-reset" => (3, 2),
                _ => return None,
            })
        }
        let mut names: Vec<Vec<u8>> = vec![
            b"anthropic-ratelimit-".to_vec(),
            b"content-type".to_vec(),
            b"".to_vec(),
        ];
        for (i, (_, fields)) in BUCKETS.into_iter().enumerate() {
            for (j, name) in fields.into_iter().enumerate() {
                assert_eq!(ratelimit_slot(name.as_bytes()), Some((i, j)), "{name}");
                let name = name.as_bytes();
                names.push(name[..name.len() - 1].to_vec());
                names.push([name, b"s"].concat());
                for at in 0..name.len() {
                    for b in [b'-', b'a', b'x', name[at] ^ 0x20, name[at].wrapping_add(1)] {
                        let mut n = name.to_vec();
                        n[at] = b;
                        names.push(n);
                    }
                }
            }
        }
        for name in &names {
            assert_eq!(
                ratelimit_slot(name),
                by_str(name),
                "{:?}",
                String::from_utf8_lossy(name)
            );
        }
    }

    /// The memo of reset values answers exactly as the parse, hits and misses alike.
    #[test]
    fn remembered_resets_read_as_parsed_ones() {
        let values = [
            "2026-01-01T00:00:01Z",
            "2026-01-01T00:00:01.5+02:00",
            "not a time",
            "2026-01-01T00:00:02Z",
            "",
            "1969-12-31T23:59:59Z",
        ];
        for _ in 0..3 {
            for v in values.iter().chain(values.iter().rev()) {
                assert_eq!(parse_reset(v), parse_rfc3339(v), "{v}");
            }
        }
        assert!(parse_reset("2026-01-01T00:00:01Z").is_some());
        assert_eq!(parse_reset("not a time"), None);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for &(name, value) in pairs {
            map.append(name, HeaderValue::from_str(value).unwrap());
        }
        map
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn reads_all_four_buckets() {
        let map = headers(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "49"),
            ("anthropic-ratelimit-requests-reset", "2026-01-01T00:00:01Z"),
            ("anthropic-ratelimit-tokens-limit", "38000"),
            ("anthropic-ratelimit-tokens-remaining", "37000"),
            (
                "anthropic-ratelimit-tokens-reset",
                "2026-01-01T00:00:02.5+00:00",
            ),
            ("anthropic-ratelimit-input-tokens-limit", "30000"),
            ("anthropic-ratelimit-input-tokens-remaining", "29000"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "2026-01-01T01:00:03+01:00",
            ),
            ("anthropic-ratelimit-output-tokens-limit", " 8000 "),
            ("anthropic-ratelimit-output-tokens-remaining", "8000"),
            (
                "anthropic-ratelimit-output-tokens-reset",
                "2026-01-01T00:00:04Z",
            ),
        ]);
        let snap = RateLimitSnapshot::from_headers(&map);
        let base = 1_767_225_600; // 2026-01-01T00:00:00Z
        assert_eq!(
            snap.requests,
            BucketSnapshot {
                limit: Some(50),
                remaining: Some(49),
                reset: Some(at(base + 1))
            }
        );
        assert_eq!(snap.tokens.limit, Some(38_000));
        assert_eq!(snap.tokens.remaining, Some(37_000));
        assert_eq!(
            snap.tokens.reset,
            Some(at(base + 2) + Duration::from_millis(500))
        );
        assert_eq!(snap.input_tokens.remaining, Some(29_000));
        assert_eq!(snap.input_tokens.reset, Some(at(base + 3)));
        assert_eq!(
            snap.output_tokens,
            BucketSnapshot {
                limit: Some(8000),
                remaining: Some(8000),
                reset: Some(at(base + 4))
            }
        );
        assert!(!snap.is_empty());
    }

    #[test]
    fn malformed_values_are_skipped() {
        let map = headers(&[
            ("anthropic-ratelimit-requests-limit", "-1"),
            ("anthropic-ratelimit-requests-remaining", "1.5"),
            ("anthropic-ratelimit-requests-reset", "tomorrow"),
            (
                "anthropic-ratelimit-tokens-limit",
                "99999999999999999999999",
            ),
            ("anthropic-ratelimit-tokens-reset", "2026-13-01T00:00:00Z"),
            (
                "anthropic-ratelimit-input-tokens-reset",
                "Thu, 01 Jan 2026 00:00:00 GMT",
            ),
        ]);
        let mut map = map;
        map.insert(
            "anthropic-ratelimit-output-tokens-limit",
            HeaderValue::from_bytes(b"\xff10").unwrap(),
        );
        let snap = RateLimitSnapshot::from_headers(&map);
        assert!(snap.is_empty(), "{snap:?}");
        assert!(RateLimitSnapshot::from_headers(&HeaderMap::new()).is_empty());
    }

    #[test]
    fn write_then_read_round_trips_at_second_precision() {
        let snap = RateLimitSnapshot {
            requests: BucketSnapshot {
                limit: Some(50),
                remaining: Some(0),
                reset: Some(at(1_767_225_601)),
            },
            tokens: BucketSnapshot {
                limit: None,
                remaining: Some(1000),
                reset: None,
            },
            input_tokens: BucketSnapshot {
                // The largest credible limit (above it a limit is read as absent: see
                // `absurd_limits_are_read_as_absent`).
                limit: Some(BucketSnapshot::MAX_LIMIT),
                remaining: None,
                reset: Some(at(1_767_225_602) + Duration::from_millis(999)),
            },
            output_tokens: BucketSnapshot::default(),
        };
        let mut map = HeaderMap::new();
        snap.write_headers(&mut map);
        assert_eq!(
            map["anthropic-ratelimit-requests-reset"],
            "2026-01-01T00:00:01Z"
        );
        assert_eq!(
            map["anthropic-ratelimit-input-tokens-reset"],
            "2026-01-01T00:00:02Z"
        );
        assert_eq!(map.len(), 6);
        let back = RateLimitSnapshot::from_headers(&map);
        let mut expected = snap;
        expected.input_tokens.reset = Some(at(1_767_225_602));
        assert_eq!(back, expected);
    }

    #[test]
    fn absurd_limits_are_read_as_absent() {
        let read = |limit: &str, remaining: &str| {
            let mut map = HeaderMap::new();
            map.insert("anthropic-ratelimit-requests-limit", limit.parse().unwrap());
            map.insert(
                "anthropic-ratelimit-requests-remaining",
                remaining.parse().unwrap(),
            );
            let snap = RateLimitSnapshot::from_headers(&map).requests;
            (snap.limit, snap.remaining)
        };
        assert_eq!(read("0", "0"), (None, Some(0)));
        assert_eq!(read("-5", "3"), (None, Some(3)));
        assert_eq!(read("18446744073709551615", "7"), (None, Some(7)));
        assert_eq!(read("1000000000001", "7"), (None, Some(7)));
        assert_eq!(read("50", "99999"), (Some(50), Some(50)));
        assert_eq!(read("50", "-1"), (Some(50), None));
        assert_eq!(read("50", "49"), (Some(50), Some(49)));
    }

    #[test]
    fn write_handles_times_before_the_epoch_and_far_future() {
        let before = UNIX_EPOCH - Duration::from_millis(1500);
        assert_eq!(
            format_rfc3339(before).as_deref(),
            Some("1969-12-31T23:59:58Z")
        );
        let far = UNIX_EPOCH + Duration::from_secs(400_000_000_000);
        assert_eq!(format_rfc3339(far), None);
        let snap = RateLimitSnapshot {
            requests: BucketSnapshot {
                limit: None,
                remaining: None,
                reset: Some(far),
            },
            ..Default::default()
        };
        let mut map = HeaderMap::new();
        snap.write_headers(&mut map);
        assert!(map.is_empty());
    }

    #[test]
    fn retry_after_ms_wins_and_may_be_fractional() {
        let now = at(1_000);
        let map = headers(&[("retry-after-ms", "1500.5"), ("retry-after", "9")]);
        assert_eq!(
            retry_after(&map, now),
            Some(Duration::from_micros(1_500_500))
        );
        let map = headers(&[("retry-after-ms", "0")]);
        assert_eq!(retry_after(&map, now), Some(Duration::ZERO));
    }

    #[test]
    fn retry_after_seconds_integer_and_fractional() {
        let now = at(1_000);
        assert_eq!(
            retry_after(&headers(&[("retry-after", "7")]), now),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", " 0.25 ")]), now),
            Some(Duration::from_millis(250))
        );
    }

    #[test]
    fn retry_after_http_date_is_measured_from_now() {
        let now = httpdate::parse_http_date("Thu, 01 Jan 2026 00:00:00 GMT").unwrap();
        let map = headers(&[("retry-after", "Thu, 01 Jan 2026 00:00:30 GMT")]);
        assert_eq!(retry_after(&map, now), Some(Duration::from_secs(30)));
        let past = headers(&[("retry-after", "Wed, 31 Dec 2025 23:59:00 GMT")]);
        assert_eq!(retry_after(&past, now), Some(Duration::ZERO));
        let far = headers(&[("retry-after", "Fri, 01 Jan 2100 00:00:00 GMT")]);
        assert_eq!(retry_after(&far, now), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn retry_after_rejects_nonsense_and_clamps_absurd_values() {
        let now = at(1_000);
        for bad in ["-1", "NaN", "inf", "1e3", "", "soon", "1.2.3", "."] {
            assert_eq!(
                retry_after(&headers(&[("retry-after", bad)]), now),
                None,
                "{bad:?}"
            );
        }
        // A malformed retry-after-ms falls through to retry-after.
        let map = headers(&[("retry-after-ms", "-5"), ("retry-after", "3")]);
        assert_eq!(retry_after(&map, now), Some(Duration::from_secs(3)));
        let map = headers(&[("retry-after", "99999999999999999999999999")]);
        assert_eq!(retry_after(&map, now), Some(MAX_RETRY_AFTER));
        let map = headers(&[("retry-after-ms", "172800000")]);
        assert_eq!(retry_after(&map, now), Some(MAX_RETRY_AFTER));
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn should_retry_values() {
        for (value, expected) in [
            ("true", Some(true)),
            ("TRUE", Some(true)),
            (" false", Some(false)),
            ("False ", Some(false)),
            ("yes", None),
            ("", None),
        ] {
            assert_eq!(
                should_retry(&headers(&[("x-should-retry", value)])),
                expected,
                "{value:?}"
            );
        }
        assert_eq!(should_retry(&HeaderMap::new()), None);
    }

    #[test]
    fn request_id_requires_utf8() {
        assert_eq!(
            request_id(&headers(&[("request-id", "req_1")])),
            Some("req_1")
        );
        let mut map = HeaderMap::new();
        map.insert("request-id", HeaderValue::from_bytes(b"req_\xff").unwrap());
        assert_eq!(request_id(&map), None);
        assert_eq!(request_id(&HeaderMap::new()), None);
    }

    /// The single pass reads what a lookup per header name reads (the first value of each,
    /// trimmed UTF-8), whatever the headers: duplicates, odd names, values that are not UTF-8.
    mod one_pass {
        use super::*;
        use proptest::prelude::*;

        fn by_lookup(headers: &HeaderMap) -> RateLimitSnapshot {
            let mut snap = RateLimitSnapshot::default();
            for (name, [limit, remaining, reset]) in BUCKETS {
                *snap.bucket_mut(name) = BucketSnapshot::from_values(
                    header_str(headers, limit),
                    header_str(headers, remaining),
                    header_str(headers, reset),
                );
            }
            snap
        }

        fn name() -> impl Strategy<Value = String> {
            let bucket = prop::sample::select(vec![
                "requests",
                "tokens",
                "input-tokens",
                "output-tokens",
                "input",
                "",
            ]);
            let field = prop::sample::select(vec!["limit", "remaining", "reset", "resets", ""]);
            let prefix = prop::sample::select(vec![
                "anthropic-ratelimit-",
                "anthropic-ratelimit-input-",
                "x-",
            ]);
            (prefix, bucket, field).prop_map(|(p, b, f)| format!("{p}{b}-{f}"))
        }

        fn value() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                (0u64..2_000_000_000_000).prop_map(|n| n.to_string().into_bytes()),
                Just(b" 50 ".to_vec()),
                Just(b"oops".to_vec()),
                Just(b"2026-01-01T00:00:01Z".to_vec()),
                Just(b"2026-01-01T00:00:01.5+02:00".to_vec()),
                Just(b"\xff50".to_vec()),
                // The byte fast paths: blanks, signs, lengths around 19 digits, a reset seen
                // before with blanks around it.
                Just(b"\t7 ".to_vec()),
                Just(b"+7".to_vec()),
                Just(b"007".to_vec()),
                Just(b"".to_vec()),
                Just(b" ".to_vec()),
                Just(b"9999999999999999999".to_vec()),
                Just(b"18446744073709551615".to_vec()),
                Just(b"18446744073709551616".to_vec()),
                Just(b"1 2".to_vec()),
                Just(b"5\xff".to_vec()),
                Just(b" 2026-01-01T00:00:01Z\t".to_vec()),
                Just(b"2026-01-01T00:00:01Z\xff".to_vec()),
            ]
        }

        proptest! {
            #[test]
            fn matches_a_lookup_per_name(
                entries in prop::collection::vec((name(), value()), 0..24)
            ) {
                let mut map = HeaderMap::new();
                for (name, value) in &entries {
                    let name = http::HeaderName::from_bytes(name.as_bytes()).unwrap();
                    map.append(name, HeaderValue::from_bytes(value).unwrap());
                }
                prop_assert_eq!(RateLimitSnapshot::from_headers(&map), by_lookup(&map));
            }
        }
    }
}
