//! Request deadlines, in one place: the destination policy's timeout (`remora.io/timeout`) and
//! the caller's own gRPC deadline (`grpc-timeout`), whichever ends first. A request whose
//! response head has not come by then is answered `504`, or `grpc-status: 4`
//! (DEADLINE_EXCEEDED) for gRPC. `grpc-timeout` is passed on as sent, so the server knows the
//! caller's deadline too.

use std::time::Duration;

use http::HeaderMap;

/// The longest `grpc-timeout` value: 8 digits (gRPC's HTTP/2 protocol spec).
const MAX_DIGITS: usize = 8;

/// The `grpc-timeout` header's duration: `TimeoutValue TimeoutUnit`, up to 8 digits and one
/// of `H M S m u n`. A malformed value is ignored (the server will judge it).
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > MAX_DIGITS || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long a request may wait for its response head: the policy's timeout and, for gRPC, the
/// caller's `grpc-timeout`, whichever is shorter; `None` for no limit.
pub(crate) fn deadline(
    policy: Option<Duration>,
    headers: &HeaderMap,
    grpc: bool,
) -> Option<Duration> {
    let caller = grpc.then(|| grpc_timeout(headers)).flatten();
    match (policy, caller) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", v.parse().unwrap());
        h
    }

    #[test]
    fn grpc_timeouts_parse_by_unit_and_bad_ones_are_ignored() {
        for (v, want) in [
            ("1H", Some(Duration::from_secs(3600))),
            ("2M", Some(Duration::from_secs(120))),
            ("3S", Some(Duration::from_secs(3))),
            ("250m", Some(Duration::from_millis(250))),
            ("99999999u", Some(Duration::from_micros(99_999_999))),
            ("5n", Some(Duration::from_nanos(5))),
            ("100", None),
            ("m", None),
            ("123456789m", None),
            ("-5m", None),
            ("5x", None),
        ] {
            assert_eq!(grpc_timeout(&with(v)), want, "{v}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn the_shorter_of_policy_and_caller_wins() {
        let s = Duration::from_secs;
        assert_eq!(deadline(None, &HeaderMap::new(), true), None);
        assert_eq!(deadline(Some(s(2)), &HeaderMap::new(), true), Some(s(2)));
        assert_eq!(deadline(Some(s(2)), &with("1S"), true), Some(s(1)));
        assert_eq!(deadline(Some(s(1)), &with("5S"), true), Some(s(1)));
        assert_eq!(deadline(None, &with("5S"), true), Some(s(5)));
        // Not gRPC: the header means nothing.
        assert_eq!(deadline(None, &with("5S"), false), None);
    }
}
