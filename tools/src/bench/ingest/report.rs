//! The figures of one strategy's run, the ingest stage breakdown scraped from the Prometheus
//! recorder, publish → ack latency percentiles, and the markdown report and plot.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use clap::ValueEnum;
use hdrhistogram::Histogram;
use metrics_exporter_prometheus::PrometheusHandle;

use super::antenna_sql::Comparison;
use super::ceiling::Ceilings;
use super::cpu::CpuShares;
use super::CountStrategy;
use super::{strategy_name, IngestBenchArgs};
use crate::plot::{Chart, Series};
use crate::stats::human_us;
use tally::ingest::daemon::Acked;
use tally::metrics::names;
use tally::table::thousands;

/// What one strategy measured.
#[derive(Debug)]
pub struct StrategyReport {
    /// The strategy.
    pub strategy: CountStrategy,
    /// Results per ingest batch, at most.
    pub batch_size: usize,
    /// Results in the drain run.
    pub drain_messages: usize,
    /// From ingest's start to the drain's last ack.
    pub drain_seconds: f64,
    /// Deferred: the one recompute of every count after the drain.
    pub final_recompute_seconds: Option<f64>,
    /// Rows the drain inserted (detections with null markers, classifications, occurrences).
    pub rows: u64,
    /// Where the drain's time went.
    pub stages: Stages,
    /// Who used the CPUs during the drain.
    pub cpu: CpuShares,
    /// Incremental: loading the dataflow from Postgres before the drain (not timed in it).
    pub bootstrap_seconds: Option<f64>,
    /// The paced runs.
    pub paced: Vec<Paced>,
    /// Whether every stored count equals `verify` after the runs (deferred: not checked).
    pub counts_exact: Option<bool>,
    /// Incremental: the raw COPY rate of the drain's rows.
    pub ceiling: Option<Ceilings>,
    /// Recompute: Antenna's per-result SQL against the strategy's.
    pub antenna: Option<Comparison>,
}

impl StrategyReport {
    /// Wall time of the drain, with the deferred strategy's final recompute.
    pub fn seconds(&self) -> f64 {
        self.drain_seconds + self.final_recompute_seconds.unwrap_or(0.0)
    }

    /// Drain throughput in results per second.
    pub fn messages_per_s(&self) -> f64 {
        self.drain_messages as f64 / self.seconds().max(1e-9)
    }

    /// Drain throughput in rows per second.
    pub fn rows_per_s(&self) -> f64 {
        self.rows as f64 / self.seconds().max(1e-9)
    }
}

/// One paced run.
#[derive(Debug)]
pub struct Paced {
    /// The rate as asked (`--rate`).
    pub spec: super::RateSpec,
    /// Publish rate asked, results/s.
    pub rate: f64,
    /// Publish rate achieved.
    pub achieved: f64,
    /// Publish → ack.
    pub latency: Option<Latency>,
}

/// The stages of `tally_ingest_batch_seconds`, in pipeline order.
const STAGES: [&str; 7] = ["resolve", "decode", "save", "dataflow", "commit", "ack", "total"];

/// Seconds per ingest stage over a run, from the `metrics` recorder.
#[derive(Debug, Clone, Default)]
pub struct Stages {
    /// Summed seconds per stage.
    pub seconds: BTreeMap<&'static str, f64>,
    /// Batches.
    pub batches: f64,
    /// Results in those batches.
    pub messages: f64,
    /// Wall time of the run.
    pub wall: f64,
}

impl Stages {
    /// The totals so far.
    pub fn scrape(handle: &PrometheusHandle) -> Stages {
        let text = handle.render();
        let values: HashMap<&str, f64> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' '))
            .filter_map(|(k, v)| v.parse().ok().map(|v| (k, v)))
            .collect();
        let get = |key: String| values.get(key.as_str()).copied().unwrap_or(0.0);
        let seconds =
            STAGES.iter().map(|s| (*s, get(format!("{}_sum{{stage=\"{s}\"}}", names::INGEST_BATCH_SECONDS)))).collect();
        Stages {
            seconds,
            batches: get(format!("{}_count", names::INGEST_BATCH_MESSAGES)),
            messages: get(format!("{}_sum", names::INGEST_BATCH_MESSAGES)),
            wall: 0.0,
        }
    }

    /// What happened since `before`, over `wall` seconds.
    pub fn since(&self, before: &Stages, wall: f64) -> Stages {
        Stages {
            seconds: self
                .seconds
                .iter()
                .map(|(k, v)| (*k, v - before.seconds.get(k).copied().unwrap_or(0.0)))
                .collect(),
            batches: self.batches - before.batches,
            messages: self.messages - before.messages,
            wall,
        }
    }

    fn get(&self, stage: &str) -> f64 {
        self.seconds.get(stage).copied().unwrap_or(0.0)
    }
}

