//! `tally-tools bench ingest`: ingest end to end through NATS JetStream and Postgres, in-process,
//! for each count strategy on a database and stream of its own; throughput of a drain,
//! publish → ack latency of a paced run, the raw `COPY` rate of the same rows, and the
//! issue's targets (issue 4, "Benchmark: `tally-tools bench ingest`").
//!
//! One scratch database is seeded as a template (a world over a real taxonomy, optionally
//! big deployments, the pipeline, exact counts); each strategy runs on a copy of it.

mod antenna_sql;
mod ceiling;
pub(crate) mod cpu;
pub(crate) mod publish;
mod report;
mod strategy;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tally_dataflows::taxonomy::{Rank, Taxonomy};
use tally_dataflows::{Engine, Id};
use tokio::sync::mpsc;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use crate::synth::jobs::{AsyncJob, Task, ANTENNA_MAX_ACK_PENDING};
use crate::synth::preload::preload;
use crate::synth::results::{ResultFactory, ResultKeys, World, WorldConfig};
use tally::config::{DbArgs, NatsArgs, ToastCompression};
use tally::http::Health;
use tally::ingest::daemon::{Acked, Hooks, IngestArgs};
use tally::ingest::nats::ConsumerArgs;
use tally::ingest::save::WriteMethod;
use tally::results_stream::{self, Objects};
use tally::server::{self, Config, Counts, Running};
use tally::store::seed::{self, PipelineSpec};
use tally::store::verify::{self, Scope};
use tally::store::{self, Store};
use tally::table::thousands;

use report::{Latency, Paced, Stages, StrategyReport};
pub use strategy::CountStrategy;

/// Options of `tally-tools bench ingest`.
#[derive(Debug, Args)]
pub struct IngestBenchArgs {
    /// A database on the server to benchmark on; scratch databases `tally_bench_ingest_<pid>_…`
    /// are created next to it and dropped afterwards.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// NATS server with JetStream; streams of the run's own are created and deleted.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Which count strategies to run, each on a fresh database and stream.
    #[arg(long, value_enum, default_value = "all")]
    pub strategy: StrategyChoice,
    /// Antenna taxonomy fixture the results classify into.
    #[arg(long, default_value = "../shared/data/taxa-quebec-vermont-2022.json")]
    pub taxa: PathBuf,
    /// Result messages of the drain run (published first, then ingested and timed), for the
    /// incremental and deferred strategies.
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Result messages of the recompute strategy's drain run (it is slow).
    #[arg(long, default_value_t = 100)]
    pub recompute_messages: usize,
    /// Publish rates of the paced runs, comma separated: results/s (`600`), or a share of the
    /// strategy's own drain rate, its sustained rate (`80%`). The recompute strategy has one
    /// paced run, at half its drain throughput when that is lower than them all.
    #[arg(long, value_delimiter = ',', value_parser = RateSpec::parse, default_value = "50%,80%,100%")]
    pub rate: Vec<RateSpec>,
    /// Length of each paced run in seconds.
    #[arg(long, default_value_t = 10.0)]
    pub paced_seconds: f64,
    /// Valid detections (with occurrences) each deployment holds before the run.
    #[arg(long, default_value_t = 0)]
    pub preload_detections: u64,
    /// Images each job has already had results for when the run starts (rows of
    /// `tally.job_image` with placeholder ids, not in the job's total): Antenna's jobs cover
    /// whole collections, tens of thousands of images, and each batch updates the progress of
    /// its jobs.
    #[arg(long, default_value_t = 0)]
    pub job_images_before: i64,
    /// Length of the species classifier's score and logit vectors.
    #[arg(long, default_value_t = 100)]
    pub score_len: usize,
    /// Results per ingest batch for the incremental and deferred strategies (recompute uses 1,
    /// as Antenna recomputes after every result).
    #[arg(long, default_value_t = 500)]
    pub batch_size: usize,
    /// Messages sampled to compare Antenna's per-result SQL with the recompute strategy's.
    #[arg(long, default_value_t = 20)]
    pub recompute_samples: usize,
    /// Timely worker threads of the count dataflow.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub workers: usize,
    /// Ingest without its pipeline (each batch saved after the one before has committed and
    /// been acked), for comparison.
    #[arg(long)]
    pub no_pipeline: bool,
    /// How ingest sends new rows to Postgres (`copy` or `unnest`), to compare the two.
    #[arg(long, value_enum, default_value_t = WriteMethod::Copy)]
    pub write_method: WriteMethod,
    /// How the database under test compresses large values (`lz4`, `pglz`, `server`), to
    /// compare them: with ADC's large models, classification arrays are 20–233 KB each.
    #[arg(long, value_enum, default_value_t = ToastCompression::Lz4)]
    pub toast_compression: ToastCompression,
    /// Seed of the synthetic data.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Keep the scratch databases.
    #[arg(long)]
    pub keep: bool,
    /// Profiling: log every statement of the strategies' databases with its duration in the
    /// server's log (`log_min_duration_statement = 0` on those databases).
    #[arg(long)]
    pub log_statements: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also draw publish → ack latency percentiles per strategy (SVG) to this file.
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

/// A paced run's publish rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateSpec {
    /// Results per second.
    PerSecond(f64),
    /// This share of the strategy's drain rate (its sustained rate).
    OfDrain(f64),
}

