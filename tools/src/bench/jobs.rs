//! `tally-tools bench jobs`: issue 5's benchmark. N async jobs of M images each, created as Antenna
//! creates them, are drained by simulated ADC workers over the worker HTTP API while ingest
//! saves the results; every job's progress is sampled throughout; then each job is checked
//! (SUCCESS, progress equal to its rows, every task delivered once and acked) and every count
//! verified. A second phase times the two hot calls alone: 32 pollers claiming against live
//! jobs, and result POSTs of 24 results. The report ends with the targets.
//!
//! Everything runs on a scratch database created next to `--database-url` and dropped
//! afterwards, with a results stream and job ids of the run's own, deleted afterwards, even
//! after an error or Ctrl-C. Ingest and the gateway run in this process ([`server`]).

mod drain;
mod hammer;
mod report;
mod server;
mod setup;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use clap::Args;
use tally_dataflows::taxonomy::Taxonomy;
use tally_dataflows::Id;
use tokio_postgres::NoTls;

use crate::bench::ingest::cpu::CpuSnapshot;
use crate::bench::ingest::{counter_bar, sibling, spinner};
use crate::worker_sim::api::Api;
use crate::worker_sim::{Retry, StopWhen, WorkerSim};
use tally::config::{DbArgs, NatsArgs};
use tally::duration::parse_millis;
use tally::ingest::daemon::IngestArgs;
use tally::store::verify::{self, Scope};
use tally::store::{self, Store};

use report::{Phase1, Phase2, Report};
use server::Server;
use setup::{BenchJob, Model, PIPELINE};

/// Options of `tally-tools bench jobs`.
#[derive(Debug, Args)]
pub struct JobsBenchArgs {
    /// A database on the server to benchmark on; a scratch database `tally_bench_jobs_<pid>` is
    /// created next to it and dropped afterwards.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// NATS server with JetStream; the run's results stream and job streams are deleted
    /// afterwards.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Async jobs created at once (phase 1), and live jobs claimed against (phase 2).
    #[arg(long, default_value_t = 10)]
    pub jobs: usize,
    /// Images per job of phase 1 (one task each).
    #[arg(long, default_value_t = 1000)]
    pub images: usize,
    /// Simulated worker loops (ADC: one per GPU), sharing one keep-alive HTTP client.
    #[arg(long, default_value_t = 8)]
    pub workers: usize,
    /// How long each task takes to "process" (download and inference), per loop (a bare
    /// number is milliseconds).
    #[arg(long, alias = "delay-ms", value_parser = parse_millis, default_value = "0")]
    pub delay: Duration,
    /// Tasks per /tasks call, and results per POST (ADC: 24).
    #[arg(long, default_value_t = 24)]
    pub batch_size: usize,
    /// The sleep of a worker loop after a claim that found no work (ADC: 5 s; a bare number
    /// is milliseconds).
    #[arg(long, alias = "poll-ms", value_parser = parse_millis, default_value = "500ms")]
    pub poll: Duration,
    /// The time between two samples of every job's progress (a bare number is milliseconds).
    #[arg(long, alias = "sample-ms", value_parser = parse_millis, default_value = "250ms")]
    pub sample: Duration,
    /// Fairness is measured after this fraction of the time to the last job's completion.
    #[arg(long, default_value_t = 0.1)]
    pub warmup: f64,
    /// Phase 2: concurrent claim pollers.
    #[arg(long, default_value_t = 32)]
    pub pollers: usize,
    /// Phase 2: how long to claim (`5s`, `500ms`; a bare number is seconds).
    #[arg(long = "claim", alias = "claim-seconds", value_parser = tally::duration::parse_secs, default_value = "5")]
    pub claim: Duration,
    /// Phase 2: concurrent result posters.
    #[arg(long, default_value_t = 8)]
    pub posters: usize,
    /// Phase 2: result POSTs in all (of --batch-size results each), spread over --jobs jobs.
    #[arg(long, default_value_t = 240)]
    pub result_posts: usize,
    /// Mean detections per image (Poisson).
    #[arg(long, default_value_t = 8.0)]
    pub mean_detections: f64,
    /// Length of the species classifier's score and logit vectors in each result.
    /// 1 to 30,000 (ADC's global model has 29,176 classes).
    #[arg(long, default_value_t = 100, value_parser = crate::cli::parse_score_len)]
    pub score_len: usize,
    /// Antenna taxonomy fixture (default: a synthetic 10 families × 10 genera × 20 species).
    #[arg(long)]
    pub taxa: Option<PathBuf>,
    /// Timely worker threads of ingest's count dataflow.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub ingest_workers: usize,
    /// Worker threads of the server's runtime (ingest and the gateway).
    #[arg(long, default_value_t = 2)]
    pub server_threads: usize,
    /// Seed of the synthetic results.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Seconds each phase may take before the run gives up.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Keep the scratch database.
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also draw every job's progress over time (SVG) to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Print JSON instead of markdown.
    #[arg(long)]
    pub json: bool,
}

