//! What `tally-tools bench jobs` measured, and its report: markdown tables (per job, per call, phase
//! 2's hot calls, CPU shares, the targets), the same as JSON, and every job's progress
//! over time as an SVG chart.

use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tally::jobs::state::JobState;

use super::drain::{once, Drained, JobCheck};
use super::hammer::{Claims, Posts};
use super::setup::BenchJob;
use super::JobsBenchArgs;
use crate::bench::ingest::cpu::CpuShares;
use crate::plot::{Chart, Series};
use crate::stats::human_us;
use crate::worker_sim::Call;
use tally::table::thousands;

/// Phase 1: the jobs drained by the simulated workers.
pub struct Phase1 {
    /// The jobs.
    pub jobs: Vec<BenchJob>,
    /// Seconds creating them took (rows, streams, consumers, tasks).
    pub create_seconds: f64,
    /// What the drain measured.
    pub drained: Drained,
    /// Each job after the drain.
    pub checks: Vec<JobCheck>,
    /// CPU during the drain.
    pub cpu: CpuShares,
}

/// Phase 2: the hot calls alone.
pub struct Phase2 {
    /// The live jobs claimed against, then drained by the posters.
    pub jobs: Vec<BenchJob>,
    /// The claim pollers.
    pub claims: Claims,
    /// CPU while claiming.
    pub claim_cpu: CpuShares,
    /// The result posters.
    pub posts: Posts,
    /// CPU while posting.
    pub post_cpu: CpuShares,
    /// Each job once ingest finished it.
    pub checks: Vec<JobCheck>,
}

/// Everything measured.
pub struct Report {
    /// Taxa in the taxonomy.
    pub taxa: usize,
    /// Captures seeded.
    pub captures: usize,
    /// Seconds seeding took.
    pub seed_seconds: f64,
    /// Phase 1.
    pub phase1: Phase1,
    /// Phase 2.
    pub phase2: Phase2,
    /// Owners `verify` recomputed at the end.
    pub owners_checked: usize,
    /// Stored counts that differed from `verify`.
    pub differences: usize,
    /// Results ingest saved and acked.
    pub saved: u64,
    /// Results ingest dead-lettered.
    pub dead_lettered: u64,
}

/// The target latency of claims and result POSTs, ms (issue 5).
const TARGET_MS: f64 = 20.0;

/// `(p50, p95, p99, max)` of `h` in µs; `None` when empty.
fn quantiles(h: &Histogram<u64>) -> Option<[f64; 4]> {
    (!h.is_empty()).then(|| {
        [h.value_at_quantile(0.5), h.value_at_quantile(0.95), h.value_at_quantile(0.99), h.max()].map(|v| v as f64)
    })
}

/// The median of `v` (sorted in place).
fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Progress spread (max − min over the jobs, in points of %) after warm-up.
pub struct Fairness {
    /// Seconds of warm-up left out.
    pub warmup: f64,
    /// The largest spread, and when.
    pub max: Option<(f64, f64)>,
    /// The mean spread over the samples after warm-up.
    pub mean: Option<f64>,
}

/// Fairness of phase 1: spread of the samples after `warmup` × the time to the last completion.
pub fn fairness(p: &Phase1, warmup: f64) -> Fairness {
    let end = last_finish(p).unwrap_or_else(|| p.drained.samples.last().map_or(0.0, |s| s.t));
    let from = warmup * end;
    let spreads: Vec<(f64, f64)> = p
        .drained
        .samples
        .iter()
        .filter(|s| s.t >= from && s.t <= end)
        .map(|s| {
            let (lo, hi) = s.percent.iter().fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
            (s.t, (hi - lo).max(0.0))
        })
        .collect();
    let max = spreads.iter().copied().max_by(|a, b| a.1.total_cmp(&b.1));
    let mean = (!spreads.is_empty()).then(|| spreads.iter().map(|s| s.1).sum::<f64>() / spreads.len() as f64);
    Fairness { warmup: from, max, mean }
}

fn last_finish(p: &Phase1) -> Option<f64> {
    p.drained.finished.iter().flatten().copied().max_by(f64::total_cmp)
}

/// Results per second of phase 1: every task's result, over the time to the last completion.
fn throughput(args: &JobsBenchArgs, p: &Phase1) -> Option<f64> {
    last_finish(p).map(|t| (args.jobs * args.images) as f64 / t.max(1e-9))
}