impl RateSpec {
    /// `600` or `80%`.
    pub fn parse(s: &str) -> Result<RateSpec, String> {
        let s = s.trim();
        let (number, share) = match s.strip_suffix('%') {
            Some(n) => (n.trim(), true),
            None => (s, false),
        };
        let v: f64 = number
            .parse()
            .map_err(|_| format!("`{s}` is neither results/s (600) nor a share of the drain rate (80%)"))?;
        if !(v.is_finite() && v > 0.0) {
            return Err(format!("`{s}`: a rate must be positive"));
        }
        Ok(if share { RateSpec::OfDrain(v / 100.0) } else { RateSpec::PerSecond(v) })
    }

    /// Results/s, given the strategy's drain rate.
    pub fn resolve(self, drain_rate: f64) -> f64 {
        match self {
            RateSpec::PerSecond(r) => r,
            RateSpec::OfDrain(share) => share * drain_rate,
        }
    }

    /// Results published at this rate for `seconds`, for sizing the world before any drain
    /// rate is known (a share is taken of [`SIZING_RATE`]).
    fn results_for(self, seconds: f64) -> usize {
        (self.resolve(SIZING_RATE) * seconds).ceil().max(1.0) as usize
    }
}

impl std::fmt::Display for RateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RateSpec::PerSecond(r) => write!(f, "{r}"),
            RateSpec::OfDrain(s) => write!(f, "{}%", s * 100.0),
        }
    }
}

/// The drain rate assumed when sizing the world for paced runs at a share of it: above
/// anything this machine sustains (a faster run would run out of captures and pace fewer
/// results than asked, which the report shows as results).
const SIZING_RATE: f64 = 2_500.0;

/// `--strategy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyChoice {
    /// tally: the dataflow keeps counts, written in each batch's transaction.
    Incremental,
    /// Recompute the affected deployments' counts in SQL after every result.
    Recompute,
    /// No counts while ingesting; one recompute of everything at the end.
    Deferred,
    /// All three, one after the other.
    All,
}

impl StrategyChoice {
    fn strategies(self) -> Vec<CountStrategy> {
        match self {
            StrategyChoice::Incremental => vec![CountStrategy::Incremental],
            StrategyChoice::Recompute => vec![CountStrategy::Recompute],
            StrategyChoice::Deferred => vec![CountStrategy::Deferred],
            StrategyChoice::All => vec![CountStrategy::Incremental, CountStrategy::Recompute, CountStrategy::Deferred],
        }
    }
}

/// The pipeline the results name.
const PIPELINE: &str = "tally-bench-pipeline";

/// How long pulled tasks stay unacked before JetStream would redeliver them: longer than any
/// run, so that every task ack the bench sees is the first.
const TASK_ACK_WAIT: Duration = Duration::from_secs(3600);

/// Nights per deployment in the world.
const NIGHTS: usize = 10;

/// Deployments in the world: one in a project filtered on half the families at score 0.5,
/// one in an unfiltered project.
const DEPLOYMENTS: usize = 2;

/// A run stops waiting when no message has been acked for this long.
const STALL: Duration = Duration::from_secs(180);

/// How long the daemon may take to be ready (the bootstrap of a large preload included).
const STARTUP: Duration = Duration::from_secs(3600);

