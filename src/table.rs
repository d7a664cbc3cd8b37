//! Aligned plain-text tables and timestamp formatting for terminal output.

use tally_dataflows::Micros;

/// A table of string cells with a header row, printed with aligned columns.
#[derive(Clone, Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
    /// Columns aligned right (numbers).
    right: Vec<bool>,
}

impl Table {
    /// A table with these column names; columns whose name starts with `>` align right.
    pub fn new(columns: &[&str]) -> Self {
        Table {
            header: columns.iter().map(|c| c.trim_start_matches('>').to_string()).collect(),
            rows: Vec::new(),
            right: columns.iter().map(|c| c.starts_with('>')).collect(),
        }
    }

    /// Appends a row (missing cells print empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Renders with two spaces between columns and a rule under the header.
    pub fn render(&self) -> String {
        let widths: Vec<usize> = (0..self.header.len())
            .map(|c| {
                self.rows
                    .iter()
                    .filter_map(|r| r.get(c))
                    .map(|s| s.chars().count())
                    .chain(std::iter::once(self.header[c].chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let parts: Vec<String> = widths
                .iter()
                .enumerate()
                .map(|(c, w)| {
                    let cell = cells.get(c).map(String::as_str).unwrap_or("");
                    if self.right[c] {
                        format!("{cell:>w$}")
                    } else {
                        format!("{cell:<w$}")
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        let mut out = line(&self.header);
        out.push('\n');
        out.push_str(&widths.iter().map(|w| "─".repeat(*w)).collect::<Vec<_>>().join("  "));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

/// `YYYY-MM-DD HH:MM` of a naive timestamp in microseconds since 1970-01-01 (the raw number
/// of microseconds if it is outside the years ±9999).
pub fn format_micros(micros: Micros) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1_000) {
        Ok(t) => format!("{:04}-{:02}-{:02} {:02}:{:02}", t.year(), u8::from(t.month()), t.day(), t.hour(), t.minute()),
        Err(_) => format!("{micros} µs since 1970"),
    }
}

/// An optional timestamp, or `—`.
pub fn format_opt_micros(micros: Option<Micros>) -> String {
    micros.map(format_micros).unwrap_or_else(|| "—".to_string())
}

/// A number with thousands separators.
pub fn thousands(n: impl Into<i128>) -> String {
    let n = n.into();
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_dates() {
        assert_eq!(format_micros(0), "1970-01-01 00:00");
        assert_eq!(format_micros(20_605 * 86_400 * 1_000_000 + 21 * 3_600_000_000), "2026-06-01 21:00");
        assert_eq!(format_micros(951_782_400 * 1_000_000), "2000-02-29 00:00");
        assert_eq!(format_micros(-1), "1969-12-31 23:59");
        assert_eq!(format_micros(i64::MAX), "9223372036854775807 µs since 1970");
    }

    #[test]
    fn aligns_columns() {
        let mut t = Table::new(&["name", ">n"]);
        t.row(vec!["a".into(), "1".into()]);
        t.row(vec!["long".into(), "1000".into()]);
        assert_eq!(t.render(), "name     n\n────  ────\na        1\nlong  1000\n");
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(-1000), "-1,000");
    }
}