impl JobsBenchArgs {
    /// Result POSTs per phase-2 job.
    fn posts_per_job(&self) -> usize {
        self.result_posts.div_ceil(self.jobs.max(1)).max(1)
    }
}

/// Runs the benchmark and prints the report.
pub async fn run(args: JobsBenchArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.jobs >= 1 && args.images >= 1, "--jobs and --images must be at least 1");
    anyhow::ensure!(
        2 * args.jobs <= setup::MAX_JOBS,
        "--jobs must be at most {} (job ids stay in the run's range)",
        setup::MAX_JOBS / 2
    );
    for (name, n) in [("--workers", args.workers), ("--batch-size", args.batch_size), ("--pollers", args.pollers)] {
        anyhow::ensure!(n >= 1, "{name} must be at least 1");
    }
    anyhow::ensure!(
        args.posters >= 1 && args.sample >= Duration::from_millis(1),
        "--posters must be at least 1 and --sample at least 1ms"
    );
    anyhow::ensure!((0.0..1.0).contains(&args.warmup), "--warmup must be a fraction from 0 to 1");
    tally::metrics::install();
    let taxonomy = match &args.taxa {
        Some(path) => tally::taxa_file::load(path)?,
        None => Taxonomy::synthetic(10, 10, 20),
    };
    let database = format!("tally_bench_jobs_{}", std::process::id());
    let (admin, connection) = tokio_postgres::connect(&args.database_url, NoTls).await.context("connecting")?;
    tokio::spawn(connection);
    let streams = Mutex::new(Vec::new());
    // Ctrl-C drops the run (and with it the server) and still cleans up.
    let result = tokio::select! {
        r = bench(&args, &admin, &taxonomy, &database, &streams) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    crate::bench::delete_streams(&args.nats_url, &streams).await;
    if !args.keep {
        let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).await;
    }
    let report = result?;
    let markdown = report::render(&args, &report);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report::to_json(&args, &report))?);
    } else {
        print!("{markdown}");
    }
    if let Some(path) = &args.output {
        std::fs::write(path, &markdown).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report::plot(&args, &report).to_svg())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Adds `name` to the streams deleted at the end.
fn register(streams: &Mutex<Vec<String>>, name: String) {
    if let Ok(mut s) = streams.lock() {
        s.push(name);
    }
}