/// Runs the benchmark and prints the markdown report.
pub async fn run(args: IngestBenchArgs) -> anyhow::Result<ExitCode> {
    let metrics = tally::metrics::install();
    let taxonomy = tally::taxa_file::load(&args.taxa)?;
    let base = format!("tally_bench_ingest_{}", std::process::id());
    let (admin, connection) = tokio_postgres::connect(&args.database_url, NoTls).await.context("connecting")?;
    tokio::spawn(connection);
    let strategies = args.strategy.strategies();
    let databases: Vec<String> = std::iter::once(format!("{base}_template"))
        .chain(strategies.iter().map(|s| format!("{base}_{}", strategy_name(*s))))
        .collect();
    let streams = Mutex::new(Vec::new());
    let body = async {
        let bench = Bench::prepare(&args, &admin, &taxonomy, &base, &strategies, &streams).await?;
        let mut reports = Vec::new();
        for (&strategy, name) in strategies.iter().zip(&databases[1..]) {
            reports.push(bench.strategy(strategy, name, &metrics).await?);
        }
        anyhow::Ok((bench.setup_line(&args), reports))
    };
    // Ctrl-C drops the run and still cleans up.
    let result = tokio::select! {
        r = body => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    crate::bench::delete_streams(&args.nats_url, &streams).await;
    if !args.keep {
        for name in &databases {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        }
    }
    let (setup, reports) = result?;
    let markdown = report::render(&args, &setup, &reports);
    print!("{markdown}");
    if let Some(path) = &args.output {
        std::fs::write(path, &markdown).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report::plot(&reports).to_svg())
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `incremental`, `recompute` or `deferred`.
fn strategy_name(s: CountStrategy) -> &'static str {
    s.name()
}

static NEXT_JOB: AtomicI64 = AtomicI64::new(0);

/// A job id no test or other run uses at the same time (job ids name NATS streams): above the
/// test fixtures' range, distinct per process.
fn next_job_id() -> i64 {
    1_000_000_000 + i64::from(std::process::id() % 100_000) * 1_000 + NEXT_JOB.fetch_add(1, Ordering::SeqCst)
}

/// What every strategy shares: the template database, the world's captures in publishing
/// order, and the result factory.
struct Bench<'a> {
    args: &'a IngestBenchArgs,
    admin: &'a tokio_postgres::Client,
    template: String,
    /// Captures no result has been published for yet, shuffled across deployments and nights;
    /// each strategy starts from the same order on its own copy.
    images: Vec<Id>,
    factory: ResultFactory,
    pipeline: i64,
    taxa: usize,
    preloaded: u64,
    seed_seconds: f64,
    /// Every NATS stream created, deleted at the end even after an error or Ctrl-C.
    streams: &'a Mutex<Vec<String>>,
}