/// Publish → ack latency percentiles, in microseconds.
#[derive(Debug, Clone)]
pub struct Latency {
    /// Results measured.
    pub samples: u64,
    /// `(quantile, µs)` at the percentiles plotted.
    pub points: Vec<(f64, f64)>,
    /// Highest.
    pub max_us: f64,
}

/// Quantiles reported and plotted.
const QUANTILES: [f64; 6] = [0.5, 0.75, 0.9, 0.95, 0.99, 0.999];

impl Latency {
    /// Latency of every acked result published in `published`.
    pub fn of(published: &HashMap<String, Instant>, acked: &[Acked]) -> Option<Latency> {
        let mut h = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).ok()?;
        for batch in acked {
            for subject in &batch.reply_subjects {
                if let Some(sent) = published.get(subject) {
                    let us = batch.at.saturating_duration_since(*sent).as_micros() as u64;
                    h.saturating_record(us.max(1));
                }
            }
        }
        if h.is_empty() {
            return None;
        }
        Some(Latency {
            samples: h.len(),
            points: QUANTILES.iter().map(|q| (*q, h.value_at_quantile(*q) as f64)).collect(),
            max_us: h.max() as f64,
        })
    }

    /// The `q`-quantile in µs.
    pub fn at(&self, q: f64) -> f64 {
        self.points.iter().find(|(p, _)| (*p - q).abs() < 1e-9).map_or(f64::NAN, |(_, v)| *v)
    }
}

fn rate(r: f64) -> String {
    if r >= 100.0 {
        thousands(r.round() as i64)
    } else {
        format!("{r:.2}")
    }
}

fn find(reports: &[StrategyReport], s: CountStrategy) -> Option<&StrategyReport> {
    reports.iter().find(|r| r.strategy == s)
}

