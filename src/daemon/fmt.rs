//! Small formatting helpers shared by the daemons, the CLI and the
//! dashboard: times and ages as people read them.

/// The current time as [`fmt_unix`] writes it. Audit records take one per
/// request: the text is made once a second per thread and copied after.
pub fn fmt_now() -> String {
    use std::cell::RefCell;
    thread_local! {
        static LAST: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    let now = crate::daemon::control::now_unix();
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != now {
            *last = (now, fmt_unix(now));
        }
        last.1.clone()
    })
}

/// Formats unix seconds as an RFC 3339 UTC time, for messages.
pub fn fmt_unix(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// A duration in seconds as one short unit: `42s`, `5m`, `3h`, `2d`.
pub fn humanize(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// `since <time> (<age> ago)` for a unix time in the past.
pub fn ago(since: u64) -> String {
    let secs = super::control::now_unix().saturating_sub(since);
    format!("since {} ({} ago)", fmt_unix(since), humanize(secs))
}

/// A kube error as words for an answer or a log line: what the member's
/// API server (or whatever answered in its place) said is quoted in it,
/// possibly a whole plain-text page with line breaks and escapes, so it is
/// made printable and cut to 500 characters.
pub fn kube_error(e: &kube::Error) -> String {
    crate::tunnel::printable(&e.to_string(), 500)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cached_current_time_is_the_current_time() {
        let before = crate::daemon::control::now_unix();
        let a = super::fmt_now();
        let b = super::fmt_now();
        let after = crate::daemon::control::now_unix();
        for t in [&a, &b] {
            assert!(
                *t == super::fmt_unix(before) || *t == super::fmt_unix(after),
                "{t} is not between {before} and {after}"
            );
        }
    }

    #[test]
    fn formats_times() {
        assert_eq!(super::fmt_unix(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::fmt_unix(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn humanizes_ages() {
        assert_eq!(super::humanize(42), "42s");
        assert_eq!(super::humanize(300), "5m");
        assert_eq!(super::humanize(3 * 3600), "3h");
        assert_eq!(super::humanize(5 * 86400), "5d");
    }
}
