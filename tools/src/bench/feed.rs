//! `tally-tools bench feed`: what the change feed (migration V7) costs Django's own statements, and
//! how soon Django's edits reach the stored counts (issue 10), measured in one run:
//!
//! 1. **Trigger overhead.** Django's statements, from a Django-like session (a plain
//!    connection without `tally.origin`), with the feed triggers enabled and disabled
//!    (`ALTER TABLE … DISABLE TRIGGER tally_feed_*`) in alternating runs (ABBA) over the same
//!    data: `Deployment.update_children`'s bulk UPDATE, `save_results`' writes for one image,
//!    `update_calculated_fields_for_events`' count-only UPDATE. Every transaction commits;
//!    what it changed is undone outside the timing, so that every run sees the same rows.
//! 2. **Edit → counts committed.** serve's ingest loop (with the feed) runs in-process over a
//!    synthetic world; single-row edits (an identification, a threshold edit, a capture moved
//!    to another event) are timed from their COMMIT to the `tally_counts` notification whose
//!    `seq` covers the edit's outbox entry (heard on a session of its own): first alone, then
//!    while results are published to ingest at a steady rate.
//! 3. **Filter edits on a large project.** Threshold and include-taxon edits of a project of
//!    `--large-detections` detections, with the count rows each one made serve write.
//!
//! Each phase has a scratch database of its own next to `--database-url`, dropped when the
//! phase ends; the run's NATS streams are deleted at the end, even after an error or Ctrl-C.
//! No figure is assumed: every number printed is measured in the run.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use clap::Args;
use futures_util::StreamExt;
use indicatif::ProgressBar;
use metrics_exporter_prometheus::PrometheusHandle;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tally_dataflows::taxonomy::{Rank, Taxonomy};
use tally_dataflows::{Id, InputBatch, Tables};
use tokio::sync::watch;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::bench::ingest::{counter_bar, dispatch_jobs, publish, sibling, spinner, Ingest};
use crate::stats::human_us;
use crate::synth::jobs::Task;
use crate::synth::preload::preload;
use crate::synth::results::{ResultFactory, ResultKeys, World, WorldConfig};
use tally::config::{DbArgs, NatsArgs};
use tally::ingest::daemon::{Acked, IngestArgs};
use tally::ingest::feed;
use tally::ingest::nats::ConsumerArgs;
use tally::metrics::names;
use tally::server::Counts;
use tally::store::seed::{self, PipelineSpec};
use tally::store::verify::{self, Scope};
use tally::store::{self, Store};
use tally::table::thousands;

/// Options of `tally-tools bench feed`.
#[derive(Debug, Args)]
pub struct FeedBenchArgs {
    /// A database on the server to benchmark on; scratch databases `tally_bench_feed_<pid>_…`
    /// are created next to it and dropped afterwards.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// NATS server with JetStream; the run's streams are created and deleted.
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// Phase 1: captures of the deployment whose project `Deployment.update_children` moves
    /// (rounded up to a multiple of its 100 nights).
    #[arg(long, default_value_t = 100_000)]
    pub bulk_rows: usize,
    /// Phase 1: detections, occurrences and classifications per `save_results` transaction.
    #[arg(long, default_value_t = 20)]
    pub save_size: usize,
    /// Phase 1: `save_results` transactions per run.
    #[arg(long, default_value_t = 200)]
    pub save_transactions: usize,
    /// Phase 1: events per count-only UPDATE (`update_calculated_fields_for_events`).
    #[arg(long, default_value_t = 100)]
    pub count_events: usize,
    /// Phase 1: count-only UPDATEs per run.
    #[arg(long, default_value_t = 50)]
    pub count_updates: usize,
    /// Phase 1: runs with the triggers and as many without, alternating; a bulk-UPDATE run
    /// moves the deployment to another project and back (two samples).
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Phase 2: single-row edits timed alone, and as many again under ingest.
    #[arg(long, default_value_t = 300)]
    pub edits: usize,
    /// Phase 2: an edit starts this often (or as soon as the previous one was counted, when
    /// that took longer); sets the length of each series and so the results published.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    pub edit_interval: Duration,
    /// Phase 2: results published per second to ingest during the second series of edits.
    #[arg(long, default_value_t = 200.0)]
    pub ingest_rate: f64,
    /// Phase 2: projects of the world, one deployment of 10 nights each.
    #[arg(long, default_value_t = 4)]
    pub projects: usize,
    /// Phase 2: valid detections (one occurrence each) of each project before the run.
    #[arg(long, default_value_t = 25_000)]
    pub project_detections: u64,
    /// Phase 3: valid detections (one occurrence each) of the large project.
    #[arg(long, default_value_t = 1_000_000)]
    pub large_detections: u64,
    /// Phase 3: threshold edits (alternating 0.6 and 0.5), and include-taxon additions (each
    /// followed by its timed removal).
    #[arg(long, default_value_t = 4)]
    pub large_repeats: usize,
    /// An edit whose counts are not announced within this long counts as not observed.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    pub edit_timeout: Duration,
    /// Highest acceptable trigger overhead ratio (with / without); unset: the ratios are
    /// reported without a verdict.
    #[arg(long)]
    pub trigger_goal: Option<f64>,
    /// Length of the species classifier's score and logit vectors (results and phase 1's
    /// classifications).
    #[arg(long, default_value_t = 100, value_parser = crate::cli::parse_score_len)]
    pub score_len: usize,
    /// Timely worker threads of serve's count dataflow.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub workers: usize,
    /// Seed of the synthetic data and of the edits.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Keep the scratch databases.
    #[arg(long)]
    pub keep: bool,
    /// Also write the markdown report to this file.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Print JSON instead of markdown.
    #[arg(long)]
    pub json: bool,
}

/// The pipeline results name.
const PIPELINE: &str = "tally-bench-feed-pipeline";

/// The latency goal of an edit (issue 10).
const GOAL: Duration = Duration::from_secs(1);

/// Nights of each deployment in phase 1 (so `--count-events` can reach 100).
const BULK_NIGHTS: usize = 100;

/// Nights of each deployment in phases 2 and 3.
const NIGHTS: usize = 10;

/// Results prepared for the series under ingest, as a multiple of what its planned length
/// needs (edits that are counted late make it longer).
const POOL_MARGIN: f64 = 2.0;

/// The outbox entry an edit appended, read inside its transaction.
const MAX_SEQ: &str = "SELECT max(seq) FROM tally.change_outbox";

/// Runs the benchmark and prints the report.
pub async fn run(args: FeedBenchArgs) -> anyhow::Result<ExitCode> {
    for (name, n) in [
        ("--bulk-rows", args.bulk_rows),
        ("--save-size", args.save_size),
        ("--save-transactions", args.save_transactions),
        ("--count-events", args.count_events),
        ("--count-updates", args.count_updates),
        ("--repeats", args.repeats),
        ("--edits", args.edits),
        ("--projects", args.projects),
        ("--large-repeats", args.large_repeats),
    ] {
        anyhow::ensure!(n >= 1, "{name} must be at least 1");
    }
    anyhow::ensure!(args.project_detections >= 1 && args.large_detections >= 1, "detections must be at least 1");
    anyhow::ensure!(args.ingest_rate > 0.0, "--ingest-rate must be positive");
    let metrics = tally::metrics::install();
    let taxonomy = Taxonomy::synthetic(10, 10, 20);
    let base = format!("tally_bench_feed_{}", std::process::id());
    let (admin, connection) = tokio_postgres::connect(&args.database_url, NoTls).await.context("connecting")?;
    tokio::spawn(connection);
    let streams = Mutex::new(Vec::new());
    let bench = Bench { args: &args, admin: &admin, taxonomy: &taxonomy, base: &base, streams: &streams, metrics };
    // Ctrl-C drops the run and still cleans up.
    let result = tokio::select! {
        r = bench.all() => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    crate::bench::delete_streams(&args.nats_url, &streams).await;
    if !args.keep {
        for phase in PHASES {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {base}_{phase} WITH (FORCE)")).await;
        }
    }
    let report = result?;
    let markdown = render(&args, &report);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{markdown}");
    }
    if let Some(path) = &args.output {
        std::fs::write(path, &markdown).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The phases, naming their scratch databases.
const PHASES: [&str; 3] = ["triggers", "edits", "large"];

/// Everything the run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Phase 1.
    pub triggers: TriggerReport,
    /// Phase 2.
    pub edits: EditsReport,
    /// Phase 3.
    pub large: LargeReport,
}

/// What the phases share.
struct Bench<'a> {
    args: &'a FeedBenchArgs,
    admin: &'a Client,
    taxonomy: &'a Taxonomy,
    base: &'a str,
    /// Every NATS stream created, deleted at the end.
    streams: &'a Mutex<Vec<String>>,
    /// The process's metrics recorder: serve's feed steps and count writes are read from it.
    metrics: PrometheusHandle,
}

