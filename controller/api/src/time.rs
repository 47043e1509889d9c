//! Times as the reference's Go code writes them, without a time library.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// `at` in RFC 3339 UTC to the second, as Go's `time.RFC3339`.
pub fn rfc3339(at: SystemTime) -> String {
    let mut out = String::with_capacity(20);
    write_rfc3339(&mut out, at, false);
    out
}

/// Appends `at` in RFC 3339 UTC: `2026-12-02T20:51:21Z`, or with `fraction` Go's
/// `time.RFC3339Nano` (`2026-12-02T20:51:21.12345Z`, trailing zeros trimmed, none when whole).
pub fn write_rfc3339(out: &mut String, at: SystemTime, fraction: bool) {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    );
    let mut nanos = since.subsec_nanos();
    if fraction && nanos != 0 {
        let mut digits = 9;
        while nanos.is_multiple_of(10) {
            nanos /= 10;
            digits -= 1;
        }
        let _ = write!(out, ".{nanos:0digits$}");
    }
    out.push('Z');
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(secs, nanos)
    }

    #[test]
    fn dates_across_leap_years_and_centuries() {
        let day = |d: u64| {
            let mut s = String::new();
            write_rfc3339(&mut s, at(d * 86_400 + 3661, 0), true);
            s
        };
        assert_eq!(day(11_016), "2000-02-29T01:01:01Z");
        assert_eq!(day(11_017), "2000-03-01T01:01:01Z");
        assert_eq!(day(47_540), "2100-02-28T01:01:01Z");
        assert_eq!(day(47_541), "2100-03-01T01:01:01Z");
        assert_eq!(day(20_818), "2026-12-31T01:01:01Z");
        assert_eq!(day(20_819), "2027-01-01T01:01:01Z");
    }

    #[test]
    fn whole_seconds_and_fractions() {
        assert_eq!(
            rfc3339(at(1_781_516_818, 999_000_000)),
            "2026-06-15T09:46:58Z"
        );
        let mut s = String::new();
        write_rfc3339(&mut s, at(1_781_516_818, 999_000_000), true);
        assert_eq!(s, "2026-06-15T09:46:58.999Z");
    }
}
