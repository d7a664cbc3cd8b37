//! `tally job create|status|cancel|logs`: create an Antenna async ML job and publish its tasks,
//! see what a job is doing, cancel it as Antenna does, and read (or follow) its log.

use std::process::ExitCode;
use std::time::Duration;

use async_nats::jetstream;
use clap::{Args, Subcommand};

use crate::config::{DbArgs, NatsArgs};
use crate::jobs::cancel::{self, Cleanup};
use crate::jobs::cleanup;
use crate::jobs::create::{self, Images, JobSpec, MISSING_URL_BASE};
use crate::jobs::logs::{self, JobLogs, JobLogsConfig, Level};
use crate::jobs::queue::QueueSettings;
use crate::jobs::status::{self, JobStatus, Queue};
use crate::jobs::{consumer_name, stream_name, JobError};
use crate::store::{self, Store};
use crate::table::{thousands, Table};

/// The job commands.
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Create an async ML job as Antenna does: a jobs_job row (dispatch_mode async_api,
    /// STARTED, collect stage done), stream job_{id} on subject job.{id}.tasks, durable pull
    /// consumer job-{id}-consumer with Antenna's settings, and one task per image published
    /// concurrently. Workers then claim it through the gateway and `tally serve` ingests the
    /// results. Prints the job id.
    Create(CreateArgs),
    /// Show a job: status, progress stages and their parameters, the images tally has results
    /// for (tally.job_image), and its task queue (tasks pending, awaiting ack, redelivered).
    Status(StatusArgs),
    /// Cancel a job as Antenna's Job.cancel does: move it to REVOKED unless it already finished
    /// (a finished job keeps its status), then delete its NATS consumer and stream. Results
    /// still in flight are saved but no longer move its progress. Cancelling twice is harmless.
    Cancel(CancelArgs),
    /// Print a job's log (jobs_joblog) as Antenna shows it, oldest first; `--follow` keeps
    /// printing new lines until Ctrl-C.
    Logs(LogsArgs),
}

/// Options of `tally job create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// NATS options.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Process the images of this deployment, in Antenna's order (event start, then capture
    /// time). The job's project is the deployment's.
    #[arg(long, required_unless_present = "images", conflicts_with = "images")]
    pub deployment: Option<i64>,
    /// With --deployment: only the first N images (jobs_job.limit).
    #[arg(long, requires = "deployment", value_parser = clap::value_parser!(i64).range(1..))]
    pub limit: Option<i64>,
    /// Process these images (comma-separated ids), in this order. The job's project is theirs.
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    pub images: Vec<i64>,
    /// The pipeline (ml_pipeline.slug) workers run.
    #[arg(long)]
    pub pipeline: String,
    /// jobs_job.project_id, when it cannot be derived (images of several projects, or none).
    #[arg(long)]
    pub project: Option<i64>,
    /// jobs_job.name (default: "<pipeline> on deployment <id>" or "<pipeline> on <n> images").
    #[arg(long)]
    pub name: Option<String>,
    /// How long a worker may hold a task before it is delivered again (consumer ack_wait; a
    /// bare number is seconds).
    #[arg(long, env = "NATS_TASK_TTR", value_parser = crate::duration::parse_secs, default_value = "300")]
    pub ack_wait: Duration,
    /// Deliveries of one task (consumer max_deliver; -1: unlimited).
    #[arg(long, env = "NATS_MAX_DELIVER", default_value_t = 2, allow_negative_numbers = true)]
    pub max_deliver: i64,
    /// Tasks of the job held unacked at once (consumer max_ack_pending).
    #[arg(long, env = "NATS_MAX_ACK_PENDING", default_value_t = 1000)]
    pub max_ack_pending: i64,
    /// Base of the task URL of images whose public_base_url is NULL (the task URL is
    /// public_base_url joined with path, as Antenna builds it).
    #[arg(long, env = "TALLY_MISSING_URL_BASE", default_value = MISSING_URL_BASE)]
    pub missing_url_base: String,
    /// Print the created job as JSON.
    #[arg(long)]
    pub json: bool,
    /// Django's query cache, invalidated for the tables the job's creation wrote.
    #[command(flatten)]
    pub django_cache: crate::django_cache::DjangoCacheArgs,
}