impl Bench<'_> {
    async fn all(&self) -> anyhow::Result<Report> {
        eprintln!("— phase 1: trigger overhead on Django's statements");
        let triggers = self.triggers().await?;
        eprintln!("— phase 2: single-row edits → counts committed, alone and under ingest");
        let edits = self.edits().await?;
        eprintln!(
            "— phase 3: filter edits on a project of {} detections",
            thousands(self.args.large_detections as i64)
        );
        let large = self.large().await?;
        Ok(Report { triggers, edits, large })
    }

    fn register(&self, stream: &str) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.push(stream.to_string());
        }
    }

    /// A fresh, migrated scratch database for `phase`: its name, URL and store.
    async fn database(&self, phase: &str) -> anyhow::Result<(String, String, Store)> {
        let name = format!("{}_{phase}", self.base);
        self.admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
        self.admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        let url = sibling(&self.args.database_url, &name)?;
        let store = store::connect(&DbArgs::for_url(&url)).await?;
        store::migrate::migrate(&store).await?;
        Ok((name, url, store))
    }

    /// Seeds `tables` (taxa named as in the taxonomy) and the pipeline, then `VACUUM ANALYZE`;
    /// returns the pipeline and the seconds it took.
    async fn seed(&self, store: &Store, tables: &Tables) -> anyhow::Result<(i64, f64)> {
        let s = spinner(format!(
            "seeding {} captures, {} detections",
            thousands(tables.images.len() as i64),
            thousands(tables.detections.len() as i64)
        ));
        let started = Instant::now();
        seed::seed_named(store, tables, &self.taxonomy.names).await?;
        let pipeline = seed::seed_pipeline(store, &PipelineSpec::antenna_test(PIPELINE)).await?;
        store.client().await?.batch_execute("VACUUM ANALYZE").await?;
        s.finish_and_clear();
        Ok((pipeline, started.elapsed().as_secs_f64()))
    }

    /// Closes `store` and drops its database (unless `--keep`).
    async fn finish(&self, name: &str, store: Store) -> anyhow::Result<()> {
        store.pool.close();
        if !self.args.keep {
            self.admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
        }
        Ok(())
    }

    /// serve's ingest loop (with the feed) in-process over `store`, on a results stream of
    /// `phase`'s own: the loop, its NATS names, and the seconds the bootstrap took (loading
    /// the dataflow and writing every count that differed).
    async fn serve(&self, store: &Store, phase: &str) -> anyhow::Result<(Ingest, NatsArgs, f64)> {
        let pid = std::process::id();
        let mut nats_args = NatsArgs::for_url(&self.args.nats_url);
        nats_args.results_stream = format!("TALLY_BENCH_FEED_{pid}_{}", phase.to_uppercase());
        nats_args.results_subject_prefix = format!("benchfeed{pid}{phase}.results");
        nats_args.results_object_bucket = format!("TALLY_BENCH_FEED_OBJECTS_{pid}_{}", phase.to_uppercase());
        let ingest_args = IngestArgs {
            workers: self.args.workers,
            consumer: ConsumerArgs { ack_wait: Duration::from_secs(600), ..ConsumerArgs::default() },
            ..IngestArgs::default()
        };
        let js = jetstream::new(async_nats::connect(&self.args.nats_url).await.with_context(|| {
            format!("cannot connect to NATS at {} (is nats-server running with -js?)", self.args.nats_url)
        })?);
        self.register(&nats_args.results_stream);
        // The object store bucket of large results is a stream of that name.
        self.register(&format!("OBJ_{}", nats_args.results_object_bucket));
        // Results may be published before the loop has set the stream up.
        tally::ingest::nats::ensure_stream(&js, &nats_args, &ingest_args.consumer).await?;
        let s = spinner("serve: bootstrapping the dataflow from Postgres".into());
        let (ingest, bootstrap) =
            Ingest::start(store.args.clone(), &nats_args, &ingest_args, Counts::Incremental).await?;
        s.finish_and_clear();
        Ok((ingest, nats_args, bootstrap))
    }
}

// ---------------------------------------------------------------------------------------------
// Phase 1: trigger overhead.

/// One of Django's statements with and without the feed triggers.
#[derive(Debug, Serialize)]
pub struct Overhead {
    /// Timed transactions in each mode.
    pub samples: usize,
    /// `median` or `mean` of the samples.
    pub statistic: &'static str,
    /// With the triggers, ms.
    pub with_ms: f64,
    /// Without, ms.
    pub without_ms: f64,
    /// With / without.
    pub ratio: f64,
    /// Outbox entries a transaction appended (with the triggers; none without).
    pub entries_per_transaction: f64,
    /// Ids those entries carried.
    pub ids_per_transaction: f64,
}

/// Phase 1's figures.
#[derive(Debug, Serialize)]
pub struct TriggerReport {
    /// Captures in the database (two deployments).
    pub captures: usize,
    /// Captures the bulk UPDATE moves.
    pub bulk_rows: u64,
    /// Feed triggers switched per mode.
    pub triggers: usize,
    /// Seeding, seconds.
    pub seed_seconds: f64,
    /// (a) `Deployment.update_children`.
    pub bulk_update: Overhead,
    /// (b) `save_results` for one image.
    pub save_results: Overhead,
    /// (c) `update_calculated_fields_for_events`.
    pub count_update: Overhead,
}

/// Timed transactions of one statement kind, per mode, and what the outbox received.
#[derive(Debug, Default)]
struct Modes {
    with: Vec<f64>,
    without: Vec<f64>,
    entries: i64,
    ids: i64,
}

impl Modes {
    fn push(&mut self, triggers: bool, d: Duration) {
        let ms = d.as_secs_f64() * 1e3;
        if triggers {
            self.with.push(ms)
        } else {
            self.without.push(ms)
        }
    }

    /// Takes the outbox a run left (and empties it): only runs with the triggers may add to
    /// it.
    async fn outbox(&mut self, dj: &Client, triggers: bool) -> anyhow::Result<()> {
        let row = dj
            .query_one("SELECT count(*), coalesce(sum(cardinality(ids)), 0)::int8 FROM tally.change_outbox", &[])
            .await?;
        let (entries, ids): (i64, i64) = (row.get(0), row.get(1));
        anyhow::ensure!(triggers || entries == 0, "{entries} outbox entries appended with the feed triggers disabled");
        self.entries += entries;
        self.ids += ids;
        dj.batch_execute("TRUNCATE tally.change_outbox").await?;
        Ok(())
    }

    fn overhead(&self, statistic: &'static str) -> Overhead {
        let stat = |v: &[f64]| if statistic == "median" { quantile(v, 0.5) } else { mean(v) };
        let (with_ms, without_ms) = (stat(&self.with), stat(&self.without));
        let n = self.with.len().max(1) as f64;
        Overhead {
            samples: self.with.len().min(self.without.len()),
            statistic,
            with_ms,
            without_ms,
            ratio: with_ms / without_ms.max(1e-9),
            entries_per_transaction: self.entries as f64 / n,
            ids_per_transaction: self.ids as f64 / n,
        }
    }
}

/// Run `rep`'s order of modes: ABBA, so that drift over the run weighs on both alike.
fn abba(rep: usize) -> [bool; 2] {
    if rep.is_multiple_of(2) {
        [true, false]
    } else {
        [false, true]
    }
}

/// The feed's INSERT, UPDATE and DELETE triggers (V7), switched together.
struct FeedTriggers {
    /// `(table, trigger)`.
    all: Vec<(String, String)>,
}