impl<'a> Bench<'a> {
    /// Seeds the template database.
    async fn prepare(
        args: &'a IngestBenchArgs,
        admin: &'a tokio_postgres::Client,
        taxonomy: &Taxonomy,
        base: &str,
        strategies: &[CountStrategy],
        streams: &'a Mutex<Vec<String>>,
    ) -> anyhow::Result<Bench<'a>> {
        let template = format!("{base}_template");
        let paced: usize = args.rate.iter().map(|r| r.results_for(args.paced_seconds)).sum();
        let drained = strategies
            .iter()
            .map(|s| if *s == CountStrategy::Recompute { args.recompute_messages } else { args.messages })
            .max()
            .unwrap_or(0);
        let images_per_event = (drained + paced).div_ceil(DEPLOYMENTS * NIGHTS).max(1);
        let config = WorldConfig {
            projects: DEPLOYMENTS,
            deployments_per_project: 1,
            events_per_deployment: NIGHTS,
            images_per_event,
        };
        let world = World::new(taxonomy, &config);
        let mut images = world.images.clone();
        images.shuffle(&mut SmallRng::seed_from_u64(args.seed));
        let mut tables = world.tables.clone();
        tables.apply(&preload(&world, &taxonomy.of_rank(Rank::Species), args.preload_detections, args.seed));

        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {template} WITH (FORCE)")).await?;
        admin.batch_execute(&format!("CREATE DATABASE {template}")).await?;
        let url = sibling(&args.database_url, &template)?;
        let spinner = spinner(format!(
            "seeding {} captures, {} detections",
            thousands(tables.images.len() as i64),
            thousands(tables.detections.len() as i64)
        ));
        let started = Instant::now();
        let store = store::connect(&DbArgs::for_url(&url)).await?;
        store::migrate::migrate(&store).await?;
        seed::seed_named(&store, &tables, &world.names).await?;
        let pipeline = seed::seed_pipeline(&store, &PipelineSpec::antenna_test(PIPELINE)).await?;
        store.client().await?.batch_execute("VACUUM ANALYZE").await?;
        // Exact counts to start from, so that no strategy's timed run pays for a first fix.
        let mut engine = Engine::new(1)?;
        store::bootstrap::bootstrap(&store, &mut engine).await?;
        store::sink::write_all(&store, &engine.snapshot()).await?;
        drop(engine);
        let seed_seconds = started.elapsed().as_secs_f64();
        store.pool.close();
        spinner.finish_and_clear();
        let preloaded = tables.detections.values().filter(|d| d.valid).count() as u64;
        let factory = ResultFactory {
            species: world.species.clone(),
            keys: ResultKeys::antenna_test(PIPELINE),
            mean_detections: 8.0,
            score_len: args.score_len,
            seed: args.seed,
        };
        Ok(Bench {
            args,
            admin,
            template,
            images,
            factory,
            pipeline,
            taxa: taxonomy.taxa.len(),
            preloaded,
            seed_seconds,
            streams,
        })
    }

    fn register(&self, stream: &str) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.push(stream.to_string());
        }
    }

    /// One line saying what was seeded.
    fn setup_line(&self, args: &IngestBenchArgs) -> String {
        format!(
            "{} taxa from `{}`; {DEPLOYMENTS} deployments × {NIGHTS} nights, {} detections per deployment before the run ({} in all, seeded with exact counts in {:.1} s); results: Poisson(8) detections, a binary and a species classification each, {} scores",
            thousands(self.taxa as i64),
            args.taxa.display(),
            thousands(args.preload_detections as i64),
            thousands(self.preloaded as i64),
            self.seed_seconds,
            args.score_len,
        ) + &if args.job_images_before > 0 {
            format!("; each job {} images in before the run", thousands(args.job_images_before))
        } else {
            String::new()
        }
    }

    /// Runs `strategy` on a copy of the template named `name`.
    async fn strategy(
        &self,
        strategy: CountStrategy,
        name: &str,
        metrics: &metrics_exporter_prometheus::PrometheusHandle,
    ) -> anyhow::Result<StrategyReport> {
        let args = self.args;
        eprintln!("— {}", strategy_name(strategy));
        // The template must have no session for CREATE DATABASE … TEMPLATE.
        self.admin
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.template],
            )
            .await?;
        self.admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
        self.admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {} STRATEGY FILE_COPY", self.template))
            .await?;
        if args.log_statements {
            self.admin.batch_execute(&format!("ALTER DATABASE {name} SET log_min_duration_statement = 0")).await?;
        }
        let db = DbArgs {
            toast_compression: args.toast_compression,
            ..DbArgs::for_url(&sibling(&args.database_url, name)?)
        };
        let store = store::connect(&db).await?;

        let suffix = format!("{}_{}", std::process::id(), strategy_name(strategy));
        let mut nats_args = NatsArgs::for_url(&args.nats_url);
        nats_args.results_stream = format!("TALLY_BENCH_{}", suffix.to_uppercase());
        nats_args.results_subject_prefix = format!("bench{}.results", suffix.replace('_', ""));
        nats_args.results_object_bucket = format!("TALLY_BENCH_OBJECTS_{}", suffix.to_uppercase());
        let consumer = ConsumerArgs { ack_wait: Duration::from_secs(600), ..ConsumerArgs::default() };
        let publisher = async_nats::connect(&args.nats_url).await.with_context(|| {
            format!("cannot connect to NATS at {} (is nats-server running with -js?)", args.nats_url)
        })?;
        let js = jetstream::new(publisher.clone());
        self.register(&nats_args.results_stream);
        // The object store bucket is a stream of that name.
        self.register(&format!("OBJ_{}", nats_args.results_object_bucket));
        tally::ingest::nats::ensure_stream(&js, &nats_args, &consumer).await?;
        let objects = results_stream::ensure_bucket(&js, &nats_args.results_object_bucket, consumer.max_age()).await?;
        let max_payload = publisher.server_info().max_payload;
        let mut run = Run {
            bench: self,
            database: name.to_string(),
            store: store.clone(),
            js: js.clone(),
            nats_args,
            objects,
            max_payload,
            jobs: Vec::new(),
        };
        let result = run.measure(strategy, consumer, metrics).await;
        let _ = js.delete_stream(&run.nats_args.results_stream).await;
        let _ = js.delete_object_store(&run.nats_args.results_object_bucket).await;
        for job in &run.jobs {
            job.delete_stream(&js).await;
        }
        store.pool.close();
        result
    }
}