/// Options of `tally job status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// NATS options (the queue is shown as unknown when NATS does not answer).
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The job (jobs_job.id).
    pub id: i64,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Options of `tally job cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// NATS options.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The job (jobs_job.id).
    pub id: i64,
    /// Django's query cache, invalidated for the tables the cancellation wrote.
    #[command(flatten)]
    pub django_cache: crate::django_cache::DjangoCacheArgs,
}

/// Options of `tally job logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// The job (jobs_job.id).
    pub id: i64,
    /// Only lines at this level or above: DEBUG, INFO, WARNING, ERROR or CRITICAL.
    #[arg(long, default_value = "DEBUG")]
    pub level: Level,
    /// The newest N lines (Antenna's API shows 1000 by default).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..))]
    pub limit: i64,
    /// Keep printing lines as they are written, until Ctrl-C (polls for rows with a higher id).
    #[arg(long, short)]
    pub follow: bool,
    /// With --follow: the pause between polls (a bare number is milliseconds).
    #[arg(long, alias = "poll-ms", value_parser = crate::duration::parse_millis, default_value = "500ms")]
    pub poll: Duration,
}

/// Runs a job command.
pub async fn run(command: JobCommand) -> anyhow::Result<ExitCode> {
    match command {
        JobCommand::Create(args) => create(args).await,
        JobCommand::Status(args) => status(args).await,
        JobCommand::Cancel(args) => cancel(args).await,
        JobCommand::Logs(args) => logs(args).await,
    }
}

async fn open(db: &DbArgs) -> anyhow::Result<Store> {
    let store = store::connect(db).await?;
    store::check::check_schema(&store).await?;
    Ok(store)
}

async fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args.db).await?;
    let client = args.nats.connect().await?;
    let js = jetstream::new(client.clone());
    let images = match args.deployment {
        Some(id) => Images::Deployment { id, limit: args.limit },
        None => Images::List(args.images.clone()),
    };
    let mut spec = JobSpec::new(images, args.pipeline.clone());
    spec.project = args.project;
    spec.name = args.name.clone();
    spec.missing_url_base = args.missing_url_base.clone();
    spec.queue = QueueSettings {
        ack_wait: args.ack_wait,
        max_deliver: args.max_deliver,
        max_ack_pending: args.max_ack_pending,
        ..QueueSettings::default()
    };
    let (logs, writer) = JobLogs::start(store.clone(), JobLogsConfig::default());
    let created = create::create(&store, &js, &logs, &spec).await;
    let written = writer.shutdown().await;
    if written.dropped + written.failed > 0 {
        eprintln!("warning: {} job log lines could not be written", written.dropped + written.failed);
    }
    let job = created?;
    crate::django_cache::invalidate_once(&args.django_cache, &["jobs_job", "jobs_joblog"]).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
        return Ok(ExitCode::SUCCESS);
    }
    let scope = match job.deployment {
        Some(d) => format!("deployment {d}"),
        None => "an image list".into(),
    };
    println!("job {} created: {:?}, pipeline {}, project {}, {scope}", job.id, job.name, job.pipeline, job.project);
    match &job.stream {
        None => println!("no images to process: the job is {}", job.status),
        Some(stream) => {
            println!(
                "{} tasks published to stream {stream} (subject {}) in {:.0} ms",
                thousands(job.tasks as i64),
                job.subject,
                job.publish_seconds * 1000.0
            );
            println!(
                "consumer {}: ack_wait {} s, max_deliver {}, max_ack_pending {}",
                job.consumer, job.ack_wait_seconds, job.max_deliver, job.max_ack_pending
            );
        }
    }
    if job.replaced_stale_stream {
        println!("note: a stale stream {} of an earlier job with this id was deleted first", stream_name(job.id));
    }
    Ok(ExitCode::SUCCESS)
}

async fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args.db).await?;
    let client = match args.nats.connect().await {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("warning: {e}; the task queue is not shown");
            None
        }
    };
    let js = client.map(jetstream::new);
    let job = status::read(&store, js.as_ref(), args.id).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
    } else {
        print!("{}", render_status(&job));
    }
    Ok(ExitCode::SUCCESS)
}