impl FeedTriggers {
    async fn find(c: &Client) -> anyhow::Result<FeedTriggers> {
        let rows = c
            .query(
                "SELECT tgrelid::regclass::text, tgname::text FROM pg_trigger
                 WHERE tgname IN ('tally_feed_insert', 'tally_feed_update', 'tally_feed_delete') ORDER BY 1, 2",
                &[],
            )
            .await?;
        let all: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        anyhow::ensure!(!all.is_empty(), "no feed triggers: is migration V7 applied?");
        Ok(FeedTriggers { all })
    }

    async fn set(&self, c: &Client, enabled: bool) -> anyhow::Result<()> {
        let verb = if enabled { "ENABLE" } else { "DISABLE" };
        let sql: Vec<String> =
            self.all.iter().map(|(table, trigger)| format!("ALTER TABLE {table} {verb} TRIGGER {trigger}")).collect();
        c.batch_execute(&sql.join(";\n")).await?;
        Ok(())
    }
}

/// A statement and its parameters, built the way Django's compiler writes a multi-row INSERT
/// or a `bulk_update` (one placeholder per value).
#[derive(Default)]
struct Statement {
    sql: String,
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Statement {
    fn new(sql: &str) -> Statement {
        Statement { sql: sql.to_string(), params: Vec::new() }
    }

    /// Adds a parameter; returns its placeholder.
    fn bind(&mut self, value: impl ToSql + Sync + Send + 'static) -> String {
        self.params.push(Box::new(value));
        format!("${}", self.params.len())
    }

    fn push(&mut self, sql: &str) {
        self.sql.push_str(sql);
    }

    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
    }

    /// Django's `bulk_update` of one column: `CASE WHEN id = … THEN … ELSE NULL END`.
    fn case(&mut self, column: &str, cast: &str, values: Vec<(i64, Box<dyn ToSql + Sync + Send>)>) {
        self.push(&format!("{column} = CASE"));
        for (id, value) in values {
            let id = self.bind(id);
            self.params.push(value);
            self.push(&format!(" WHEN (id = {id}) THEN ${}::{cast}", self.params.len()));
        }
        self.push(" ELSE NULL END");
    }

    /// ` WHERE id IN (…)`.
    fn where_ids(&mut self, ids: &[i64]) {
        let placeholders: Vec<String> = ids.iter().map(|id| self.bind(*id)).collect();
        self.push(&format!(" WHERE id IN ({})", placeholders.join(", ")));
    }
}

/// A capture of phase 1's second deployment, which `save_results` writes to.
#[derive(Debug, Clone, Copy)]
struct Capture {
    id: i64,
    event: i64,
    deployment: i64,
    project: i64,
}

impl Bench<'_> {
    async fn triggers(&self) -> anyhow::Result<TriggerReport> {
        let args = self.args;
        let (name, url, store) = self.database("triggers").await?;
        let per_night = args.bulk_rows.div_ceil(BULK_NIGHTS).max(1);
        let config = WorldConfig {
            projects: 2,
            deployments_per_project: 1,
            events_per_deployment: BULK_NIGHTS,
            images_per_event: per_night,
        };
        let world = World::new(self.taxonomy, &config);
        let (_, seed_seconds) = self.seed(&store, &world.tables).await?;
        let dj = django(&url).await?;
        // Autovacuum would start at random points of the runs (every bulk run leaves 2×
        // --bulk-rows dead rows); each run starts from an explicit VACUUM instead.
        dj.batch_execute(
            "ALTER TABLE main_sourceimage SET (autovacuum_enabled = false);
             ALTER TABLE main_detection SET (autovacuum_enabled = false);
             ALTER TABLE main_occurrence SET (autovacuum_enabled = false);
             ALTER TABLE main_classification SET (autovacuum_enabled = false);
             ALTER TABLE main_event SET (autovacuum_enabled = false)",
        )
        .await?;
        let triggers = FeedTriggers::find(&dj).await?;
        let bulk = self.bulk_update(&dj, &triggers, (per_night * BULK_NIGHTS) as u64).await?;
        let save = self.save_results(&dj, &triggers, &world).await?;
        let counts = self.count_update(&dj, &triggers, &world, per_night).await?;
        triggers.set(&dj, true).await?;
        drop(dj);
        self.finish(&name, store).await?;
        Ok(TriggerReport {
            captures: world.images.len(),
            bulk_rows: (per_night * BULK_NIGHTS) as u64,
            triggers: triggers.all.len(),
            seed_seconds,
            bulk_update: bulk.overhead("median"),
            save_results: save.overhead("mean"),
            count_update: counts.overhead("median"),
        })
    }

    /// (a) `Deployment.update_children`: the QuerySet UPDATE of every capture of deployment 1
    /// to project 2, committed, and back to project 1.
    async fn bulk_update(&self, dj: &Client, triggers: &FeedTriggers, rows: u64) -> anyhow::Result<Modes> {
        let flip = |project: i64| async move {
            let started = Instant::now();
            dj.batch_execute("BEGIN").await?;
            let n = dj
                .execute("UPDATE main_sourceimage SET project_id = $1 WHERE deployment_id = $2", &[&project, &1i64])
                .await?;
            dj.batch_execute("COMMIT").await?;
            let elapsed = started.elapsed();
            anyhow::ensure!(n == rows, "the bulk UPDATE moved {n} captures, not {rows}");
            anyhow::Ok(elapsed)
        };
        let mut modes = Modes::default();
        let bar = counter_bar(2 * self.args.repeats as u64 + 1, "bulk");
        // Warm-up (untimed), then the runs.
        flip(2).await?;
        flip(1).await?;
        modes.outbox(dj, true).await?;
        modes = Modes::default();
        bar.inc(1);
        for rep in 0..self.args.repeats {
            for on in abba(rep) {
                triggers.set(dj, on).await?;
                dj.batch_execute("VACUUM main_sourceimage").await?;
                modes.push(on, flip(2).await?);
                modes.push(on, flip(1).await?);
                modes.outbox(dj, on).await?;
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        Ok(modes)
    }

    /// (b) `save_results` for one capture, as Django writes it: detections, classifications
    /// and occurrences by `bulk_create` (one multi-row INSERT each), detections linked to
    /// their occurrences and occurrences given their determination by `bulk_update`, the
    /// capture's `save()`; one transaction, committed. Undone after each run.
    async fn save_results(&self, dj: &Client, triggers: &FeedTriggers, world: &World) -> anyhow::Result<Modes> {
        let args = self.args;
        let algorithm = |key: &'static str| async move {
            let row = dj.query_one("SELECT id FROM ml_algorithm WHERE key = $1", &[&key]).await?;
            anyhow::Ok(row.get::<_, i64>(0))
        };
        let (detector, classifier) =
            (algorithm("random-detector").await?, algorithm("random-species-classifier").await?);
        let species: Vec<i64> = self.taxonomy.of_rank(Rank::Species).into_iter().collect();
        let captures: Vec<Capture> = world
            .tables
            .images
            .iter()
            .filter(|(_, i)| i.deployment == Some(2))
            .map(|(id, i)| Capture {
                id: *id,
                event: i.event.unwrap_or(0),
                deployment: 2,
                project: i.project.unwrap_or(0),
            })
            .collect();
        anyhow::ensure!(!captures.is_empty(), "no capture to save results for");
        let mut rng = SmallRng::seed_from_u64(self.args.seed);
        let mut modes = Modes::default();
        let bar = counter_bar((2 * args.repeats * args.save_transactions) as u64, "save");
        let mut n = 0;
        for rep in 0..args.repeats {
            for on in abba(rep) {
                triggers.set(dj, on).await?;
                dj.batch_execute("VACUUM main_detection, main_occurrence, main_classification, main_sourceimage")
                    .await?;
                let last = |table: &'static str| async move {
                    let row = dj.query_one(&format!("SELECT coalesce(max(id), 0) FROM {table}"), &[]).await?;
                    anyhow::Ok(row.get::<_, i64>(0))
                };
                let marks =
                    (last("main_detection").await?, last("main_occurrence").await?, last("main_classification").await?);
                for _ in 0..args.save_transactions {
                    let capture = captures[n % captures.len()];
                    n += 1;
                    let d = save_one(dj, capture, detector, classifier, &species, args, &mut rng).await?;
                    modes.push(on, d);
                    bar.inc(1);
                }
                modes.outbox(dj, on).await?;
                // Undo (untimed), then forget what the undo appended.
                dj.batch_execute("BEGIN").await?;
                dj.execute("DELETE FROM main_classification WHERE id > $1", &[&marks.2]).await?;
                dj.execute("DELETE FROM main_detection WHERE id > $1", &[&marks.0]).await?;
                dj.execute("DELETE FROM main_occurrence WHERE id > $1", &[&marks.1]).await?;
                dj.batch_execute("COMMIT; TRUNCATE tally.change_outbox").await?;
            }
        }
        bar.finish_and_clear();
        Ok(modes)
    }

    /// (c) `update_calculated_fields_for_events`: its `bulk_update` of the counts of
    /// `--count-events` events (no input column), committed.
    async fn count_update(
        &self,
        dj: &Client,
        triggers: &FeedTriggers,
        world: &World,
        per_night: usize,
    ) -> anyhow::Result<Modes> {
        let args = self.args;
        let mut events: Vec<i64> = world.tables.events.keys().copied().collect();
        events.sort_unstable();
        events.truncate(args.count_events);
        let mut statement = Statement::new("UPDATE main_event SET ");
        for (n, column) in ["captures_count", "detections_count", "occurrences_count"].into_iter().enumerate() {
            if n > 0 {
                statement.push(", ");
            }
            let values = events
                .iter()
                .map(|e| (*e, Box::new(if n == 0 { per_night as i32 } else { 0i32 }) as Box<dyn ToSql + Sync + Send>))
                .collect();
            statement.case(column, "int4", values);
        }
        statement.push(", calculated_fields_updated_at = now()");
        statement.where_ids(&events);
        let mut modes = Modes::default();
        let bar = counter_bar((2 * args.repeats * args.count_updates) as u64, "counts");
        for rep in 0..args.repeats {
            for on in abba(rep) {
                triggers.set(dj, on).await?;
                dj.batch_execute("VACUUM main_event").await?;
                for _ in 0..args.count_updates {
                    let started = Instant::now();
                    dj.batch_execute("BEGIN").await?;
                    let n = dj.execute(&statement.sql, &statement.params()).await?;
                    dj.batch_execute("COMMIT").await?;
                    modes.push(on, started.elapsed());
                    anyhow::ensure!(n as usize == events.len(), "the count UPDATE wrote {n} events");
                    bar.inc(1);
                }
                modes.outbox(dj, on).await?;
            }
        }
        bar.finish_and_clear();
        Ok(modes)
    }
}