/// The markdown report.
pub fn render(args: &IngestBenchArgs, setup: &str, reports: &[StrategyReport]) -> String {
    let mut out = format!(
        "`tally-tools bench ingest --strategy {} --messages {} --recompute-messages {} --rate {} --paced-seconds {} --preload-detections {} --recompute-samples {} --score-len {} --batch-size {} -w {} --write-method {} --toast-compression {}{}`\n\n{setup}\n\n",
        args.strategy.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
        args.messages,
        args.recompute_messages,
        args.rate.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(","),
        args.paced_seconds,
        args.preload_detections,
        args.recompute_samples,
        args.score_len,
        args.batch_size,
        args.workers,
        args.write_method.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
        args.toast_compression.to_possible_value().map(|v| v.get_name().to_string()).unwrap_or_default(),
        if args.no_pipeline { " --no-pipeline" } else { "" },
    );
    out.push_str("| strategy | batch | drain: results | time | results/s | rows/s | counts = verify |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---|\n");
    for r in reports {
        let time = match r.final_recompute_seconds {
            Some(f) => format!("{:.2} s + {:.2} s recompute", r.drain_seconds, f),
            None => format!("{:.2} s", r.drain_seconds),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {time} | {} | {} | {} |\n",
            strategy_name(r.strategy),
            r.batch_size,
            thousands(r.drain_messages as i64),
            rate(r.messages_per_s()),
            rate(r.rows_per_s()),
            match r.counts_exact {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "after the final recompute",
            },
        ));
    }
    out.push_str(
        "\nPaced runs: results published at a fixed rate while ingest runs; latency from each publish to its ack.\n\n",
    );
    out.push_str("| strategy | rate (achieved) | results | publish→ack p50 | p95 | p99 | max |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|\n");
    for r in reports {
        for p in &r.paced {
            let lat = |q: f64| p.latency.as_ref().map_or("n/a".into(), |l| human_us(l.at(q)));
            let asked = match p.spec {
                super::RateSpec::OfDrain(share) => format!("{:.0}% of drain = {}", share * 100.0, rate(p.rate)),
                super::RateSpec::PerSecond(_) => rate(p.rate),
            };
            out.push_str(&format!(
                "| {} | {} ({}) | {} | {} | {} | {} | {} |\n",
                strategy_name(r.strategy),
                asked,
                rate(p.achieved),
                p.latency.as_ref().map_or(0, |l| l.samples),
                lat(0.5),
                lat(0.95),
                lat(0.99),
                p.latency.as_ref().map_or("n/a".into(), |l| human_us(l.max_us)),
            ));
        }
    }
    out.push_str("\nWhere the drain's time went (`tally_ingest_batch_seconds{stage}`, summed over batches; % of the drain's wall time):\n\n");
    out.push_str(
        "| strategy | batches (mean results) | resolve (objects) | decode | save | dataflow | commit | ack | waiting for messages |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in reports {
        let s = &r.stages;
        let cell = |v: f64| format!("{:.2} s ({:.0}%)", v, 100.0 * v / s.wall.max(1e-9));
        out.push_str(&format!(
            "| {} | {} ({:.0}) | {} | {} | {} | {} | {} | {} | {} |\n",
            strategy_name(r.strategy),
            thousands(s.batches as i64),
            s.messages / s.batches.max(1.0),
            cell(s.get("resolve")),
            cell(s.get("decode")),
            cell(s.get("save")),
            cell(s.get("dataflow")),
            cell(s.get("commit")),
            cell(s.get("ack")),
            cell((s.wall - s.get("total")).max(0.0)),
        ));
    }
    out.push_str("\nCPU during the drain, % of all the machine's cores (from `/proc`):\n\n");
    out.push_str(
        "| strategy | busy | this process (ingest + publisher) | its Postgres backends | NATS | everything else |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---:|\n");
    for r in reports {
        let c = &r.cpu;
        out.push_str(&format!(
            "| {} | {:.0}% | {:.0}% | {:.0}% | {:.0}% | {:.0}% |\n",
            strategy_name(r.strategy),
            c.busy,
            c.this,
            c.backends,
            c.nats,
            c.others
        ));
    }
    if let Some(r) = find(reports, CountStrategy::Recompute) {
        out.push_str(&format!(
            "\n(recompute: `commit` includes `verify` + `fix` of the deployment after each result; {} of {} s.)\n",
            format_args!("{:.1}", r.stages.get("commit")),
            format_args!("{:.1}", r.stages.wall)
        ));
    }
    if let Some(b) = find(reports, CountStrategy::Incremental).and_then(|r| r.bootstrap_seconds) {
        out.push_str(&format!(
            "\nincremental: the dataflow was loaded from Postgres in {b:.2} s before the drain (not in its time).\n"
        ));
    }

    let incremental = find(reports, CountStrategy::Incremental);
    let ceiling = incremental.and_then(|r| r.ceiling.map(|c| (r, c.plain)));
    if let Some((r, c)) = incremental.and_then(|r| r.ceiling.map(|c| (r, c))) {
        out.push_str("\n| the drain's rows | rows | time | rows/s |\n|---|---:|---:|---:|\n");
        for (name, c) in [
            ("raw binary `COPY` into empty tables with the same columns and indexes, one transaction", c.plain),
            ("the same with Antenna's foreign keys (deferred: checked row by row at `COMMIT`)", c.with_foreign_keys),
        ] {
            out.push_str(&format!(
                "| {name} | {} | {:.2} s | {} |\n",
                thousands(c.rows as i64),
                c.seconds,
                thousands(c.rate() as i64)
            ));
        }
        out.push_str(&format!(
            "| tally (incremental drain) | {} | {:.2} s | {} ({:.0}% of `COPY`, {:.0}% of `COPY` with foreign keys) |\n",
            thousands(r.rows as i64),
            r.seconds(),
            thousands(r.rows_per_s() as i64),
            100.0 * r.rows_per_s() / c.plain.rate(),
            100.0 * r.rows_per_s() / c.with_foreign_keys.rate()
        ));
    }

    let recompute = find(reports, CountStrategy::Recompute);
    let antenna = recompute.and_then(|r| r.antenna.as_ref().map(|a| (r, a)));
    // Recompute's drain with Antenna's SQL in place of the commit stage (the transaction's
    // commit, then verify + fix): an estimate that errs in Antenna's favour, since it drops
    // the commit itself.
    let antenna_rate = antenna.map(|(r, a)| {
        let outside_commit = (r.drain_seconds - r.stages.get("commit")).max(0.0);
        r.drain_messages as f64 / (outside_commit + r.drain_messages as f64 * a.antenna.mean_us() / 1e6).max(1e-9)
    });
    if let (Some((r, a)), Some(antenna_rate)) = (antenna, antenna_rate) {
        out.push_str(&format!(
            "\nRecompute per result, {} captures sampled after the recompute run, at {} detections per deployment:\n\n",
            a.samples,
            thousands(args.preload_detections as i64)
        ));
        out.push_str("| recompute after one result | mean | p50 | max |\n|---|---:|---:|---:|\n");
        for (name, s) in [
            ("`verify` scoped to the deployment + `fix` (what `--strategy recompute` runs)", &a.verify_fix),
            ("Antenna's SQL: the image (twice), its event, its deployment (data-model §2.5)", &a.antenna),
        ] {
            out.push_str(&format!(
                "| {name} | {} | {} | {} |\n",
                human_us(s.mean_us()),
                human_us(s.quantile_us(0.5)),
                human_us(s.quantile_us(1.0))
            ));
        }
        out.push_str(&format!(
            "\nWith Antenna's SQL in place of `verify` + `fix`, recompute would ingest {} results/s (measured {}).{}\n",
            rate(antenna_rate),
            rate(r.messages_per_s()),
            if a.disagreements == 0 {
                " Antenna's SQL computed the same counts as those stored.".to_string()
            } else {
                format!(" **Antenna's SQL disagreed with the stored counts {} times.**", a.disagreements)
            }
        ));
    }

    out.push_str("\n| target (issue 4) | measured | |\n|---|---|---|\n");
    let verdict = |met: bool, by: String| if met { "met".to_string() } else { format!("**missed** {by}") };
    if let Some(r) = incremental {
        let v = r.messages_per_s();
        let copy_alone = ceiling.map_or(String::new(), |(_, c)| {
            let rows_per_result = r.rows as f64 / r.drain_messages.max(1) as f64;
            format!("; raw `COPY` of the same rows alone: {} results/s", rate(c.rate() / rows_per_result.max(1e-9)))
        });
        out.push_str(&format!(
            "| ≥ 2,000 results/s sustained | {} results/s (incremental drain of {}{copy_alone}) | {} |\n",
            rate(v),
            thousands(r.drain_messages as i64),
            verdict(v >= 2000.0, format!("by {:.2}×", 2000.0 / v.max(1e-9)))
        ));
        if let Some((_, c)) = ceiling {
            let pct = 100.0 * r.rows_per_s() / c.rate();
            out.push_str(&format!(
                "| ≥ 40% of the raw `COPY` row rate | {pct:.0}% ({} of {} rows/s) | {} |\n",
                thousands(r.rows_per_s() as i64),
                thousands(c.rate() as i64),
                verdict(pct >= 40.0, format!("by {:.2}×", 40.0 / pct.max(1e-9)))
            ));
        }
        let at_target = r.paced.iter().filter(|p| p.rate >= 1000.0).min_by(|a, b| a.rate.total_cmp(&b.rate));
        if let Some(row) = at_target.and_then(|p| p99_row("p99 publish→ack ≤ 100 ms at 1,000 results/s", p)) {
            out.push_str(&row);
        }
    }
    if let (Some(i), Some(r)) = (incremental, recompute) {
        let ratio = i.messages_per_s() / r.messages_per_s().max(1e-12);
        let at = args.preload_detections;
        let mut measured =
            format!("{ratio:.0}× ({} vs {} results/s)", rate(i.messages_per_s()), rate(r.messages_per_s()));
        if let Some(a) = antenna_rate {
            measured.push_str(&format!("; {:.0}× against Antenna's SQL (estimated)", i.messages_per_s() / a));
        }
        let fair = antenna_rate.map_or(ratio, |a| i.messages_per_s() / a);
        let mut cell =
            verdict(ratio >= 100.0 && fair >= 100.0, format!("by {:.1}×", 100.0 / ratio.min(fair).max(1e-9)));
        if at < 100_000 {
            cell.push_str(&format!(" (at {} detections per deployment, not 100k)", thousands(at as i64)));
        }
        out.push_str(&format!(
            "| incremental ≥ 100× recompute throughput at 100k detections per deployment | {measured}, at {} | {cell} |\n",
            thousands(at as i64)
        ));
    }
    if let Some(r) = incremental {
        out.push_str("\n| target (issue 13) | measured | |\n|---|---|---|\n");
        if let Some(c) = r.ceiling {
            let fk = c.with_foreign_keys.rate();
            let pct = 100.0 * r.rows_per_s() / fk.max(1e-9);
            out.push_str(&format!(
                "| drain ≥ 95% of the `COPY`-with-foreign-keys row rate | {pct:.0}% ({} of {} rows/s) | {} |\n",
                thousands(r.rows_per_s() as i64),
                thousands(fk as i64),
                verdict(pct >= 95.0, format!("by {:.2}×", 95.0 / pct.max(1e-9)))
            ));
        }
        let at_80 = r.paced.iter().find(|p| matches!(p.spec, super::RateSpec::OfDrain(s) if (s - 0.8).abs() < 1e-9));
        match at_80.and_then(|p| p99_row("publish→ack p99 ≤ 100 ms at 80% of the sustained rate", p)) {
            Some(row) => out.push_str(&row),
            None => out.push_str(
                "| publish→ack p99 ≤ 100 ms at 80% of the sustained rate | no paced run at `80%` | not measured |\n",
            ),
        }
        out.push_str(&format!(
            "| the CPU, not waiting, is the limit | the machine {:.0}% busy during the drain ({:.0}% tally, {:.0}% its Postgres backends) | {} |\n",
            r.cpu.busy,
            r.cpu.this,
            r.cpu.backends,
            if r.cpu.busy >= 90.0 { "met".to_string() } else { format!("**missed**: {:.0}% idle", 100.0 - r.cpu.busy) }
        ));
    }
    out
}

