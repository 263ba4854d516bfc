//! Value syntax for config values: durations ("500ms", "1m30s"), sizes ("64KiB"), rates
//! ("50/s"), and `host[:port]` (shared with the request path, which checks `Host` the same way).
//!
//! Each parser returns a short message on error that says what is wrong and what would be
//! valid; the caller adds the key name and the position.

use std::time::Duration;

use super::Rate;

/// Longest duration accepted anywhere: 365 days. Longer values are surely typos, and the cap
/// keeps `Instant + duration` arithmetic in the timers far away from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// What a valid duration looks like; shared by every duration error.
const DURATION_HINT: &str = r#"expected a number and a unit (ms, s, m, h), e.g. "30s""#;

/// What a valid size looks like; shared by every size error.
const SIZE_HINT: &str =
    r#"expected a number and a unit (B, KiB, MiB, GiB, KB, MB, GB), e.g. "64KiB""#;

/// What a valid rate looks like; shared by every rate error.
const RATE_HINT: &str =
    r#"expected a whole count and a period (s, m, h), e.g. "50/s"; "0/s" means unlimited"#;

/// Most digits accepted before the decimal point; keeps the arithmetic below in `u128`.
const MAX_INT_DIGITS: usize = 20;

/// Digits after the decimal point beyond this are ignored (finer than a nanosecond anyway).
const MAX_FRAC_DIGITS: usize = 18;

/// Nanoseconds per duration unit.
const NANOS_PER_MS: u128 = 1_000_000;
const NANOS_PER_S: u128 = 1_000_000_000;
const NANOS_PER_M: u128 = 60 * NANOS_PER_S;
const NANOS_PER_H: u128 = 3600 * NANOS_PER_S;