/// Sums of the job consumers' figures: `(delivered, redelivered, ack pending, pending, missing)`.
fn deliveries(checks: &[JobCheck]) -> (u64, usize, usize, u64, usize) {
    checks.iter().fold((0, 0, 0, 0, 0), |(d, r, a, p, m), c| match &c.consumer {
        Some(c) => (d + c.delivered, r + c.num_redelivered, a + c.num_ack_pending, p + c.num_pending, m),
        None => (d, r, a, p, m + 1),
    })
}

fn seconds(v: Option<f64>) -> String {
    v.map_or("—".into(), |v| format!("{v:.2} s"))
}

fn verdict(met: bool, by: String) -> String {
    if met {
        "met".into()
    } else {
        format!("**missed** {by}")
    }
}

/// The p99 verdict of a latency histogram against [`TARGET_MS`].
fn latency_verdict(h: &Histogram<u64>) -> String {
    match quantiles(h) {
        None => "**missed**: no request measured".into(),
        Some([_, _, p99, _]) => {
            let ms = p99 / 1e3;
            verdict(ms <= TARGET_MS, format!("by {:.1}× ({})", ms / TARGET_MS, human_us(p99)))
        }
    }
}

fn latency_cells(h: &Histogram<u64>) -> String {
    match quantiles(h) {
        None => "0 | — | — | — | —".into(),
        Some(q) => format!(
            "{} | {} | {} | {} | {}",
            thousands(h.len()),
            human_us(q[0]),
            human_us(q[1]),
            human_us(q[2]),
            human_us(q[3])
        ),
    }
}

fn cpu_row(name: &str, c: &CpuShares) -> String {
    format!("| {name} | {:.0}% | {:.0}% | {:.0}% | {:.0}% | {:.0}% |\n", c.busy, c.this, c.backends, c.nats, c.others)
}