/// `tally job status`'s text.
fn render_status(job: &JobStatus) -> String {
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "—".into());
    let mut out = format!("job {}  {}  {:?}\n", job.id, job.status, job.name);
    out.push_str(&format!(
        "  pipeline {} · project {} · deployment {} · {}{}\n",
        opt(&job.pipeline),
        job.project,
        job.deployment.map_or_else(|| "—".into(), |d| d.to_string()),
        job.dispatch_mode,
        job.limit.map(|l| format!(" · limit {l}")).unwrap_or_default()
    ));
    out.push_str(&format!(
        "  created {} · started {} · finished {} · updated {}\n",
        job.created_at,
        opt(&job.started_at),
        opt(&job.finished_at),
        job.updated_at
    ));
    out.push_str(&format!(
        "  progress {:.0}% (summary status {})\n\n",
        job.summary.progress * 100.0,
        if job.summary.status.is_empty() { "—" } else { &job.summary.status }
    ));
    if !job.stages.is_empty() {
        let mut t = Table::new(&["stage", "status", ">progress", "parameters"]);
        for s in &job.stages {
            let params: Vec<String> = s
                .params
                .iter()
                .map(|p| match &p.value {
                    serde_json::Value::String(v) => format!("{}={v}", p.key),
                    other => format!("{}={other}", p.key),
                })
                .collect();
            t.row(vec![s.key.clone(), s.status.clone(), format!("{:.0}%", s.progress * 100.0), params.join(" ")]);
        }
        out.push_str(&t.render());
        out.push('\n');
    }
    let i = &job.images;
    out.push_str(&format!(
        "images with a result  {} ({} failed) · detections {} · classifications {}\n",
        thousands(i.processed),
        thousands(i.failed),
        thousands(i.detections),
        thousands(i.classifications)
    ));
    let queue = match &job.queue {
        Queue::Present(q) => match &q.consumer {
            Some(c) => format!(
                "{}: {} tasks, {} not yet delivered, {} awaiting ack, {} redelivered",
                stream_name(job.id),
                thousands(q.messages as i64),
                thousands(c.num_pending as i64),
                thousands(c.num_ack_pending as i64),
                thousands(c.num_redelivered as i64)
            ),
            None => format!("{}: {} tasks, no consumer", stream_name(job.id), thousands(q.messages as i64)),
        },
        Queue::Absent if cleanup::FINAL.contains(&job.status.as_str()) => {
            format!("queue deleted (the job is {}; stream {} no longer exists)", job.status, stream_name(job.id))
        }
        Queue::Absent => format!("none (stream {} does not exist)", stream_name(job.id)),
        Queue::NotAsked { reason } => format!("not shown: {reason}"),
        Queue::Unavailable { error } => format!("unknown: {error}"),
    };
    out.push_str(&format!("task queue            {queue}\n"));
    out.push_str(&format!("log lines             {} (tally job logs {})\n", thousands(job.log_lines), job.id));
    out
}

async fn cancel(args: CancelArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args.db).await?;
    let client = match args.nats.connect().await {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("warning: {e}");
            None
        }
    };
    let js = client.clone().map(jetstream::new);
    let (logs, writer) = JobLogs::start(store.clone(), JobLogsConfig::default());
    let cancelled = cancel::cancel(&store, js.as_ref(), &logs, args.id, "tally job cancel").await;
    writer.shutdown().await;
    if cancelled.is_ok() {
        crate::django_cache::invalidate_once(&args.django_cache, &["jobs_job", "jobs_joblog"]).await?;
    }
    let c = match cancelled {
        Err(JobError::NotFound(id)) => anyhow::bail!("no job {id}"),
        other => other?,
    };
    if c.revoked {
        println!("job {} cancelled: {} → {}", c.id, c.before, c.status);
    } else if c.before == c.status {
        println!("job {} is already {}: nothing to cancel (its status is left as it is)", c.id, c.status);
    } else {
        println!("job {} was {} and is now {} (changed by another writer meanwhile)", c.id, c.before, c.status);
    }
    let code = match &c.cleanup {
        Cleanup::NotAsync => ExitCode::SUCCESS,
        Cleanup::Done { deleted, last_state } => {
            if deleted.stream || deleted.consumer {
                let left = last_state
                    .as_ref()
                    .map(|s| format!(" ({} tasks never delivered, {} awaiting ack)", s.num_pending, s.num_ack_pending))
                    .unwrap_or_default();
                println!("deleted NATS consumer {} and stream {}{left}", consumer_name(c.id), stream_name(c.id));
            } else {
                println!("its task queue is already gone (stream {} does not exist)", stream_name(c.id));
            }
            ExitCode::SUCCESS
        }
        Cleanup::Skipped => {
            eprintln!("NATS is not reachable: stream {} was not deleted; run this again", stream_name(c.id));
            ExitCode::FAILURE
        }
        Cleanup::Failed { error } => {
            eprintln!("could not delete stream {}: {error}; run this again", stream_name(c.id));
            ExitCode::FAILURE
        }
    };
    if let Some(client) = client {
        let _ = client.flush().await;
    }
    Ok(code)
}

async fn logs(args: LogsArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args.db).await?;
    let exists = store.client().await?.query_opt("SELECT 1 FROM jobs_job WHERE id = $1", &[&args.id]).await?;
    anyhow::ensure!(exists.is_some(), "no job {}", args.id);
    let mut last = 0;
    for row in logs::read(&store, args.id, args.level, 0, Some(args.limit)).await? {
        last = last.max(row.id);
        println!("{row}");
    }
    if !args.follow {
        return Ok(ExitCode::SUCCESS);
    }
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let poll = args.poll.max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
            _ = tokio::time::sleep(poll) => {
                for row in logs::read(&store, args.id, args.level, last, None).await? {
                    last = last.max(row.id);
                    println!("{row}");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