/// Parses a duration: one or more `<number><unit>` parts with units `ms`, `s`, `m`, `h`
/// (`"500ms"`, `"30s"`, `"1.5s"`, `"1m30s"`). A bare number is an error: the unit is required.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.is_empty() {
        return Err(format!("empty value; {DURATION_HINT}"));
    }
    if is_plain_number(s) {
        return Err(format!(
            r#"a bare number needs a unit (ms, s, m, h), e.g. "{s}s" or "{s}ms""#
        ));
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return Err(DURATION_HINT.to_string());
        }
        let (number, after) = rest.split_at(num_len);
        let unit_len = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let per_unit = match unit {
            "ms" => NANOS_PER_MS,
            "s" => NANOS_PER_S,
            "m" => NANOS_PER_M,
            "h" => NANOS_PER_H,
            "" if after.is_empty() => {
                return Err(format!(
                    r#"the last part "{number}" has no unit; {DURATION_HINT}"#
                ))
            }
            "" => return Err(DURATION_HINT.to_string()),
            other => return Err(format!(r#"unknown unit "{other}"; {DURATION_HINT}"#)),
        };
        let nanos = scaled(number, per_unit)
            .ok_or_else(|| format!(r#"bad number "{number}"; {DURATION_HINT}"#))?;
        // A fraction finer than a nanosecond (`nanos.fraction_lost`) is simply dropped.
        total = total.saturating_add(nanos.value);
        rest = after;
    }
    if total > MAX_DURATION.as_nanos() {
        return Err("too long: at most 365 days (8760h)".to_string());
    }
    let nanos =
        u64::try_from(total).map_err(|_| "too long: at most 365 days (8760h)".to_string())?;
    Ok(Duration::from_nanos(nanos))
}

/// Parses a size in bytes: `<number><unit>` with units `B`, `KiB`, `MiB`, `GiB` (1024-based)
/// or `KB`, `MB`, `GB` (1000-based), e.g. `"64KiB"`, `"1.5MiB"`. The result must be a whole
/// number of bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    if s.is_empty() {
        return Err(format!("empty value; {SIZE_HINT}"));
    }
    if is_plain_number(s) {
        return Err(format!(
            r#"a bare number needs a unit (B, KiB, MiB, GiB, KB, MB, GB), e.g. "{s}B" or "{s}KiB""#
        ));
    }
    let num_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    if num_len == 0 {
        return Err(SIZE_HINT.to_string());
    }
    let (number, unit) = s.split_at(num_len);
    let per_unit: u128 = match unit {
        "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other if other.chars().all(|c| c.is_ascii_alphabetic()) => {
            return Err(format!(r#"unknown unit "{other}"; {SIZE_HINT}"#));
        }
        _ => return Err(SIZE_HINT.to_string()),
    };
    let bytes =
        scaled(number, per_unit).ok_or_else(|| format!(r#"bad number "{number}"; {SIZE_HINT}"#))?;
    if bytes.fraction_lost {
        return Err(format!(
            "{number}{unit} is not a whole number of bytes; use a smaller unit"
        ));
    }
    u64::try_from(bytes.value).map_err(|_| format!("{s} is too large"))
}

/// Parses a rate `"N/s"`, `"N/m"` or `"N/h"` (N a whole number). `"0/s"` (any period) means
/// unlimited and gives `None`.
pub fn parse_rate(s: &str) -> Result<Option<Rate>, String> {
    let Some((count, period)) = s.split_once('/') else {
        return Err(RATE_HINT.to_string());
    };
    if count.is_empty() || !count.chars().all(|c| c.is_ascii_digit()) {
        return Err(RATE_HINT.to_string());
    }
    let per = match period {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        other => return Err(format!(r#"unknown period "{other}"; {RATE_HINT}"#)),
    };
    let count: u64 = count
        .parse()
        .map_err(|_| format!("count {count} is too large"))?;
    if count == 0 {
        return Ok(None);
    }
    Ok(Some(Rate { count, per }))
}

/// Formats a duration the way the config writes it, for summaries: "30s", "5m", "1m30s",
/// "500ms", "0s".
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_string();
    }
    let mut out = String::new();
    let mut secs = d.as_secs();
    let millis = d.subsec_millis();
    let sub_ms_nanos = d.subsec_nanos() % 1_000_000;
    let hours = secs / 3600;
    secs %= 3600;
    let minutes = secs / 60;
    secs %= 60;
    if hours > 0 {
        out.push_str(&format!("{hours}h"));
    }
    if minutes > 0 {
        out.push_str(&format!("{minutes}m"));
    }
    if secs > 0 {
        out.push_str(&format!("{secs}s"));
    }
    if millis > 0 || sub_ms_nanos > 0 {
        if sub_ms_nanos > 0 {
            let frac = format!("{sub_ms_nanos:06}");
            out.push_str(&format!("{millis}.{}ms", frac.trim_end_matches('0')));
        } else {
            out.push_str(&format!("{millis}ms"));
        }
    }
    out
}

/// Formats a rate the way the config writes it ("50/s"); `None` is "0/s" (unlimited).
pub fn format_rate(rate: Option<Rate>) -> String {
    match rate {
        None => "0/s".to_string(),
        Some(r) => {
            let period = match r.per.as_secs() {
                60 => "m",
                3600 => "h",
                _ => "s",
            };
            format!("{}/{}", r.count, period)
        }
    }
}

/// Formats a byte count with the largest binary unit that divides it exactly ("1MiB", "1500B").
pub fn format_size(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes != 0 && bytes.is_multiple_of(size) {
            return format!("{}{}", bytes / size, unit);
        }
    }
    format!("{bytes}B")
}

/// True for strings that are only a number ("30", "1.5"), i.e. a value missing its unit.
fn is_plain_number(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_digit() || c == '.')
        && s.chars().any(|c| c.is_ascii_digit())
}

/// A decimal number multiplied by a unit, exactly.
struct Scaled {
    value: u128,
    /// True when the product had a fractional part that was dropped.
    fraction_lost: bool,
}

/// `number` ("12", "1.5") times `per_unit`, computed in integers. `None` when `number` is not
/// digits with at most one '.' and digits on both sides of it, or is absurdly long.
fn scaled(number: &str, per_unit: u128) -> Option<Scaled> {
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (number, None),
    };
    if int_part.is_empty()
        || int_part.len() > MAX_INT_DIGITS
        || !int_part.chars().all(|c| c.is_ascii_digit())
    {
        return None;
    }
    let int: u128 = int_part.parse().ok()?;
    let mut value = int.checked_mul(per_unit)?;
    let mut fraction_lost = false;
    if let Some(frac) = frac_part {
        if frac.is_empty() || !frac.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let kept = &frac[..frac.len().min(MAX_FRAC_DIGITS)];
        if kept.len() < frac.len() && frac[kept.len()..].chars().any(|c| c != '0') {
            fraction_lost = true;
        }
        let digits: u128 = kept.parse().ok()?;
        let scale = 10u128.pow(u32::try_from(kept.len()).ok()?);
        let product = digits.checked_mul(per_unit)?;
        if product % scale != 0 {
            fraction_lost = true;
        }
        value = value.checked_add(product / scale)?;
    }
    Some(Scaled {
        value,
        fraction_lost,
    })
}

/// Longest `host[:port]` (RFC 1035 allows 253 characters; brackets and port add a little).
const MAX_HOST_LEN: usize = 255 + 7;