/// The markdown report.
pub fn render(args: &JobsBenchArgs, r: &Report) -> String {
    let p1 = &r.phase1;
    let p2 = &r.phase2;
    let mut out = format!(
        "`tally-tools bench jobs --jobs {} --images {} --workers {} --delay {} --batch-size {} --pollers {} --claim {} --posters {} --result-posts {} --score-len {} --mean-detections {} -w {} --server-threads {}`\n\n",
        args.jobs, args.images, args.workers, humantime::format_duration(args.delay), args.batch_size, args.pollers, humantime::format_duration(args.claim),
        args.posters, args.result_posts, args.score_len, args.mean_detections, args.ingest_workers, args.server_threads,
    );
    out.push_str(&format!(
        "World: {} taxa, one project (filtered on half the families, score ≥ 0.5), 2 deployments × 5 nights, {} captures, seeded in {:.1} s. Ingest and the worker gateway run in-process on a runtime of their own ({} threads); the simulated workers and pollers share one keep-alive HTTP client. Results: Poisson({}) detections, {} scores per species classification.\n\n",
        thousands(r.taxa as u64), thousands(r.captures as u64), r.seed_seconds, args.server_threads, args.mean_detections, args.score_len,
    ));

    out.push_str(&format!(
        "### Phase 1: {} jobs × {} images, {} simulated workers\n\n{} jobs created in {:.2} s (rows, streams, consumers, {} tasks). Times are seconds after the workers started.\n\n",
        args.jobs, thousands(args.images as u64), args.workers, args.jobs, p1.create_seconds, thousands((args.jobs * args.images) as u64)
    ));
    out.push_str("| job | images | first progress | finished | status | processed | progress = rows | tasks delivered | redelivered |\n");
    out.push_str("|---:|---:|---:|---:|---|---:|---|---:|---:|\n");
    for (i, (job, c)) in p1.jobs.iter().zip(&p1.checks).enumerate() {
        let (delivered, redelivered) = c
            .consumer
            .as_ref()
            .map_or(("stream gone".into(), "—".into()), |q| (thousands(q.delivered), q.num_redelivered.to_string()));
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {delivered} | {redelivered} |\n",
            job.id,
            thousands(job.images.len() as u64),
            seconds(p1.drained.first_progress.get(i).copied().flatten()),
            seconds(p1.drained.finished.get(i).copied().flatten()),
            c.status,
            thousands(c.processed),
            if c.problems.is_empty() { "yes".to_string() } else { format!("**no**: {}", c.problems.join("; ")) },
        ));
    }
    let mut done: Vec<f64> = p1.drained.finished.iter().flatten().copied().collect();
    let (min, max) = (done.iter().copied().reduce(f64::min), done.iter().copied().reduce(f64::max));
    let med = median(&mut done);
    let w = &p1.drained.workers;
    out.push_str(&format!(
        "\nCompletion: min {} / median {} / max {}. Throughput: {} results/s ({} results, first worker start to last completion). The workers: {} claims ({} empty), {} tasks fetched, {} results posted in {} POSTs, {} retries, HTTP errors: {}.\n\n",
        seconds(min), seconds(med), seconds(max),
        throughput(args, p1).map_or("—".into(), |t| thousands(t.round() as u64)),
        thousands((args.jobs * args.images) as u64),
        thousands(w.claims + w.empty_claims), thousands(w.empty_claims), thousands(w.tasks_fetched),
        thousands(w.results_posted), thousands(w.result_posts), w.retries,
        if w.http_errors.is_empty() { "none".to_string() } else { format!("{:?}", w.http_errors) },
    ));
    out.push_str("| call (phase 1) | requests | p50 | p95 | p99 | max |\n|---|---:|---:|---:|---:|---:|\n");
    for call in [Call::Claim, Call::Tasks, Call::Result] {
        out.push_str(&format!("| {} | {} |\n", call.name(), latency_cells(w.latency.of(call))));
    }
    let f = fairness(p1, args.warmup);
    out.push_str(&format!(
        "\nFairness: spread of the jobs' `process` progress (max − min, in points) after the first {:.1} s ({:.0}% of the run): max {}, mean {}. A worker loop drains the job it claimed before it claims again (ADC's loop), so with fewer loops than jobs some jobs wait for a loop to come free.\n",
        f.warmup,
        args.warmup * 100.0,
        f.max.map_or("—".into(), |(t, s)| format!("{s:.1} points at {t:.1} s")),
        f.mean.map_or("—".into(), |m| format!("{m:.1} points")),
    ));

    let c = &p2.claims;
    let p = &p2.posts;
    out.push_str(&format!("\n### Phase 2: the hot calls alone, against {} live jobs\n\n", p2.jobs.len()));
    out.push_str("| call | callers | requests | rate | p50 | p95 | p99 | max | not 2xx |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    let errors = |w: &crate::worker_sim::WorkerReport| {
        w.http_errors.values().sum::<u64>() + w.transport_errors + w.bad_responses
    };
    let claim_h = c.report.latency.of(Call::Claim);
    out.push_str(&format!(
        "| claim (`GET /api/v2/jobs?ids_only=1&incomplete_only=1&pipeline__slug__in=…&dispatch_mode=async_api`) | {} pollers | {} | {}/s | {} | {} |\n",
        args.pollers,
        thousands(claim_h.len()),
        thousands((claim_h.len() as f64 / c.seconds.max(1e-9)).round() as u64),
        latency_cells(claim_h).split_once(" | ").map_or(String::new(), |(_, rest)| rest.to_string()),
        errors(&c.report),
    ));
    for (call, name) in [
        (Call::Result, format!("result POST ({} results, {:.0} kB body)", args.batch_size, p.mean_body_bytes / 1e3)),
        (Call::Tasks, format!("tasks fetch ({})", args.batch_size)),
    ] {
        let h = p.report.latency.of(call);
        out.push_str(&format!(
            "| {name} | {} posters | {} | {}/s | {} | {} |\n",
            args.posters,
            thousands(h.len()),
            thousands((h.len() as f64 / p.seconds.max(1e-9)).round() as u64),
            latency_cells(h).split_once(" | ").map_or(String::new(), |(_, rest)| rest.to_string()),
            errors(&p.report),
        ));
    }
    out.push_str(&format!(
        "\n{} claims returned a job, {} none, over {:.1} s. {} results posted in {:.1} s; ingest saved them while the posters ran. {} tasks fetches found their job drained: a fetch with no task ready waits up to `--gateway-fetch-wait` (0.5 s, Antenna's fetch timeout) for one, which is the tasks row's tail.\n",
        thousands(c.report.claims), thousands(c.report.empty_claims), c.seconds, thousands(p.report.results_posted), p.seconds,
        thousands(p.report.empty_fetches)
    ));
    let (d2, r2, _, _, _) = deliveries(&p2.checks);
    let exact2 = p2.checks.iter().zip(&p2.jobs).filter(|(c, j)| c.clean(j.images.len())).count();
    out.push_str(&format!(
        "Phase 2's jobs: {exact2} of {} SUCCESS with exact progress, every task delivered once and acked ({} deliveries, {r2} redelivered).\n",
        p2.jobs.len(), thousands(d2)
    ));

    out.push_str("\nCPU, % of all the machine's cores (from `/proc`; \"this process\" is the server, the workers and the bench together):\n\n");
    out.push_str("| phase | busy | this process | its Postgres backends | NATS | everything else |\n|---|---:|---:|---:|---:|---:|\n");
    out.push_str(&cpu_row("phase 1 drain", &p1.cpu));
    out.push_str(&cpu_row("phase 2 claims", &p2.claim_cpu));
    out.push_str(&cpu_row("phase 2 result POSTs (and ingest)", &p2.post_cpu));
    out.push_str(&format!(
        "\nIngest saved {} results ({} dead-lettered). `verify`: {} owners recomputed, {} differences.\n",
        thousands(r.saved),
        r.dead_lettered,
        thousands(r.owners_checked as u64),
        r.differences
    ));
    out.push_str(&targets(args, r));
    out
}

