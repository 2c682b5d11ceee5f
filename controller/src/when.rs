//! Times as people read them: "in 29s", "3m ago", or the local time in RFC 3339.

use time::{OffsetDateTime, UtcOffset};

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

/// A duration in whole seconds, coarsened to its two largest units: "45s", "3m", "2h5m",
/// "3d4h".
pub fn span(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) if s == 0 => format!("{m}m"),
        (0, 0, _) => format!("{m}m{s}s"),
        (0, _, 0) => format!("{h}h"),
        (0, _, _) => format!("{h}h{m}m"),
        (_, 0, _) => format!("{d}d"),
        _ => format!("{d}d{h}h"),
    }
}

/// `at` (Unix milliseconds) from `now`: "in 29s", "3m ago", "now"; "-" for 0 (never).
pub fn relative(at: u64, now: u64) -> String {
    if at == 0 {
        return "-".into();
    }
    if at > now {
        // A deadline is read rounded up: "in 30s" until the 30th second has begun.
        format!("in {}", span((at - now).div_ceil(1000)))
    } else if now - at < 1000 {
        "now".into()
    } else {
        let ago = (now - at) / 1000;
        // Past the first minute, whole minutes (and hours) are precise enough.
        let ago = if ago >= 60 { ago - ago % 60 } else { ago };
        format!("{} ago", span(ago))
    }
}

/// `at` (Unix milliseconds) as local RFC 3339 to the second, e.g.
/// "2026-11-25T22:31:05+01:00"; "-" for 0.
pub fn local(at: u64) -> String {
    if at == 0 {
        return "-".into();
    }
    let secs = (at / 1000) as i64;
    let Ok(utc) = OffsetDateTime::from_unix_timestamp(secs) else {
        return at.to_string();
    };
    let t = utc.to_offset(local_offset(secs));
    let off = t.offset().whole_seconds();
    let (sign, off) = if off < 0 { ('-', -off) } else { ('+', off) };
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{sign}{:02}:{:02}",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        off / 3600,
        off / 60 % 60
    )
}

/// The local UTC offset at `secs` from the C library (TZ, /etc/localtime); the `time`
/// crate will not read it in a multi-threaded process.
fn local_offset(secs: i64) -> UtcOffset {
    let t = secs as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which lives across the call.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return UtcOffset::UTC;
    }
    UtcOffset::from_whole_seconds(tm.tm_gmtoff as i32).unwrap_or(UtcOffset::UTC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_relative_times() {
        assert_eq!(span(45), "45s");
        assert_eq!(span(180), "3m");
        assert_eq!(span(192), "3m12s");
        assert_eq!(span(7500), "2h5m");
        assert_eq!(span(3 * 86_400 + 4 * 3600 + 5), "3d4h");
        let now = 1_000_000_000;
        assert_eq!(relative(now + 29_400, now), "in 30s");
        assert_eq!(relative(now - 185_000, now), "3m ago");
        assert_eq!(relative(now - 12_000, now), "12s ago");
        assert_eq!(relative(now - 200, now), "now");
        assert_eq!(relative(0, now), "-");
    }
}
