//! Size flags: a bare number of bytes, or a number with a unit, binary (`KiB`, `MiB`, `GiB`)
//! or decimal (`kB`, `MB`, `GB`), fractions allowed ("64MiB", "1.5 GiB", "500000").

/// Parses a size in bytes.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let scale: f64 = match unit {
        "" | "B" => 1.0,
        "KiB" => 1024.0,
        "MiB" => 1024.0 * 1024.0,
        "GiB" => 1024.0 * 1024.0 * 1024.0,
        "kB" | "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (bytes, KiB, MiB, GiB, kB, MB or GB)")),
    };
    let n: f64 = number.parse().map_err(|_| format!("{s:?} is not a size such as \"64MiB\" or \"500000\""))?;
    let bytes = (n * scale).round();
    if !(0.0..=usize::MAX as f64).contains(&bytes) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes as usize)
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn bare_numbers_are_bytes_and_units_scale() {
        assert_eq!(parse_bytes("500000"), Ok(500_000));
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes(" 1.5 GiB "), Ok(3 << 29));
        assert_eq!(parse_bytes("256KiB"), Ok(256 << 10));
        assert_eq!(parse_bytes("2MB"), Ok(2_000_000));
        assert_eq!(parse_bytes("3kB"), Ok(3_000));
        assert_eq!(parse_bytes("0"), Ok(0));
    }

    #[test]
    fn refuses_what_is_not_a_size() {
        for bad in ["", "MiB", "-1", "64 parsecs", "1.2.3MiB", "64mib"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }
}