/// The targets table of issue 5.
fn targets(args: &JobsBenchArgs, r: &Report) -> String {
    let mut out = String::from("\n| target (issue 5) | measured | |\n|---|---|---|\n");
    let note = |differs: bool, what: String| if differs { format!(" (with {what})") } else { String::new() };
    let claim_h = r.phase2.claims.report.latency.of(Call::Claim);
    let q = |h: &Histogram<u64>| {
        quantiles(h).map_or("no request".into(), |q| {
            format!("p99 {} (p50 {}, p95 {})", human_us(q[2]), human_us(q[0]), human_us(q[1]))
        })
    };
    out.push_str(&format!(
        "| claim p99 ≤ 20 ms with 32 pollers | {} over {} live jobs, {} claims{} | {} |\n",
        q(claim_h),
        r.phase2.jobs.len(),
        thousands(claim_h.len()),
        note(args.pollers != 32, format!("{} pollers", args.pollers)),
        latency_verdict(claim_h),
    ));
    let post_h = r.phase2.posts.report.latency.of(Call::Result);
    out.push_str(&format!(
        "| result POST (24 results) p99 ≤ 20 ms | {}, {} POSTs of {:.0} kB from {} posters{} | {} |\n",
        q(post_h),
        thousands(post_h.len()),
        r.phase2.posts.mean_body_bytes / 1e3,
        args.posters,
        note(args.batch_size != 24, format!("{} results per POST", args.batch_size)),
        latency_verdict(post_h),
    ));
    let p1 = &r.phase1;
    let success = p1.checks.iter().filter(|c| c.status == JobState::Success.as_str()).count();
    let exact = p1.checks.iter().filter(|c| c.problems.is_empty()).count();
    let (delivered, redelivered, ack_pending, pending, missing) = deliveries(&p1.checks);
    let tasks = (args.jobs * args.images) as u64;
    let all_once =
        p1.checks.iter().zip(&p1.jobs).all(|(c, j)| c.consumer.as_ref().is_some_and(|q| once(q, j.images.len())));
    let mut misses = Vec::new();
    if success < p1.jobs.len() {
        misses.push(format!("{} jobs not SUCCESS", p1.jobs.len() - success));
    }
    if exact < p1.jobs.len() {
        misses.push(format!("{} jobs with inexact progress", p1.jobs.len() - exact));
    }
    if !all_once {
        misses.push(format!("{redelivered} redelivered, {delivered} deliveries for {tasks} tasks, {ack_pending} unacked, {pending} undelivered, {missing} consumers gone"));
    }
    if r.differences > 0 {
        misses.push(format!("{} counts differ from verify", r.differences));
    }
    out.push_str(&format!(
        "| 10 jobs × 1,000 images finish with zero redeliveries and exact counts and progress | {success}/{} SUCCESS, {exact}/{} with progress = rows; {} deliveries for {} tasks, {redelivered} redelivered, {ack_pending} unacked; `verify`: {} differences{} | {} |\n",
        p1.jobs.len(), p1.jobs.len(), thousands(delivered), thousands(tasks), r.differences,
        note(args.jobs != 10 || args.images != 1000, format!("{} × {}", args.jobs, args.images)),
        verdict(misses.is_empty(), format!(": {}", misses.join("; "))),
    ));
    out
}