/// One `save_results` transaction for `capture` (see [`Bench::save_results`]); its time from
/// BEGIN to COMMIT returned.
async fn save_one(
    dj: &Client,
    capture: Capture,
    detector: i64,
    classifier: i64,
    species: &[i64],
    args: &FeedBenchArgs,
    rng: &mut SmallRng,
) -> anyhow::Result<Duration> {
    let n = args.save_size;
    let scores: Vec<Vec<f64>> = (0..n).map(|_| (0..args.score_len).map(|_| rng.random::<f64>()).collect()).collect();
    let taxa: Vec<i64> = (0..n).map(|_| species[rng.random_range(0..species.len())]).collect();
    let mut detections = Statement::new(
        "INSERT INTO main_detection (created_at, updated_at, bbox, \"timestamp\", path, detection_time, \
         source_image_id, detection_algorithm_id) VALUES ",
    );
    for i in 0..n {
        let bbox = detections.bind(serde_json::json!([i as f64 * 10.0, 20.0, i as f64 * 10.0 + 50.0, 80.0]));
        let (image, algorithm) = (detections.bind(capture.id), detections.bind(detector));
        let sep = if i > 0 { ", " } else { "" };
        detections
            .push(&format!("{sep}(now(), now(), {bbox}::jsonb, now(), NULL, now(), {image}::int8, {algorithm}::int8)"));
    }
    detections.push(" RETURNING id");

    let started = Instant::now();
    dj.batch_execute("BEGIN").await?;
    let ids: Vec<i64> = dj.query(&detections.sql, &detections.params()).await?.iter().map(|r| r.get(0)).collect();
    let mut classifications = Statement::new(
        "INSERT INTO main_classification (created_at, updated_at, score, \"timestamp\", algorithm_id, detection_id, \
         taxon_id, logits, scores, terminal) VALUES ",
    );
    for (i, id) in ids.iter().enumerate() {
        let top = scores[i].iter().copied().fold(0.0, f64::max);
        let score = classifications.bind(top);
        let (algorithm, detection, taxon) =
            (classifications.bind(classifier), classifications.bind(*id), classifications.bind(taxa[i]));
        let logits = classifications.bind(scores[i].iter().map(|s| s.max(1e-9).ln()).collect::<Vec<f64>>());
        let vector = classifications.bind(scores[i].clone());
        let sep = if i > 0 { ", " } else { "" };
        classifications.push(&format!(
            "{sep}(now(), now(), {score}::float8, now(), {algorithm}::int8, {detection}::int8, {taxon}::int8, \
             {logits}::float8[], {vector}::float8[], true)"
        ));
    }
    dj.execute(&classifications.sql, &classifications.params()).await?;
    let mut occurrences = Statement::new(
        "INSERT INTO main_occurrence (created_at, updated_at, event_id, deployment_id, project_id) VALUES ",
    );
    for i in 0..ids.len() {
        let (e, d, p) =
            (occurrences.bind(capture.event), occurrences.bind(capture.deployment), occurrences.bind(capture.project));
        let sep = if i > 0 { ", " } else { "" };
        occurrences.push(&format!("{sep}(now(), now(), {e}::int8, {d}::int8, {p}::int8)"));
    }
    occurrences.push(" RETURNING id");
    let occurrence_ids: Vec<i64> =
        dj.query(&occurrences.sql, &occurrences.params()).await?.iter().map(|r| r.get(0)).collect();
    let mut link = Statement::new("UPDATE main_detection SET ");
    link.case(
        "occurrence_id",
        "int8",
        ids.iter().zip(&occurrence_ids).map(|(d, o)| (*d, Box::new(*o) as Box<dyn ToSql + Sync + Send>)).collect(),
    );
    link.where_ids(&ids);
    dj.execute(&link.sql, &link.params()).await?;
    let mut determine = Statement::new("UPDATE main_occurrence SET ");
    determine.case(
        "determination_id",
        "int8",
        occurrence_ids.iter().zip(&taxa).map(|(o, t)| (*o, Box::new(*t) as Box<dyn ToSql + Sync + Send>)).collect(),
    );
    determine.push(", ");
    determine.case(
        "determination_score",
        "float8",
        occurrence_ids
            .iter()
            .zip(&scores)
            .map(|(o, s)| (*o, Box::new(s.iter().copied().fold(0.0, f64::max)) as Box<dyn ToSql + Sync + Send>))
            .collect(),
    );
    determine.where_ids(&occurrence_ids);
    dj.execute(&determine.sql, &determine.params()).await?;
    // SourceImage.save(): every column written, the count recomputed.
    dj.execute(
        "UPDATE main_sourceimage SET created_at = created_at, updated_at = now(), path = path,
                public_base_url = public_base_url, \"timestamp\" = \"timestamp\", width = width, height = height,
                size = size, last_modified = last_modified, checksum = checksum,
                checksum_algorithm = checksum_algorithm, deployment_id = deployment_id, event_id = event_id,
                project_id = project_id, test_image = test_image, uploaded_by_id = uploaded_by_id,
                detections_count = $1
         WHERE id = $2",
        &[&(n as i32), &capture.id],
    )
    .await?;
    dj.batch_execute("COMMIT").await?;
    Ok(started.elapsed())
}

/// A session as Django's: a plain connection, without `tally.origin`, so the triggers see
/// its writes.
async fn django(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.context("connecting as Django")?;
    tokio::spawn(connection);
    Ok(client)
}

// ---------------------------------------------------------------------------------------------
// Phases 2 and 3: edit → counts committed.

/// serve's announcements on [`feed::APPLIED_CHANNEL`], heard on a session of its own: the
/// highest outbox `seq` whose counts are committed, and when it was heard.
struct Applied {
    /// Kept open: dropping it would end the LISTEN.
    _client: Client,
    heard: watch::Receiver<(i64, Instant)>,
    driver: tokio::task::JoinHandle<()>,
}