/// One strategy's run: its database, its results stream and the jobs it created.
struct Run<'a> {
    bench: &'a Bench<'a>,
    database: String,
    store: Store,
    js: jetstream::Context,
    nats_args: NatsArgs,
    objects: Objects,
    max_payload: usize,
    jobs: Vec<AsyncJob>,
}

impl Run<'_> {
    /// Where its results are published.
    fn target(&self) -> publish::Target<'_> {
        publish::Target { js: &self.js, nats: &self.nats_args, objects: &self.objects, max_payload: self.max_payload }
    }

    async fn measure(
        &mut self,
        strategy: CountStrategy,
        consumer: ConsumerArgs,
        metrics: &metrics_exporter_prometheus::PrometheusHandle,
    ) -> anyhow::Result<StrategyReport> {
        let args = self.bench.args;
        let drained = if strategy == CountStrategy::Recompute { args.recompute_messages } else { args.messages };
        let images = self.bench.images.clone();
        let (drain_images, rest) = images.split_at(drained.min(images.len()));

        // Drain: publish everything first, then time ingest from start to the last ack.
        let tasks = self.tasks(drain_images).await?;
        publish::all(&self.target(), &self.bench.factory, &tasks).await?;
        let before = ceiling::Rows::read(&self.store).await?;
        let ingest_args = IngestArgs {
            batch_size: if strategy == CountStrategy::Recompute { 1 } else { args.batch_size },
            workers: args.workers,
            no_pipeline: args.no_pipeline,
            write_method: args.write_method,
            consumer,
            max_result_bytes: 64 << 20,
            ..IngestArgs::default()
        };
        let stages_before = Stages::scrape(metrics);
        let cpu_before = cpu::CpuSnapshot::take(&self.database);
        let (mut ingest, ready_seconds) =
            Ingest::start(self.store.args.clone(), &self.nats_args, &ingest_args, strategy.counts()).await?;
        let bootstrap_seconds = (strategy == CountStrategy::Incremental).then_some(ready_seconds);
        let started = Instant::now();
        let bar = counter_bar(tasks.len() as u64, "drain");
        let acked = ingest.wait_for(tasks.len(), &bar).await?;
        bar.finish_and_clear();
        let drain_seconds = acked.last().map_or(0.0, |a| a.at.duration_since(started).as_secs_f64());
        let stages = Stages::scrape(metrics).since(&stages_before, drain_seconds);
        let cpu = cpu_before.shares(&cpu::CpuSnapshot::take(&self.database));
        let final_recompute_seconds = if strategy == CountStrategy::Deferred {
            let spinner = spinner("deferred: one recompute of every count".into());
            let started = Instant::now();
            let v = verify::verify(&self.store, Scope::default()).await?;
            verify::fix(&self.store, &v).await?;
            spinner.finish_and_clear();
            Some(started.elapsed().as_secs_f64())
        } else {
            None
        };
        let after = ceiling::Rows::read(&self.store).await?;

        // Paced: publish at a fixed rate while ingest runs; latency = ack − publish.
        let drain_rate = drained as f64 / drain_seconds.max(1e-9);
        let rates: Vec<(RateSpec, f64)> = if strategy == CountStrategy::Recompute {
            let lowest = args.rate.iter().map(|r| r.resolve(drain_rate)).fold(f64::INFINITY, f64::min);
            let rate = lowest.min(drain_rate / 2.0);
            vec![(RateSpec::PerSecond(rate), rate)]
        } else {
            args.rate.iter().map(|r| (*r, r.resolve(drain_rate))).collect()
        };
        let mut rest = rest;
        let mut paced = Vec::new();
        for (spec, rate) in rates {
            let n = ((rate * args.paced_seconds).ceil() as usize).max(1).min(rest.len());
            let (these, later) = rest.split_at(n);
            rest = later;
            let tasks = self.tasks(these).await?;
            let bar = counter_bar(tasks.len() as u64, "paced");
            let (published, achieved) = publish::paced(&self.target(), &self.bench.factory, &tasks, rate, &bar).await?;
            bar.finish_and_clear();
            let acked = ingest.wait_for(tasks.len(), &ProgressBar::hidden()).await?;
            paced.push(Paced { spec, rate, achieved, latency: Latency::of(&published, &acked) });
        }

        let counts_exact = match strategy {
            CountStrategy::Deferred => None,
            _ => {
                let spinner = spinner("verify: every stored count against SQL".into());
                let v = verify::verify(&self.store, Scope::default()).await?;
                spinner.finish_and_clear();
                Some(v.differences.is_empty())
            }
        };
        let antenna = if strategy == CountStrategy::Recompute {
            let sample: Vec<Id> = drain_images.iter().copied().take(args.recompute_samples.max(1)).collect();
            Some(antenna_sql::compare(&self.store, &sample).await?)
        } else {
            None
        };
        ingest.stop().await;
        let ceiling = if strategy == CountStrategy::Incremental {
            let spinner = spinner("raw COPY of the drain's rows".into());
            let c = ceiling::measure(&self.store, &before, &after).await?;
            spinner.finish_and_clear();
            Some(c)
        } else {
            None
        };
        Ok(StrategyReport {
            strategy,
            batch_size: ingest_args.batch_size,
            drain_messages: drained,
            drain_seconds,
            final_recompute_seconds,
            rows: after.total() - before.total(),
            stages,
            cpu,
            bootstrap_seconds,
            paced,
            counts_exact,
            ceiling,
            antenna,
        })
    }

    /// Jobs of at most Antenna's `NATS_MAX_ACK_PENDING` tasks over `images`, their tasks
    /// pulled as a worker would.
    async fn tasks(&mut self, images: &[Id]) -> anyhow::Result<Vec<(i64, Task)>> {
        let (bench, jobs) = (self.bench, &mut self.jobs);
        let first_new = jobs.len();
        let tasks = dispatch_jobs(&self.store, &self.js, bench.pipeline, images, |job| {
            bench.register(&job.stream_name());
            jobs.push(job.clone());
        })
        .await?;
        let before = bench.args.job_images_before;
        if before > 0 {
            let client = self.store.client().await?;
            for job in &self.jobs[first_new..] {
                // Negative ids, as the lost-images sweep's placeholders: no image of the world.
                client
                    .execute(
                        "INSERT INTO tally.job_image (job_id, image_id, failed, detections, classifications)
                         SELECT $1, -g, false, 3, 6 FROM generate_series(1::int8, $2) AS g",
                        &[&job.id, &before],
                    )
                    .await?;
            }
            client.batch_execute("ANALYZE tally.job_image").await?;
        }
        Ok(tasks)
    }
}