/// The report as JSON (latencies in ms).
pub fn to_json(args: &JobsBenchArgs, r: &Report) -> Value {
    let lat = |h: &Histogram<u64>| match quantiles(h) {
        None => json!({"requests": 0}),
        Some(q) => {
            json!({"requests": h.len(), "p50_ms": q[0] / 1e3, "p95_ms": q[1] / 1e3, "p99_ms": q[2] / 1e3, "max_ms": q[3] / 1e3})
        }
    };
    let job = |(i, (j, c)): (usize, (&BenchJob, &JobCheck)), d: Option<&Drained>| {
        json!({
            "id": j.id, "images": j.images.len(), "status": c.status, "processed": c.processed,
            "problems": c.problems, "consumer": c.consumer,
            "first_progress_s": d.and_then(|d| d.first_progress.get(i).copied().flatten()),
            "finished_s": d.and_then(|d| d.finished.get(i).copied().flatten()),
        })
    };
    let p1 = &r.phase1;
    let p2 = &r.phase2;
    let f = fairness(p1, args.warmup);
    let w = &p1.drained.workers;
    json!({
        "phase1": {
            "jobs": p1.jobs.iter().zip(&p1.checks).enumerate().map(|x| job(x, Some(&p1.drained))).collect::<Vec<_>>(),
            "create_seconds": p1.create_seconds,
            "results_per_second": throughput(args, p1),
            "latency": {"claim": lat(w.latency.of(Call::Claim)), "tasks": lat(w.latency.of(Call::Tasks)), "result": lat(w.latency.of(Call::Result))},
            "workers": w.to_json(),
            "fairness": {"warmup_s": f.warmup, "max_spread": f.max.map(|m| m.1), "max_spread_at_s": f.max.map(|m| m.0), "mean_spread": f.mean},
        },
        "phase2": {
            "jobs": p2.jobs.iter().zip(&p2.checks).enumerate().map(|x| job(x, None)).collect::<Vec<_>>(),
            "pollers": args.pollers,
            "claim": lat(p2.claims.report.latency.of(Call::Claim)),
            "claim_seconds": p2.claims.seconds,
            "posters": args.posters,
            "result": lat(p2.posts.report.latency.of(Call::Result)),
            "tasks": lat(p2.posts.report.latency.of(Call::Tasks)),
            "mean_body_bytes": p2.posts.mean_body_bytes,
        },
        "saved": r.saved,
        "dead_lettered": r.dead_lettered,
        "verify_differences": r.differences,
    })
}

/// Colours of the jobs' lines, reused in order.
const COLORS: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

/// Points per line at most (the chart draws a marker at each).
const MAX_POINTS: usize = 80;

/// Every phase-1 job's `process` progress over time.
pub fn plot(args: &JobsBenchArgs, r: &Report) -> Chart {
    let samples = &r.phase1.drained.samples;
    let step = samples.len().div_ceil(MAX_POINTS).max(1);
    let kept: Vec<_> =
        samples.iter().enumerate().filter(|(i, _)| i % step == 0 || *i + 1 == samples.len()).map(|(_, s)| s).collect();
    let series = r
        .phase1
        .jobs
        .iter()
        .enumerate()
        .map(|(i, job)| Series {
            name: format!("job {}", job.id),
            color: COLORS[i % COLORS.len()],
            points: kept.iter().map(|s| (s.t, s.percent.get(i).copied().unwrap_or(0.0))).collect(),
        })
        .collect();
    Chart {
        title: format!("Progress of {} jobs × {} images, {} simulated workers", args.jobs, args.images, args.workers),
        x_label: "seconds since the workers started".into(),
        y_label: "process stage progress (%)".into(),
        series,
        log_x: false,
        log_y: false,
    }
}