impl Applied {
    async fn listen(url: &str) -> anyhow::Result<Applied> {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls).await.context("connecting to LISTEN")?;
        let (tx, heard) = watch::channel((0, Instant::now()));
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let at = Instant::now();
                    if let Ok(seq) = n.payload().parse::<i64>() {
                        tx.send_if_modified(|last| {
                            let newer = seq > last.0;
                            if newer {
                                *last = (seq, at);
                            }
                            newer
                        });
                    }
                }
            }
        });
        client.batch_execute(&format!("LISTEN {}", feed::APPLIED_CHANNEL)).await?;
        Ok(Applied { _client: client, heard, driver })
    }

    /// When counts covering outbox entry `seq` were announced, or `None` after `timeout`.
    async fn covering(&mut self, seq: i64, timeout: Duration) -> Option<Instant> {
        match tokio::time::timeout(timeout, self.heard.wait_for(|(s, _)| *s >= seq)).await {
            Ok(Ok(heard)) => Some(heard.1),
            _ => None,
        }
    }
}

impl Drop for Applied {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The feed's totals in the process's metrics recorder (serve records them after each step's
/// commit).
#[derive(Debug, Clone, Copy, Default)]
struct FeedTotals {
    steps: f64,
    step_seconds: f64,
    count_rows: f64,
    reread: f64,
}

impl FeedTotals {
    fn take(metrics: &PrometheusHandle) -> FeedTotals {
        let steps = format!("{}_count", names::FEED_STEP_SECONDS);
        let step_seconds = format!("{}_sum", names::FEED_STEP_SECONDS);
        let mut t = FeedTotals::default();
        for line in metrics.render().lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.rsplit_once(' ') else { continue };
            let Ok(value) = value.parse::<f64>() else { continue };
            let name = key.split('{').next().unwrap_or(key);
            if name == steps {
                t.steps += value;
            } else if name == step_seconds {
                t.step_seconds += value;
            } else if name == names::COUNT_WRITES {
                t.count_rows += value;
            } else if name == names::FEED_ROWS {
                t.reread += value;
            }
        }
        t
    }

    /// The totals once serve has recorded a step after `before`, or as they are after a
    /// second. serve records a step's figures just after its commit (so just after the
    /// announcement), the step's time first and its row counters next, with no wait between:
    /// the totals are read again a few milliseconds after the step's time appears.
    async fn after(metrics: &PrometheusHandle, before: &FeedTotals) -> FeedTotals {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            let now = FeedTotals::take(metrics);
            if now.steps > before.steps {
                tokio::time::sleep(Duration::from_millis(5)).await;
                return FeedTotals::take(metrics);
            }
            if Instant::now() >= deadline {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// The edits timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EditKind {
    /// A human identification: the occurrence's determination set, score 1.0.
    Identification,
    /// `Project.save()` with another score threshold.
    Threshold,
    /// A capture moved to another event of its deployment (a regroup's UPDATE, one row).
    MoveCapture,
    /// One more family in the project's include filter (m2m add).
    IncludeAdd,
    /// That family removed again (m2m remove).
    IncludeRemove,
}

impl EditKind {
    /// The single-row edits of phase 2, in rotation.
    const SINGLE: [EditKind; 3] = [EditKind::Identification, EditKind::Threshold, EditKind::MoveCapture];

    fn label(self) -> &'static str {
        match self {
            EditKind::Identification => "identification (occurrence determination, score 1.0)",
            EditKind::Threshold => "project score threshold 0.5 ↔ 0.6",
            EditKind::MoveCapture => "capture moved to another event",
            EditKind::IncludeAdd => "include taxon added (one more family)",
            EditKind::IncludeRemove => "include taxon removed again",
        }
    }
}

/// One timed edit.
#[derive(Debug, Clone)]
struct Sample {
    kind: EditKind,
    /// When its COMMIT returned.
    committed: Instant,
    /// COMMIT returned → counts announced; `None`: not within `--edit-timeout`.
    latency: Option<Duration>,
    /// serve's feed steps (read → commit) meanwhile, seconds.
    step_seconds: f64,
    /// Count rows written meanwhile (by the feed, and by ingest when it runs).
    count_rows: f64,
    /// Input rows the feed re-read.
    reread: f64,
}

/// Runs `statement` in a transaction of the Django session `dj`, reads the `seq` of the
/// outbox entry it appended before COMMIT, and times COMMIT returned → the announcement of
/// counts covering that entry.
async fn timed_edit(
    dj: &mut Client,
    applied: &mut Applied,
    metrics: &PrometheusHandle,
    kind: EditKind,
    statement: &Statement,
    timeout: Duration,
) -> anyhow::Result<Sample> {
    let before = FeedTotals::take(metrics);
    let tx = dj.transaction().await?;
    let last: Option<i64> = tx.query_one(MAX_SEQ, &[]).await?.get(0);
    tx.execute(&statement.sql, &statement.params()).await.with_context(|| statement.sql.clone())?;
    let seq: Option<i64> = tx.query_one(MAX_SEQ, &[]).await?.get(0);
    let Some(seq) = seq.filter(|s| Some(*s) > last) else {
        anyhow::bail!("the edit appended nothing to the outbox: {}", statement.sql)
    };
    tx.commit().await?;
    let committed = Instant::now();
    let latency = applied.covering(seq, timeout).await.map(|at| at.saturating_duration_since(committed));
    let after = if latency.is_some() { FeedTotals::after(metrics, &before).await } else { FeedTotals::take(metrics) };
    Ok(Sample {
        kind,
        committed,
        latency,
        step_seconds: after.step_seconds - before.step_seconds,
        count_rows: after.count_rows - before.count_rows,
        reread: after.reread - before.reread,
    })
}

/// Latency of a set of edits.
#[derive(Debug, Serialize)]
pub struct Summary {
    /// Which edits.
    pub edit: String,
    /// Edits made.
    pub edits: usize,
    /// Edits whose counts were announced in time.
    pub counted: usize,
    /// COMMIT → counts committed, ms (`null`: not counted in time).
    pub p50_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Slowest, ms.
    pub max_ms: f64,
    /// Mean, ms.
    pub mean_ms: f64,
    /// serve's feed step (read → commit) per edit: median, ms.
    pub step_p50_ms: f64,
    /// And 99th percentile, ms.
    pub step_p99_ms: f64,
    /// Count rows written per edit (mean).
    pub count_rows: f64,
    /// Input rows re-read per edit (mean).
    pub reread: f64,
}

impl Summary {
    fn of(edit: &str, samples: &[&Sample]) -> Summary {
        let ms: Vec<f64> = samples.iter().map(|s| s.latency.map_or(f64::INFINITY, |d| d.as_secs_f64() * 1e3)).collect();
        let steps: Vec<f64> = samples.iter().map(|s| s.step_seconds * 1e3).collect();
        let n = samples.len().max(1) as f64;
        Summary {
            edit: edit.to_string(),
            edits: samples.len(),
            counted: samples.iter().filter(|s| s.latency.is_some()).count(),
            p50_ms: quantile(&ms, 0.5),
            p95_ms: quantile(&ms, 0.95),
            p99_ms: quantile(&ms, 0.99),
            max_ms: quantile(&ms, 1.0),
            mean_ms: mean(&ms),
            step_p50_ms: quantile(&steps, 0.5),
            step_p99_ms: quantile(&steps, 0.99),
            count_rows: samples.iter().map(|s| s.count_rows).sum::<f64>() / n,
            reread: samples.iter().map(|s| s.reread).sum::<f64>() / n,
        }
    }

    /// "all" and one summary per kind present, in `kinds` order.
    fn by_kind(samples: &[Sample], kinds: &[EditKind]) -> Vec<Summary> {
        let mut out = vec![Summary::of("all", &samples.iter().collect::<Vec<_>>())];
        for kind in kinds {
            let these: Vec<&Sample> = samples.iter().filter(|s| s.kind == *kind).collect();
            if !these.is_empty() {
                out.push(Summary::of(kind.label(), &these));
            }
        }
        out
    }
}

/// Nearest-rank quantile (`INFINITY` sorts last; 0 without values).
fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// The rows phase 2's edits pick from, kept current as they edit.
struct EditWorld {
    rng: SmallRng,
    species: Vec<Id>,
    /// `(occurrence, determination)`.
    occurrences: Vec<(Id, Id)>,
    /// `(project, threshold)`.
    thresholds: Vec<(Id, f64)>,
    next_project: usize,
    /// `(capture, event, deployment)` of the captures with detections.
    captures: Vec<(Id, Id, Id)>,
    /// Events of each deployment.
    nights: HashMap<Id, Vec<Id>>,
}

impl EditWorld {
    fn new(tables: &Tables, preloaded: &InputBatch, species: Vec<Id>, seed: u64) -> EditWorld {
        let occurrences =
            preloaded.occurrences.iter().filter_map(|(id, o)| Some((*id, o.as_ref()?.determination?))).collect();
        let captures = preloaded
            .images
            .iter()
            .filter_map(|(id, i)| {
                let i = i.as_ref()?;
                Some((*id, i.event?, i.deployment?))
            })
            .collect();
        let mut projects: Vec<(Id, f64)> = tables.projects.iter().map(|(id, p)| (*id, p.threshold.get())).collect();
        projects.sort_by_key(|(id, _)| *id);
        let mut nights: HashMap<Id, Vec<Id>> = HashMap::new();
        for (id, e) in &tables.events {
            if let Some(d) = e.deployment {
                nights.entry(d).or_default().push(*id);
            }
        }
        EditWorld {
            rng: SmallRng::seed_from_u64(seed),
            species,
            occurrences,
            thresholds: projects,
            next_project: 0,
            captures,
            nights,
        }
    }

    /// The next edit of `kind`, as the SQL Django sends for it.
    fn next(&mut self, kind: EditKind) -> Statement {
        match kind {
            EditKind::Identification => {
                let i = self.rng.random_range(0..self.occurrences.len());
                let (occurrence, current) = self.occurrences[i];
                let mut taxon = current;
                while taxon == current && self.species.len() > 1 {
                    taxon = self.species[self.rng.random_range(0..self.species.len())];
                }
                self.occurrences[i].1 = taxon;
                let mut s = Statement::new("");
                let (t, o) = (s.bind(taxon), s.bind(occurrence));
                s.push(&format!(
                    "UPDATE main_occurrence SET determination_id = {t}, determination_score = 1.0, updated_at = now() WHERE id = {o}"
                ));
                s
            }
            EditKind::Threshold => {
                let i = self.next_project % self.thresholds.len();
                self.next_project += 1;
                threshold_edit(&mut self.thresholds[i])
            }
            EditKind::MoveCapture => {
                let i = self.rng.random_range(0..self.captures.len());
                let (capture, event, deployment) = self.captures[i];
                let nights = &self.nights[&deployment];
                let mut to = event;
                while to == event && nights.len() > 1 {
                    to = nights[self.rng.random_range(0..nights.len())];
                }
                self.captures[i].1 = to;
                let mut s = Statement::new("");
                let (e, c) = (s.bind(to), s.bind(capture));
                s.push(&format!("UPDATE main_sourceimage SET event_id = {e}, updated_at = now() WHERE id = {c}"));
                s
            }
            EditKind::IncludeAdd | EditKind::IncludeRemove => {
                unreachable!("phase 2 makes single-row edits only")
            }
        }
    }
}

/// `Project.save()` with the other threshold (0.5 ↔ 0.6); updates `project`.
fn threshold_edit(project: &mut (Id, f64)) -> Statement {
    let to = if project.1 < 0.55 { 0.6 } else { 0.5 };
    project.1 = to;
    let mut s = Statement::new("");
    let (t, p) = (s.bind(to), s.bind(project.0));
    s.push(&format!(
        "UPDATE main_project SET default_filters_score_threshold = {t}, updated_at = now() WHERE id = {p}"
    ));
    s
}

/// Results of the series under ingest: each reply subject's publish instant.
struct Published {
    sent: HashMap<String, Instant>,
    /// Every prepared result was published before the edits ended.
    exhausted: bool,
}

/// Publishes results for `tasks` at `rate` (bench ingest's paced publisher, a second's worth
/// at a time) until `stop` or the tasks run out.
fn spawn_publisher(
    js: jetstream::Context,
    nats: NatsArgs,
    factory: ResultFactory,
    tasks: Vec<(i64, Task)>,
    rate: f64,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<Published>> {
    tokio::spawn(async move {
        let bar = ProgressBar::hidden();
        let objects =
            tally::results_stream::ensure_bucket(&js, &nats.results_object_bucket, Duration::from_secs(3600)).await?;
        let max_payload = js.client().server_info().max_payload;
        let to = publish::Target { js: &js, nats: &nats, objects: &objects, max_payload };
        let mut sent = HashMap::with_capacity(tasks.len());
        for chunk in tasks.chunks((rate.ceil() as usize).max(1)) {
            if stop.is_cancelled() {
                return Ok(Published { sent, exhausted: false });
            }
            let (published, _) = publish::paced(&to, &factory, chunk, rate, &bar).await?;
            sent.extend(published);
        }
        Ok(Published { sent, exhausted: !stop.is_cancelled() })
    })
}

/// Phase 2's figures.
#[derive(Debug, Serialize)]
pub struct EditsReport {
    /// Projects (one deployment each).
    pub projects: usize,
    /// Valid detections in the world before the run.
    pub detections: usize,
    /// Captures in the world.
    pub captures: usize,
    /// Seeding, seconds.
    pub seed_seconds: f64,
    /// serve's bootstrap, seconds.
    pub bootstrap_seconds: f64,
    /// Series (i): alone.
    pub alone: Vec<Summary>,
    /// Series (ii): under ingest.
    pub under_ingest: Vec<Summary>,
    /// Edits of series (ii) committed while results were being published.
    pub edits_while_publishing: usize,
    /// Publish rate asked, results/s.
    pub ingest_rate: f64,
    /// Publish rate achieved.
    pub ingest_rate_achieved: f64,
    /// Results published (and saved) during series (ii).
    pub results: usize,
    /// Every prepared result was used before the edits ended (the later edits ran without
    /// ingest).
    pub results_exhausted: bool,
    /// Publish → ack of those results, ms: median.
    pub ingest_p50_ms: f64,
    /// And 99th percentile, ms.
    pub ingest_p99_ms: f64,
    /// Outbox entries left at the end (0: every edit applied).
    pub outbox_left: i64,
    /// Every stored count equals `verify` at the end.
    pub counts_exact: bool,
}

impl Bench<'_> {
    async fn edits(&self) -> anyhow::Result<EditsReport> {
        let args = self.args;
        let (name, url, store) = self.database("edits").await?;
        let series_seconds = args.edit_interval.as_secs_f64() * args.edits as f64;
        let pool = ((args.ingest_rate * series_seconds.max(1.0) * POOL_MARGIN).ceil() as usize).max(1);
        let config = WorldConfig {
            projects: args.projects,
            deployments_per_project: 1,
            events_per_deployment: NIGHTS,
            images_per_event: pool.div_ceil(args.projects * NIGHTS).max(1),
        };
        let world = World::new(self.taxonomy, &config);
        let species = self.taxonomy.of_rank(Rank::Species);
        let preloaded = preload(&world, &species, args.project_detections, args.seed);
        let mut tables = world.tables.clone();
        tables.apply(&preloaded);
        let (pipeline, seed_seconds) = self.seed(&store, &tables).await?;
        let mut edits = EditWorld::new(&tables, &preloaded, species, args.seed);
        let detections = tables.detections.values().filter(|d| d.valid).count();
        let captures = tables.images.len();
        drop(tables);

        let (mut ingest, nats_args, bootstrap_seconds) = self.serve(&store, "edits").await?;
        let js = jetstream::new(nats_args.connect().await?);
        let tasks = dispatch_jobs(&store, &js, pipeline, &world.images[..pool.min(world.images.len())], |job| {
            self.register(&job.stream_name())
        })
        .await?;
        let mut applied = Applied::listen(&url).await?;
        let mut dj = django(&url).await?;
        // Warm-up (untimed): serve's LISTEN session is up and every kind goes through.
        for kind in EditKind::SINGLE {
            let s =
                timed_edit(&mut dj, &mut applied, &self.metrics, kind, &edits.next(kind), args.edit_timeout).await?;
            anyhow::ensure!(s.latency.is_some(), "serve did not apply a warm-up edit within {:?}", args.edit_timeout);
        }

        let alone = self.series(&mut dj, &mut applied, &mut edits, "alone").await?;

        let factory = ResultFactory {
            species: world.species.clone(),
            keys: ResultKeys::antenna_test(PIPELINE),
            mean_detections: 8.0,
            score_len: args.score_len,
            seed: args.seed,
        };
        let stop = CancellationToken::new();
        let publisher = spawn_publisher(js, nats_args.clone(), factory, tasks, args.ingest_rate, stop.clone());
        // Ingest is consuming before the first edit.
        let mut acked: Vec<Acked> = ingest.wait_for(1, &ProgressBar::hidden()).await?;
        let loaded = self.series(&mut dj, &mut applied, &mut edits, "ingest").await?;
        stop.cancel();
        let published = publisher.await.context("the publisher panicked")??;
        let saved: usize = acked.iter().map(|a| a.reply_subjects.len()).sum();
        let bar = counter_bar(published.sent.len().saturating_sub(saved) as u64, "saving");
        acked.extend(ingest.wait_for(published.sent.len().saturating_sub(saved), &bar).await?);
        bar.finish_and_clear();

        let first = published.sent.values().min().copied();
        let last = published.sent.values().max().copied();
        let edits_while_publishing = match (first, last) {
            (Some(first), Some(last)) => loaded.iter().filter(|s| s.committed >= first && s.committed <= last).count(),
            _ => 0,
        };
        let achieved = match (first, last) {
            (Some(first), Some(last)) if published.sent.len() > 1 && last > first => {
                (published.sent.len() - 1) as f64 / last.duration_since(first).as_secs_f64()
            }
            _ => 0.0,
        };
        let mut ingest_ms = Vec::new();
        for batch in &acked {
            for subject in &batch.reply_subjects {
                if let Some(sent) = published.sent.get(subject) {
                    ingest_ms.push(batch.at.saturating_duration_since(*sent).as_secs_f64() * 1e3);
                }
            }
        }

        let s = spinner("verify: every stored count against SQL".into());
        let outbox_left = feed::backlog(&store.client().await?).await?;
        let v = verify::verify(&store, Scope::default()).await?;
        s.finish_and_clear();
        ingest.stop().await;
        drop(applied);
        drop(dj);
        self.finish(&name, store).await?;
        Ok(EditsReport {
            projects: args.projects,
            detections,
            captures,
            seed_seconds,
            bootstrap_seconds,
            alone: Summary::by_kind(&alone, &EditKind::SINGLE),
            under_ingest: Summary::by_kind(&loaded, &EditKind::SINGLE),
            edits_while_publishing,
            ingest_rate: args.ingest_rate,
            ingest_rate_achieved: achieved,
            results: published.sent.len(),
            results_exhausted: published.exhausted,
            ingest_p50_ms: quantile(&ingest_ms, 0.5),
            ingest_p99_ms: quantile(&ingest_ms, 0.99),
            outbox_left,
            counts_exact: v.differences.is_empty(),
        })
    }

    /// `--edits` single-row edits, in rotation, one every `--edit-interval`.
    async fn series(
        &self,
        dj: &mut Client,
        applied: &mut Applied,
        edits: &mut EditWorld,
        label: &str,
    ) -> anyhow::Result<Vec<Sample>> {
        let args = self.args;
        let bar = counter_bar(args.edits as u64, label);
        let start = tokio::time::Instant::now();
        let mut samples = Vec::with_capacity(args.edits);
        for i in 0..args.edits {
            tokio::time::sleep_until(start + args.edit_interval.mul_f64(i as f64)).await;
            let kind = EditKind::SINGLE[i % EditKind::SINGLE.len()];
            let statement = edits.next(kind);
            samples.push(timed_edit(dj, applied, &self.metrics, kind, &statement, args.edit_timeout).await?);
            bar.inc(1);
        }
        bar.finish_and_clear();
        Ok(samples)
    }
}

/// Phase 3's figures.
#[derive(Debug, Serialize)]
pub struct LargeReport {
    /// Valid detections of the project.
    pub detections: usize,
    /// Captures.
    pub captures: usize,
    /// Seeding, seconds.
    pub seed_seconds: f64,
    /// serve's bootstrap (dataflow loaded, every count written), seconds.
    pub bootstrap_seconds: f64,
    /// Per kind of edit.
    pub edits: Vec<Summary>,
    /// Every stored count equals `verify` at the end.
    pub counts_exact: bool,
}

impl Bench<'_> {
    async fn large(&self) -> anyhow::Result<LargeReport> {
        let args = self.args;
        let (name, url, store) = self.database("large").await?;
        let config =
            WorldConfig { projects: 1, deployments_per_project: 1, events_per_deployment: NIGHTS, images_per_event: 1 };
        let world = World::new(self.taxonomy, &config);
        let species = self.taxonomy.of_rank(Rank::Species);
        let mut tables = world.tables.clone();
        tables.apply(&preload(&world, &species, args.large_detections, args.seed));
        let (_, seed_seconds) = self.seed(&store, &tables).await?;
        let detections = tables.detections.values().filter(|d| d.valid).count();
        let captures = tables.images.len();
        let included: Vec<Id> = tables.include_taxa.values().map(|f| f.taxon).collect();
        drop(tables);
        let families = self.taxonomy.of_rank(Rank::Family);
        let Some(family) = families.iter().copied().find(|f| !included.contains(f)) else {
            anyhow::bail!("every family is already included")
        };

        let (ingest, _, bootstrap_seconds) = self.serve(&store, "large").await?;
        let mut applied = Applied::listen(&url).await?;
        let mut dj = django(&url).await?;
        let bar = counter_bar(3 * args.large_repeats as u64, "filters");
        let mut samples = Vec::new();
        let mut project: (Id, f64) = (1, 0.5);
        for _ in 0..args.large_repeats {
            let statement = threshold_edit(&mut project);
            samples.push(
                timed_edit(&mut dj, &mut applied, &self.metrics, EditKind::Threshold, &statement, args.edit_timeout)
                    .await?,
            );
            bar.inc(1);
        }
        for _ in 0..args.large_repeats {
            for kind in [EditKind::IncludeAdd, EditKind::IncludeRemove] {
                let mut s = Statement::new("");
                let (p, t) = (s.bind(1i64), s.bind(family));
                s.push(&if kind == EditKind::IncludeAdd {
                    format!(
                        "INSERT INTO main_project_default_filters_include_taxa (project_id, taxon_id) VALUES ({p}, {t})
                         ON CONFLICT DO NOTHING"
                    )
                } else {
                    format!("DELETE FROM main_project_default_filters_include_taxa WHERE project_id = {p} AND taxon_id IN ({t})")
                });
                samples.push(timed_edit(&mut dj, &mut applied, &self.metrics, kind, &s, args.edit_timeout).await?);
                bar.inc(1);
            }
        }
        bar.finish_and_clear();
        let s = spinner("verify: every stored count against SQL".into());
        let v = verify::verify(&store, Scope::default()).await?;
        s.finish_and_clear();
        ingest.stop().await;
        drop(applied);
        drop(dj);
        self.finish(&name, store).await?;
        let kinds = [EditKind::Threshold, EditKind::IncludeAdd, EditKind::IncludeRemove];
        let edits = Summary::by_kind(&samples, &kinds).into_iter().skip(1).collect();
        Ok(LargeReport {
            detections,
            captures,
            seed_seconds,
            bootstrap_seconds,
            edits,
            counts_exact: v.differences.is_empty(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The report.

/// A latency in ms as a short string ("not counted" when an edit timed out).
fn ms(v: f64) -> String {
    if v.is_finite() {
        human_us(v * 1e3)
    } else {
        "not counted".into()
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "pass"
    } else {
        "**fail**"
    }
}

fn yes(ok: bool) -> &'static str {
    if ok {
        "yes"
    } else {
        "**no**"
    }
}

/// The markdown report.
pub fn render(args: &FeedBenchArgs, r: &Report) -> String {
    let mut out = format!(
        "`tally-tools bench feed --bulk-rows {} --save-size {} --save-transactions {} --count-events {} --count-updates {} \
         --repeats {} --edits {} --edit-interval {} --ingest-rate {} --projects {} --project-detections {} \
         --large-detections {} --large-repeats {} --score-len {} -w {}`\n\n",
        args.bulk_rows,
        args.save_size,
        args.save_transactions,
        args.count_events,
        args.count_updates,
        args.repeats,
        args.edits,
        humantime::format_duration(args.edit_interval),
        args.ingest_rate,
        args.projects,
        args.project_detections,
        args.large_detections,
        args.large_repeats,
        args.score_len,
        args.workers,
    );
    let t = &r.triggers;
    out.push_str(&format!(
        "### 1. Trigger overhead on Django's statements\n\n\
         A Django-like session (plain connection, no `tally.origin`) on {} captures in 2 deployments × {BULK_NIGHTS} \
         nights (seeded in {:.1} s). Runs alternate (ABBA) between the {} feed triggers enabled and disabled \
         (`ALTER TABLE … DISABLE TRIGGER tally_feed_insert|update|delete`), each run after a `VACUUM` of the tables \
         it writes (autovacuum off on them); every transaction commits, and its changes are undone outside the \
         timing. Times run from BEGIN to COMMIT returned, deferred foreign-key checks included.\n\n",
        thousands(t.captures as i64),
        t.seed_seconds,
        t.triggers
    ));
    out.push_str(
        "| Django statement | transactions per mode | with triggers | without | ratio | outbox per transaction |\n",
    );
    out.push_str("|---|---:|---:|---:|---:|---|\n");
    let overhead_rows = [
        (
            format!(
                "(a) `Deployment.update_children`: `UPDATE main_sourceimage SET project_id = … WHERE deployment_id = …` over {} captures (median)",
                thousands(t.bulk_rows as i64)
            ),
            &t.bulk_update,
        ),
        (
            format!(
                "(b) `save_results` for one capture: {n} detections, {n} classifications ({} scores), {n} occurrences (`bulk_create`: one multi-row INSERT each), detections linked and determinations set (two `bulk_update`s), the capture's `save()` (mean)",
                args.score_len,
                n = args.save_size
            ),
            &t.save_results,
        ),
        (
            format!(
                "(c) `update_calculated_fields_for_events`: `bulk_update` of {} events' counts, no input column (median)",
                args.count_events
            ),
            &t.count_update,
        ),
    ];
    for (what, o) in &overhead_rows {
        out.push_str(&format!(
            "| {what} | {} | {} | {} | {:.2}× | {} |\n",
            thousands(o.samples as i64),
            ms(o.with_ms),
            ms(o.without_ms),
            o.ratio,
            if o.entries_per_transaction == 0.0 {
                "none".to_string()
            } else {
                format!(
                    "{:.1} entries, {} ids",
                    o.entries_per_transaction,
                    thousands(o.ids_per_transaction.round() as i64)
                )
            }
        ));
    }

    let e = &r.edits;
    out.push_str(&format!(
        "\n### 2. Single-row edit → counts committed\n\n\
         serve's ingest loop (with the change feed) in-process over {} projects × 1 deployment × {NIGHTS} nights: \
         {} detections, {} captures (seeded in {:.1} s; bootstrap {:.1} s). Each edit is its own transaction in the \
         Django-like session; the latency runs from its COMMIT returned to the `{}` notification whose seq covers \
         the edit's outbox entry (read inside the edit's transaction), heard on a separate LISTEN session. Edits \
         rotate through the kinds below, one every {}. \"feed step\" is serve's read → commit of the step that \
         applied the edit (its own metric); the rest is the wake-up (NOTIFY delivery, and under ingest the batch \
         in hand).\n\n",
        e.projects,
        thousands(e.detections as i64),
        thousands(e.captures as i64),
        e.seed_seconds,
        e.bootstrap_seconds,
        feed::APPLIED_CHANNEL,
        humantime::format_duration(args.edit_interval),
    ));
    out.push_str("| series | edit | edits | counted | p50 | p95 | p99 | max | feed step p50 / p99 |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---:|---:|---:|\n");
    let ingest_label = format!("under ingest ({} results/s)", e.ingest_rate);
    for (series, summaries) in [("alone", &e.alone), (ingest_label.as_str(), &e.under_ingest)] {
        for s in summaries.iter() {
            out.push_str(&format!(
                "| {series} | {} | {} | {} | {} | {} | {} | {} | {} / {} |\n",
                s.edit,
                s.edits,
                s.counted,
                ms(s.p50_ms),
                ms(s.p95_ms),
                ms(s.p99_ms),
                ms(s.max_ms),
                ms(s.step_p50_ms),
                ms(s.step_p99_ms)
            ));
        }
    }
    out.push_str(&format!(
        "\nUnder ingest: {} results published at {:.0}/s (asked {}), every one saved; publish → ack p50 {}, p99 {}; \
         {} of {} edits committed while results were being published{}. Outbox entries left: {}. Counts = verify \
         afterwards: {}.\n",
        thousands(e.results as i64),
        e.ingest_rate_achieved,
        e.ingest_rate,
        ms(e.ingest_p50_ms),
        ms(e.ingest_p99_ms),
        e.edits_while_publishing,
        e.under_ingest.first().map_or(0, |s| s.edits),
        if e.results_exhausted { " (the prepared results ran out first)" } else { "" },
        e.outbox_left,
        yes(e.counts_exact),
    ));

    let l = &r.large;
    out.push_str(&format!(
        "\n### 3. Filter edits on a project of {} detections\n\n\
         1 project, 1 deployment, {NIGHTS} nights, {} captures (seeded in {:.1} s; serve's bootstrap, every count \
         written, {:.1} s); the project includes half of the 10 families at threshold 0.5. Each edit from the \
         Django-like session, timed as above; count rows written are serve's (`{}`).\n\n",
        thousands(l.detections as i64),
        thousands(l.captures as i64),
        l.seed_seconds,
        l.bootstrap_seconds,
        names::COUNT_WRITES,
    ));
    out.push_str("| edit | edits | counted | mean | max | feed step p50 | count rows written per edit | input rows re-read per edit |\n");
    out.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for s in &l.edits {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            s.edit,
            s.edits,
            s.counted,
            ms(s.mean_ms),
            ms(s.max_ms),
            ms(s.step_p50_ms),
            thousands(s.count_rows.round() as i64),
            thousands(s.reread.round() as i64),
        ));
    }
    out.push_str(&format!("\nCounts = verify afterwards: {}.\n", yes(l.counts_exact)));

    out.push_str("\n### Goals (issue 10)\n\n| goal | measured | |\n|---|---|---|\n");
    let goal_ms = GOAL.as_secs_f64() * 1e3;
    for (what, s) in [("alone", e.alone.first()), ("under ingest", e.under_ingest.first())] {
        if let Some(s) = s {
            out.push_str(&format!(
                "| single-row edit → counts committed, p99 ≤ 1 s, {what} | p99 {} ({} of {} counted) | {} |\n",
                ms(s.p99_ms),
                s.counted,
                s.edits,
                verdict(s.p99_ms <= goal_ms && s.counted == s.edits)
            ));
        }
    }
    for s in &l.edits {
        out.push_str(&format!(
            "| filter edit on {} detections ≤ 1 s: {} | max {} of {} | {} |\n",
            thousands(l.detections as i64),
            s.edit,
            ms(s.max_ms),
            s.edits,
            verdict(s.max_ms <= goal_ms && s.counted == s.edits)
        ));
    }
    for (what, o) in [
        ("(a) bulk UPDATE", &t.bulk_update),
        ("(b) save_results", &t.save_results),
        ("(c) count-only UPDATE", &t.count_update),
    ] {
        let status = match args.trigger_goal {
            Some(goal) => format!("{} (≤ {goal:.2}×)", verdict(o.ratio <= goal)),
            None => "no threshold given (`--trigger-goal`)".into(),
        };
        out.push_str(&format!("| trigger overhead {what}: with / without | {:.2}× | {status} |\n", o.ratio));
    }
    out
}