/// Creates jobs of at most Antenna's `NATS_MAX_ACK_PENDING` tasks over `images` (in project 1,
/// for `pipeline`) as Antenna does, and pulls their tasks as a worker would; returns
/// `(job, task)` pairs. `created` hears of each job before its stream exists, so that the
/// caller can delete it even if this fails.
pub(crate) async fn dispatch_jobs(
    store: &Store,
    js: &jetstream::Context,
    pipeline: i64,
    images: &[Id],
    mut created: impl FnMut(&AsyncJob),
) -> anyhow::Result<Vec<(i64, Task)>> {
    let bar = counter_bar(images.len() as u64, "tasks");
    let mut tasks = Vec::with_capacity(images.len());
    for chunk in images.chunks(ANTENNA_MAX_ACK_PENDING) {
        let job = AsyncJob { id: next_job_id(), project: 1, pipeline };
        job.insert(store).await?;
        created(&job);
        for task in job.dispatch(js, chunk, TASK_ACK_WAIT).await? {
            tasks.push((job.id, task));
        }
        bar.set_position(tasks.len() as u64);
    }
    bar.finish_and_clear();
    Ok(tasks)
}

/// Ingest running in-process: `tally serve` itself (`server::start`, with the change feed and
/// the job monitor; no worker gateway), its acked batches reported to the benchmark.
pub(crate) struct Ingest {
    running: Running,
    acked: mpsc::UnboundedReceiver<Acked>,
    health: Arc<Health>,
}

