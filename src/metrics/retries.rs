//! Reads the retry layer's [`RetryInfo`] response extension.

use crate::retry::RetryInfo;

use super::names;

/// Attempts made for a response and the reason label of its retries, when the retry layer
/// ran.
pub(crate) fn retries(extensions: &http::Extensions) -> Option<(u32, &'static str)> {
    let info = extensions.get::<RetryInfo>()?;
    Some((info.attempts(), reason(info.last_failure_status())))
}

/// The `reason` label of a failed attempt's status.
pub(crate) fn reason(status: Option<http::StatusCode>) -> &'static str {
    match status.map(|s| s.as_u16()) {
        Some(429) => names::REASON_RATE_LIMITED,
        Some(529) => names::REASON_OVERLOADED,
        Some(408 | 504) => names::REASON_TIMEOUT,
        Some(409) => names::REASON_CONFLICT,
        Some(500..=599) => names::REASON_SERVER_ERROR,
        _ => names::REASON_OTHER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn reasons() {
        assert_eq!(reason(Some(StatusCode::TOO_MANY_REQUESTS)), "rate_limited");
        assert_eq!(reason(StatusCode::from_u16(529).ok()), "overloaded");
        assert_eq!(reason(Some(StatusCode::GATEWAY_TIMEOUT)), "timeout");
        assert_eq!(reason(Some(StatusCode::CONFLICT)), "conflict");
        assert_eq!(reason(Some(StatusCode::BAD_GATEWAY)), "server_error");
        assert_eq!(reason(None), "other");
        assert!(retries(&http::Extensions::new()).is_none());
    }
}