/// Both phases on the scratch database `database`.
async fn bench(
    args: &JobsBenchArgs,
    admin: &tokio_postgres::Client,
    taxonomy: &Taxonomy,
    database: &str,
    streams: &Mutex<Vec<String>>,
) -> anyhow::Result<Report> {
    admin.batch_execute(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).await?;
    admin.batch_execute(&format!("CREATE DATABASE {database}")).await?;
    let url = sibling(&args.database_url, database)?;
    let store = store::connect(&DbArgs::for_url(&url)).await?;
    let per_claim_job = args.posts_per_job() * args.batch_size;
    let total = args.jobs * args.images + args.jobs * per_claim_job;
    let model = Model { mean_detections: args.mean_detections, score_len: args.score_len, seed: args.seed };
    let s = spinner(format!("seeding {total} captures"));
    let seeded = setup::seed_world(&store, taxonomy, total, &model).await?;
    s.finish_and_clear();

    let pid = std::process::id();
    let mut nats_args = NatsArgs::for_url(&args.nats_url);
    nats_args.results_stream = format!("TALLY_BENCH_JOBS_{pid}");
    nats_args.results_subject_prefix = format!("benchjobs{pid}.results");
    register(streams, nats_args.results_stream.clone());
    let first = setup::first_job_id();
    for n in 0..2 * args.jobs as i64 {
        register(streams, tally::jobs::stream_name(first + n));
    }

    let s = spinner("starting ingest (bootstrap from Postgres) and the worker gateway".into());
    let ingest = IngestArgs { workers: args.ingest_workers, ..IngestArgs::default() };
    let server = Server::start(&url, &nats_args, ingest, args.server_threads).await?;
    s.finish_and_clear();
    let js = jetstream::new(nats_args.connect().await?);
    let base_url = format!("http://{}", server.addr);

    // Phase 1.
    let (phase1_images, claim_images) = seeded.images.split_at(args.jobs * args.images);
    let bar = counter_bar(args.jobs as u64, "jobs");
    let sets = phase1_images.chunks(args.images).map(<[Id]>::to_vec).collect();
    let (jobs, create_seconds) = setup::create_jobs(&store, &js, sets, first, "bench", &bar).await?;
    bar.finish_and_clear();
    let sim = WorkerSim {
        base_url: base_url.clone(),
        token: seeded.token.clone(),
        pipelines: vec![PIPELINE.into()],
        concurrency: args.workers,
        batch_size: args.batch_size,
        post_batch: args.batch_size,
        delay: args.delay,
        poll_interval: args.poll,
        stop: StopWhen::default(),
        results: seeded.factory.clone(),
        retry: Retry::default(),
    };
    let timeout = Duration::from_secs(args.timeout);
    let bar = counter_bar((args.jobs * args.images) as u64, "drain");
    let cpu = CpuSnapshot::take(database);
    let drained = drain::drain(&store, &sim, &jobs, args.sample, timeout, &bar)
        .await
        .with_context(|| format!("phase 1 (ingest {})", server.state()))?;
    let drain_cpu = cpu.shares(&CpuSnapshot::take(database));
    bar.finish_and_clear();
    let checks = check_all(&store, &js, &jobs).await?;
    let phase1 = Phase1 { jobs, create_seconds, drained, checks, cpu: drain_cpu };

    // Phase 2.
    let bar = counter_bar(args.jobs as u64, "jobs");
    let sets = claim_images.chunks(per_claim_job).take(args.jobs).map(<[Id]>::to_vec).collect();
    let (claim_jobs, _) = setup::create_jobs(&store, &js, sets, first + args.jobs as i64, "claim", &bar).await?;
    bar.finish_and_clear();
    let api = Api::new(&base_url, &seeded.token, &[PIPELINE.to_string()], Retry::default())?;
    let bar = spinner(format!("{} pollers claiming for {:?}", args.pollers, args.claim));
    let cpu = CpuSnapshot::take(database);
    let claims = hammer::claims(&api, args.pollers, args.claim.max(Duration::from_millis(100)), &bar).await;
    let claim_cpu = cpu.shares(&CpuSnapshot::take(database));
    bar.finish_and_clear();
    let bar = counter_bar((args.jobs * per_claim_job) as u64, "results");
    let cpu = CpuSnapshot::take(database);
    let posts = hammer::posts(&api, &seeded.factory, &claim_jobs, args.posters, args.batch_size, &bar).await;
    let post_cpu = cpu.shares(&CpuSnapshot::take(database));
    bar.finish_and_clear();
    let ids: Vec<i64> = claim_jobs.iter().map(|j| j.id).collect();
    let s = spinner("waiting for ingest to finish phase 2's jobs".into());
    drain::wait_final(&store, &ids, timeout).await.with_context(|| format!("phase 2 (ingest {})", server.state()))?;
    s.finish_and_clear();
    let claim_checks = check_all(&store, &js, &claim_jobs).await?;
    let phase2 = Phase2 { jobs: claim_jobs, claims, claim_cpu, posts, post_cpu, checks: claim_checks };

    let s = spinner("verify: every stored count against SQL".into());
    let v = verify::verify(&store, Scope::default()).await?;
    s.finish_and_clear();
    let dead_lettered = server.dead_lettered.load(std::sync::atomic::Ordering::Relaxed);
    let saved = server.saved();
    server.stop().await;
    store.pool.close();
    Ok(Report {
        taxa: seeded.taxa,
        captures: seeded.images.len(),
        seed_seconds: seeded.seconds,
        phase1,
        phase2,
        owners_checked: v.expected.images.len() + v.expected.events.len() + v.expected.deployments.len(),
        differences: v.differences.len(),
        saved,
        dead_lettered,
    })
}

/// Checks every job of `jobs` (see [`drain::check`]).
async fn check_all(store: &Store, js: &jetstream::Context, jobs: &[BenchJob]) -> anyhow::Result<Vec<drain::JobCheck>> {
    let mut checks = Vec::with_capacity(jobs.len());
    for job in jobs {
        checks.push(drain::check(store, js, job).await?);
    }
    Ok(checks)
}