impl Ingest {
    /// Starts the daemon over the database of `db` and waits until it is ready (the dataflow
    /// bootstrapped unless `counts` says otherwise); returns it and the seconds that took.
    pub(crate) async fn start(
        db: DbArgs,
        nats_args: &NatsArgs,
        args: &IngestArgs,
        counts: Counts,
    ) -> anyhow::Result<(Ingest, f64)> {
        let (tx, acked) = mpsc::unbounded_channel();
        let mut config = Config::new(db, nats_args.clone());
        config.ingest = args.clone();
        config.gateway.no_gateway = true;
        // Jobs of a run are never lost; the monitor need not look.
        config.monitor.job_monitor_every = Duration::from_secs(3600);
        config.hooks = Hooks { acked: Some(tx) };
        config.counts = counts;
        let started = Instant::now();
        let running = server::start(config, CancellationToken::new()).await?.until_ready(STARTUP).await?;
        let ready = started.elapsed().as_secs_f64();
        let health = Arc::clone(&running.health);
        Ok((Ingest { running, acked, health }, ready))
    }

    /// Waits until `n` more results are acked; returns their batches' acks.
    pub(crate) async fn wait_for(&mut self, n: usize, bar: &ProgressBar) -> anyhow::Result<Vec<Acked>> {
        let mut batches = Vec::new();
        let mut saved = 0;
        while saved < n {
            match tokio::time::timeout(STALL, self.acked.recv()).await {
                Ok(Some(a)) => {
                    anyhow::ensure!(a.dead_lettered == 0, "{} results were dead-lettered", a.dead_lettered);
                    saved += a.reply_subjects.len();
                    bar.inc(a.reply_subjects.len() as u64);
                    batches.push(a);
                }
                Ok(None) => anyhow::bail!("ingest stopped after {saved} of {n} results"),
                Err(_) => anyhow::bail!(
                    "no ack for {} s: {saved} of {n} results acked (ready: {}, {})",
                    STALL.as_secs(),
                    self.health.is_ready(),
                    self.health.reason()
                ),
            }
        }
        Ok(batches)
    }

    /// Stops the daemon and waits for it (a failure is reported, not fatal: the figures are
    /// taken).
    pub(crate) async fn stop(self) {
        if let Err(e) = self.running.stop().await {
            eprintln!("ingest stopped with an error: {e:#}");
        }
    }
}

pub(crate) fn sibling(url: &str, name: &str) -> anyhow::Result<String> {
    store::sibling_database_url(url, name).context("--database-url must end with /<database>")
}

pub(crate) fn spinner(message: String) -> ProgressBar {
    let s = ProgressBar::new_spinner().with_message(message);
    s.enable_steady_tick(Duration::from_millis(120));
    s
}

pub(crate) fn counter_bar(len: u64, what: &str) -> ProgressBar {
    ProgressBar::new(len)
        .with_style(
            ProgressStyle::with_template("{msg:>8} [{bar:40}] {pos}/{len} {per_sec} {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        )
        .with_message(what.to_string())
}

#[cfg(test)]
mod tests {
    use super::RateSpec;

    #[test]
    fn rates_are_results_per_second_or_a_share_of_the_drain() {
        assert_eq!(RateSpec::parse("600"), Ok(RateSpec::PerSecond(600.0)));
        assert_eq!(RateSpec::parse(" 80% "), Ok(RateSpec::OfDrain(0.8)));
        assert_eq!(RateSpec::parse("80%").map(|r| r.resolve(1000.0)), Ok(800.0));
        assert_eq!(RateSpec::parse("12.5").map(|r| r.resolve(1000.0)), Ok(12.5));
        assert_eq!(RateSpec::OfDrain(0.5).to_string(), "50%");
        for bad in ["", "%", "fast", "0", "-5", "0%", "NaN", "inf"] {
            assert!(RateSpec::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