/// A target row "p99 publish→ack ≤ 100 ms" for paced run `p` (none without latencies).
fn p99_row(target: &str, p: &Paced) -> Option<String> {
    let l = p.latency.as_ref()?;
    let p99 = l.at(0.99) / 1e3;
    let verdict = if p99 <= 100.0 { "met".to_string() } else { format!("**missed** by {:.1}×", p99 / 100.0) };
    Some(format!(
        "| {target} | {} at {} results/s ({} results) | {verdict} |\n",
        human_us(l.at(0.99)),
        rate(p.achieved),
        thousands(l.samples as i64),
    ))
}

/// Publish → ack latency by percentile, one line per strategy (HdrHistogram's axes).
pub fn plot(reports: &[StrategyReport]) -> Chart {
    // A strategy's first paced run in its colour, later ones lighter.
    let color = |s: CountStrategy, first: bool| match (s, first) {
        (CountStrategy::Incremental, true) => "#2471a3",
        (CountStrategy::Incremental, false) => "#7fb3d5",
        (CountStrategy::Recompute, true) => "#c0392b",
        (CountStrategy::Recompute, false) => "#e6a39b",
        (CountStrategy::Deferred, true) => "#7d3c98",
        (CountStrategy::Deferred, false) => "#c39bd3",
    };
    let x = |q: f64| 1.0 / (1.0 - q);
    let mut series: Vec<Series> = Vec::new();
    for r in reports {
        for (i, p) in r.paced.iter().enumerate() {
            let Some(l) = &p.latency else { continue };
            series.push(Series {
                name: format!("{} at {} results/s", strategy_name(r.strategy), rate(p.achieved)),
                color: color(r.strategy, i == 0),
                points: l.points.iter().map(|(q, us)| (x(*q), us / 1e3)).collect(),
            });
        }
    }
    series.push(Series { name: "target: p99 ≤ 100 ms".into(), color: "#999999", points: vec![(x(0.99), 100.0)] });
    Chart {
        title: "Publish → ack latency of a paced run".into(),
        x_label: "percentile as 1/(1 − q): 2 = p50, 10 = p90, 100 = p99, 1k = p99.9".into(),
        y_label: "ms from publish to ack".into(),
        series,
        log_x: true,
        log_y: true,
    }
}
