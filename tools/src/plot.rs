//! Minimal SVG line charts for benchmark reports (no plotting dependency: a few series of a
//! few points each, on linear or log axes).

use std::fmt::Write;

/// One line of a chart.
#[derive(Clone, Debug)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// CSS colour.
    pub color: &'static str,
    /// `(x, y)` points, in order of x.
    pub points: Vec<(f64, f64)>,
}

/// A chart: title, axis labels, series, and whether each axis is logarithmic.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Title above the plot.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
    /// Log-scale x.
    pub log_x: bool,
    /// Log-scale y.
    pub log_y: bool,
}

const W: f64 = 720.0;
const H: f64 = 440.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;

impl Chart {
    /// Renders the chart as a standalone SVG document.
    pub fn to_svg(&self) -> String {
        let points: Vec<(f64, f64)> = self.series.iter().flat_map(|s| s.points.iter().copied()).collect();
        let axis = |values: Vec<f64>, log: bool| {
            let (lo, hi) = values.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            if log {
                let lo = lo.max(1e-12).log10().floor();
                let hi = hi.max(1e-12).log10().ceil().max(lo + 1.0);
                (lo, hi)
            } else {
                (0.0_f64.min(lo), if hi > 0.0 { hi * 1.1 } else { 1.0 })
            }
        };
        let (x0, x1) = axis(points.iter().map(|p| p.0).collect(), self.log_x);
        let (y0, y1) = axis(points.iter().map(|p| p.1).collect(), self.log_y);
        let tx = |v: f64| if self.log_x { v.max(1e-12).log10() } else { v };
        let ty = |v: f64| if self.log_y { v.max(1e-12).log10() } else { v };
        let px = |v: f64| LEFT + (tx(v) - x0) / (x1 - x0) * (W - LEFT - RIGHT);
        let py = |v: f64| H - BOTTOM - (ty(v) - y0) / (y1 - y0) * (H - TOP - BOTTOM);

        let mut svg = String::new();
        let _ = write!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"#
        );
        let _ = write!(
            svg,
            r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
            W / 2.0,
            esc(&self.title)
        );
        // Grid and tick labels at each decade (log) or at round steps (linear: 1, 2 or 5 times a
        // power of ten, about five of them).
        let ticks = |lo: f64, hi: f64, log: bool| -> Vec<f64> {
            if log {
                (lo as i32..=hi as i32).map(|e| 10f64.powi(e)).collect()
            } else {
                let raw = (hi - lo) / 5.0;
                let magnitude = 10f64.powf(raw.log10().floor());
                let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| *s >= raw).unwrap_or(raw);
                if !(step.is_finite() && step > 0.0) {
                    return vec![lo, hi];
                }
                let first = (lo / step).ceil() as i64;
                (first..).map(|i| i as f64 * step).take_while(|v| *v <= hi + step * 1e-9).collect()
            }
        };
        for v in ticks(x0, x1, self.log_x) {
            let x = px(v);
            let _ = write!(
                svg,
                r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{}" stroke="#ddd"/><text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"##,
                H - BOTTOM,
                H - BOTTOM + 18.0,
                short(v)
            );
        }
        for v in ticks(y0, y1, self.log_y) {
            let y = py(v);
            let _ = write!(
                svg,
                r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
                W - RIGHT,
                LEFT - 6.0,
                y + 4.0,
                short(v)
            );
        }
        let _ = write!(
            svg,
            r##"<rect x="{LEFT}" y="{TOP}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
            W - LEFT - RIGHT,
            H - TOP - BOTTOM
        );
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            H - 25.0,
            esc(&self.x_label)
        );
        let _ = write!(
            svg,
            r#"<text transform="translate(22,{}) rotate(-90)" text-anchor="middle">{}</text>"#,
            (TOP + H - BOTTOM) / 2.0,
            esc(&self.y_label)
        );
        for (i, s) in self.series.iter().enumerate() {
            let path: Vec<String> = s.points.iter().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
            let _ = write!(
                svg,
                r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2.5"/>"#,
                path.join(" "),
                s.color
            );
            for (x, y) in &s.points {
                let _ = write!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="4" fill="{}"/>"#, px(*x), py(*y), s.color);
            }
            let ly = TOP + 18.0 + 18.0 * i as f64;
            let _ = write!(
                svg,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
                LEFT + 12.0,
                LEFT + 36.0,
                s.color,
                LEFT + 42.0,
                ly + 4.0,
                esc(&s.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// `1k`, `10M`, `2.5`, … for tick labels.
fn short(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_series_and_log_ticks() {
        let chart = Chart {
            title: "a <b>".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            series: vec![Series { name: "s".into(), color: "red", points: vec![(10.0, 1.0), (1000.0, 100.0)] }],
            log_x: true,
            log_y: true,
        };
        let svg = chart.to_svg();
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>\n"));
        assert!(svg.contains("a &lt;b&gt;"));
        assert!(svg.contains(">1k<"), "{svg}");
        assert_eq!(svg.matches("<circle").count(), 2);
    }

    #[test]
    fn linear_ticks_are_round() {
        let chart = Chart {
            title: "t".into(),
            x_label: "processes".into(),
            y_label: "bytes".into(),
            series: vec![Series { name: "s".into(), color: "red", points: vec![(1.0, 293.0), (4.0, 92.0)] }],
            log_x: false,
            log_y: false,
        };
        let svg = chart.to_svg();
        for label in [">0<", ">1<", ">2<", ">3<", ">4<", ">100<", ">200<", ">300<"] {
            assert!(svg.contains(label), "{label} missing: {svg}");
        }
        assert!(!svg.contains(">0.88<"), "{svg}");
    }
}