/// A `Host` value or authority: a DNS name, an IPv4 address or a bracketed IPv6 address,
/// then optionally `:` and a port from 1 to 65535. No user info, no empty labels.
pub fn is_valid_host(s: &str) -> bool {
    if s.is_empty() || s.len() > MAX_HOST_LEN {
        return false;
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let Some(end) = rest.find(']') else {
            return false;
        };
        let (literal, after) = (&rest[..end], &rest[end + 1..]);
        if literal.is_empty()
            || !literal
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
            || literal.parse::<std::net::Ipv6Addr>().is_err()
        {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("[v6]", Some(port)),
                None => return false,
            },
        }
    } else {
        match s.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        }
    };
    if let Some(port) = port {
        let valid_port = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !valid_port {
            return false;
        }
    }
    if host == "[v6]" {
        return true;
    }
    // One trailing dot (a fully qualified name) is fine; empty labels elsewhere are not.
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_good() {
        let cases = [
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("2h", Duration::from_secs(7200)),
            ("1.5s", Duration::from_millis(1500)),
            ("0.25m", Duration::from_secs(15)),
            ("1m30s", Duration::from_secs(90)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            ("0s", Duration::ZERO),
            ("0ms", Duration::ZERO),
            ("1.5ms", Duration::from_micros(1500)),
            ("8760h", MAX_DURATION),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn durations_bad() {
        let cases = [
            ("", "empty"),
            ("30", "bare number needs a unit"),
            ("1.5", "bare number needs a unit"),
            ("30 seconds", "expected a number and a unit (ms, s, m, h)"),
            ("30sec", r#"unknown unit "sec""#),
            ("30S", r#"unknown unit "S""#),
            ("5d", r#"unknown unit "d""#),
            ("-5s", "expected a number and a unit"),
            ("1m30", r#"the last part "30" has no unit"#),
            (".5s", "bad number"),
            ("5.s", "bad number"),
            ("1.2.3s", "bad number"),
            (" 5s", "expected a number and a unit"),
            ("5s ", "expected a number and a unit"),
            ("8761h", "too long"),
            ("99999999999999999999999h", "bad number"),
        ];
        for (text, want) in cases {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn sizes_good() {
        let cases = [
            ("1B", 1),
            ("64KiB", 64 * 1024),
            ("1MiB", 1 << 20),
            ("2GiB", 2 << 30),
            ("1KB", 1000),
            ("1MB", 1_000_000),
            ("3GB", 3_000_000_000),
            ("1.5KiB", 1536),
            ("0B", 0),
            ("8589934592GiB", 1 << 63),
        ];
        for (text, want) in cases {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn sizes_bad() {
        let cases = [
            ("", "empty"),
            ("1024", "bare number needs a unit"),
            (
                "1M",
                r#"unknown unit "M"; expected a number and a unit (B, KiB, MiB, GiB, KB, MB, GB)"#,
            ),
            ("1mib", r#"unknown unit "mib""#),
            ("1 MiB", "expected a number and a unit"),
            ("1.5B", "not a whole number of bytes"),
            ("MiB", "expected a number and a unit"),
            ("99999999999GiB", "too large"),
        ];
        for (text, want) in cases {
            let err = parse_size(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn rates() {
        let sec = Duration::from_secs(1);
        assert_eq!(
            parse_rate("50/s"),
            Ok(Some(Rate {
                count: 50,
                per: sec
            }))
        );
        assert_eq!(
            parse_rate("100/m"),
            Ok(Some(Rate {
                count: 100,
                per: Duration::from_secs(60)
            }))
        );
        assert_eq!(
            parse_rate("7/h"),
            Ok(Some(Rate {
                count: 7,
                per: Duration::from_secs(3600)
            }))
        );
        assert_eq!(parse_rate("0/s"), Ok(None));
        assert_eq!(parse_rate("0/h"), Ok(None));
        for (text, want) in [
            ("50", "expected a whole count and a period"),
            ("50/sec", r#"unknown period "sec""#),
            ("1.5/s", "expected a whole count"),
            ("/s", "expected a whole count"),
            ("-1/s", "expected a whole count"),
            ("99999999999999999999999/s", "too large"),
        ] {
            let err = parse_rate(text).expect_err(text);
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn formatting_round_trips() {
        for text in [
            "0s",
            "500ms",
            "30s",
            "5m",
            "1h",
            "1m30s",
            "1h2m3s4ms",
            "1.5ms",
        ] {
            let d = parse_duration(text).expect(text);
            assert_eq!(format_duration(d), text);
        }
        for text in ["1MiB", "64KiB", "1500B", "2GiB"] {
            let n = parse_size(text).expect(text);
            assert_eq!(format_size(n), text);
        }
        for text in ["0/s", "50/s", "3/m", "9/h"] {
            assert_eq!(format_rate(parse_rate(text).expect(text)), text);
        }
    }

    proptest::proptest! {
        #[test]
        fn duration_parser_never_panics(s in "\\PC{0,24}") {
            let _ = parse_duration(&s);
            let _ = parse_size(&s);
            let _ = parse_rate(&s);
        }

        #[test]
        fn whole_seconds_round_trip(secs in 0u64..(365 * 24 * 3600)) {
            let d = Duration::from_secs(secs);
            proptest::prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
