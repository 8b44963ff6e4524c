//! UTC calendar arithmetic for budgets and reports (days and months since the Unix epoch),
//! by Howard Hinnant's `days_from_civil` / `civil_from_days` algorithms
//! (<https://howardhinnant.github.io/date_algorithms.html>).

/// The time now, ms since the Unix epoch (0 before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `(year, month 1-12, day 1-31)` of a day number (days since 1970-01-01).
pub fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

/// The day number (days since 1970-01-01) of a civil date.
pub fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD` of a time in unix seconds.
pub fn date(unix_s: i64) -> String {
    let (y, m, d) = civil_from_days(unix_s.div_euclid(86_400));
    format!("{y:04}-{m:02}-{d:02}")
}

const DAY_MS: i64 = 86_400_000;

/// Start of the UTC day holding `ms`, and of the next, in ms since the epoch.
pub fn day_bounds(ms: i64) -> (i64, i64) {
    let start = ms.div_euclid(DAY_MS) * DAY_MS;
    (start, start + DAY_MS)
}

/// Start of the UTC calendar month holding `ms`, and of the next, in ms since the epoch.
pub fn month_bounds(ms: i64) -> (i64, i64) {
    let (y, m, _) = civil_from_days(ms.div_euclid(DAY_MS));
    let start = days_from_civil(y, m, 1) * DAY_MS;
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (start, days_from_civil(ny, nm, 1) * DAY_MS)
}

/// A date (`2026-12-31`, its midnight UTC) or date and time (`2026-12-31T12:00:00Z`, UTC)
/// as unix seconds.
///
/// # Errors
/// A message naming the expected forms.
pub fn parse_date(s: &str) -> Result<i64, String> {
    let bad = || format!("bad date {s:?}: use YYYY-MM-DD or YYYY-MM-DDTHH:MM:SSZ (UTC)");
    let s = s.trim();
    let (d, t) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t.trim_end_matches('Z'))),
        None => (s, None),
    };
    let p: Vec<&str> = d.split('-').collect();
    let [y, m, dd] = p[..] else { return Err(bad()) };
    let (y, m, dd): (i64, u32, u32) = (
        y.parse().map_err(|_| bad())?,
        m.parse().map_err(|_| bad())?,
        dd.parse().map_err(|_| bad())?,
    );
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || dd == 0 || dd > days_in_month(y, m)
    {
        return Err(bad());
    }
    let mut secs = days_from_civil(y, m, dd) * 86_400;
    if let Some(t) = t {
        let q: Vec<&str> = t.split(':').collect();
        let [h, mi, se] = q[..] else {
            return Err(bad());
        };
        let (h, mi, se): (i64, i64, i64) = (
            h.parse().map_err(|_| bad())?,
            mi.parse().map_err(|_| bad())?,
            se.parse().map_err(|_| bad())?,
        );
        if !(0..24).contains(&h) || !(0..60).contains(&mi) || !(0..60).contains(&se) {
            return Err(bad());
        }
        secs += h * 3600 + mi * 60 + se;
    }
    Ok(secs)
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        4 | 6 | 9 | 11 => 30,
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        _ => 31,
    }
}

/// A start time for reports: a date (see [`parse_date`]) or a span back from `now_ms`
/// (`30s`, `90m`, `24h`, `7d`), as ms since the epoch.
///
/// # Errors
/// A message naming the expected forms.
pub fn parse_since(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    let span = |unit: i64, n: &str| -> Option<i64> {
        n.parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(|n| now_ms - n.saturating_mul(unit))
    };
    let r = if let Some(n) = s.strip_suffix('d') {
        span(DAY_MS, n)
    } else if let Some(n) = s.strip_suffix('h') {
        span(3_600_000, n)
    } else if let Some(n) = s.strip_suffix('m') {
        span(60_000, n)
    } else if let Some(n) = s.strip_suffix('s') {
        span(1000, n)
    } else {
        None
    };
    match r {
        Some(t) => Ok(t),
        None => parse_date(s)
            .map(|secs| secs * 1000)
            .map_err(|_| format!("bad time {s:?}: use a date (2026-11-30) or a span (24h, 7d)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400), "2000-02-29");
        for d in [-1000, 0, 59, 60, 11_016, 20_000, 20_787] {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
        // 2026-11-30 12:00 UTC
        let t = parse_date("2026-11-30T12:00:00Z").unwrap() * 1000;
        assert_eq!(date(t / 1000), "2026-11-30");
        assert_eq!(
            month_bounds(t),
            (
                parse_date("2026-11-01").unwrap() * 1000,
                parse_date("2026-12-01").unwrap() * 1000
            )
        );
        let dec = parse_date("2026-12-15").unwrap() * 1000;
        assert_eq!(
            month_bounds(dec).1,
            parse_date("2027-01-01").unwrap() * 1000
        );
        assert_eq!(day_bounds(t).0, parse_date("2026-11-30").unwrap() * 1000);
        assert!(parse_date("2026-02-29").is_err());
        assert!(parse_date("2028-02-29").is_ok());
        assert!(parse_date("2026-13-01").is_err() && parse_date("tomorrow").is_err());
        assert_eq!(parse_since("24h", t).unwrap(), t - 86_400_000);
        assert_eq!(parse_since("7d", t).unwrap(), t - 7 * 86_400_000);
        assert!(parse_since("-3d", t).is_err());
        assert_eq!(parse_since("30s", t).unwrap(), t - 30_000);
    }
}
