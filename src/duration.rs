//! Duration flags: every time setting is a [`Duration`] written the `humantime` way ("250ms",
//! "5s", "2m", "1h 30m"), and a bare number keeps the unit the flag had before it took
//! durations, so existing command lines and environment variables mean what they meant.

use std::time::Duration;

/// Parses a duration whose bare numbers are seconds, fractions allowed ("0.5" is 500 ms).
pub fn parse_secs(s: &str) -> Result<Duration, String> {
    parse(s, 1.0, "seconds")
}

/// Parses a duration whose bare numbers are milliseconds ("250" is 250 ms).
pub fn parse_millis(s: &str) -> Result<Duration, String> {
    parse(s, 1e-3, "milliseconds")
}

/// Parses a duration whose bare numbers are hours ("24" is a day).
pub fn parse_hours(s: &str) -> Result<Duration, String> {
    parse(s, 3600.0, "hours")
}

/// A bare number times `unit` seconds, or a `humantime` duration.
fn parse(s: &str, unit: f64, unit_name: &str) -> Result<Duration, String> {
    let s = s.trim();
    match s.parse::<f64>() {
        Ok(n) => Duration::try_from_secs_f64(n * unit).map_err(|_| format!("{s:?} is not a number of {unit_name} ≥ 0")),
        Err(_) => humantime::parse_duration(s)
            .map_err(|e| format!("{s:?} is neither a number of {unit_name} nor a duration such as \"5s\": {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_seconds_keep_their_unit_and_accept_fractions() {
        assert_eq!(parse_secs("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_secs(" 0 "), Ok(Duration::ZERO));
        assert_eq!(parse_secs("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_secs("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_secs("1h 30m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn bare_milliseconds_keep_their_unit() {
        assert_eq!(parse_millis("250"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_millis("0"), Ok(Duration::ZERO));
        assert_eq!(parse_millis("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_millis("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_hours("24"), Ok(Duration::from_secs(24 * 3600)));
        assert_eq!(parse_hours("90m"), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn refuses_negatives_and_words() {
        for bad in ["-1", "NaN", "inf", "soon", "", "5 parsecs"] {
            assert!(parse_secs(bad).is_err(), "{bad:?}");
            assert!(parse_millis(bad).is_err(), "{bad:?}");
            assert!(parse_hours(bad).is_err(), "{bad:?}");
        }
    }
}
