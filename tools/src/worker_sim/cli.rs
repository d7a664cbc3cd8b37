//! `tally-tools worker-sim`: simulated ADC workers against a worker gateway (tally's or Antenna's),
//! with a summary of what they did and how long each call took.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tally::duration::{parse_millis, parse_secs};
use tally_dataflows::taxonomy::{Rank, Taxonomy};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::synth::results::{ResultFactory, ResultKeys};
use crate::worker_sim::{self, Retry, StopWhen, WorkerSim};

/// Options of `tally-tools worker-sim`.
#[derive(Debug, Args)]
#[command(after_help = "Exit status: 0 when the run ended by --exit-when-idle, --max-tasks or Ctrl-C with every \
                        result accepted; 1 when a call was refused (a bad token stops every loop at once) or \
                        results were refused or dropped.\n\nExample:\n  tally-tools worker-sim --url \
                        http://127.0.0.1:9464 --token $KEY --pipeline quebec_vermont_moths_2023 \\\n    \
                        --concurrency 3 --delay-ms 20 --exit-when-idle 5")]
pub struct WorkerSimArgs {
    /// Base URL of the worker API (tally serve's --listen address, or Antenna's); a path
    /// prefix is kept.
    #[arg(long, env = "TALLY_URL")]
    pub url: String,
    /// API token of the worker's user (sent as `Authorization: Token <key>`).
    #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Pipeline slugs to claim jobs for, comma-separated; results name the claimed job's
    /// pipeline.
    #[arg(long, value_delimiter = ',', required = true)]
    pub pipeline: Vec<String>,
    /// Worker loops running at once (ADC runs one per GPU); they share one keep-alive HTTP
    /// client.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Tasks asked for per /tasks call (ADC: 24).
    #[arg(long, default_value_t = 24)]
    pub batch_size: usize,
    /// Results per POST /result/ (ADC posts a batch's results at once: 24). Left-over results
    /// are posted when a job runs dry.
    #[arg(long, default_value_t = 24)]
    pub post_batch: usize,
    /// How long each task takes to "process" (download and inference), per loop (a bare
    /// number is milliseconds).
    #[arg(long, alias = "delay-ms", value_parser = parse_millis, default_value = "0")]
    pub delay: Duration,
    /// The sleep after an iteration that found no work (ADC: 5 s; a bare number is
    /// milliseconds).
    #[arg(long, alias = "poll-ms", value_parser = parse_millis, default_value = "5s")]
    pub poll: Duration,
    /// Stop once no loop has fetched, processed or posted anything for this long (a bare
    /// number is seconds, fractions allowed). Without it (and without --max-tasks), run until
    /// Ctrl-C.
    #[arg(long, value_name = "DURATION", value_parser = parse_secs)]
    pub exit_when_idle: Option<Duration>,
    /// Take at most this many tasks in all, process and post them, then stop.
    #[arg(long)]
    pub max_tasks: Option<u64>,
    /// Antenna taxonomy fixture whose species name the classifications (e.g.
    /// ../shared/data/taxa-quebec-vermont-2022.json); default: a built-in synthetic taxonomy of
    /// 10 families × 10 genera × 20 species. Unknown names become new taxa on ingest.
    #[arg(long)]
    pub taxonomy: Option<PathBuf>,
    /// Mean detections per image (Poisson).
    #[arg(long, default_value_t = 8.0)]
    pub mean_detections: f64,
    /// Length of the species classifier's score and logit vectors (ADC sends one per class:
    /// thousands make results of hundreds of kB).
    /// 1 to 30,000 (ADC's global model has 29,176 classes).
    #[arg(long, default_value_t = 100, value_parser = crate::cli::parse_score_len)]
    pub score_len: usize,
    /// Seed of the synthetic results (with the image id: the same task always gets the same
    /// result).
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Algorithm key of the detector (must be linked to the pipeline).
    #[arg(long, default_value = "random-detector")]
    pub detector: String,
    /// Algorithm key of the moth / non-moth classifier.
    #[arg(long, default_value = "random-binary-classifier")]
    pub binary_classifier: String,
    /// Algorithm key of the species classifier.
    #[arg(long, default_value = "random-species-classifier")]
    pub species_classifier: String,
    /// Attempts per call on transient errors (no answer, 5xx); 4xx answers are never retried.
    #[arg(long, default_value_t = Retry::default().attempts)]
    pub attempts: u32,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl WorkerSimArgs {
    /// The simulator these options describe.
    pub fn sim(&self) -> anyhow::Result<WorkerSim> {
        let taxonomy = match &self.taxonomy {
            Some(path) => tally::taxa_file::load(path)?,
            None => Taxonomy::synthetic(10, 10, 20),
        };
        let species: Vec<String> =
            taxonomy.of_rank(Rank::Species).iter().filter_map(|id| taxonomy.names.get(id).cloned()).collect();
        if species.is_empty() {
            anyhow::bail!("the taxonomy has no species to classify into");
        }
        if !(0.0..=1000.0).contains(&self.mean_detections) {
            anyhow::bail!("--mean-detections must be a number from 0 to 1000");
        }
        let pipelines: Vec<String> =
            self.pipeline.iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
        let keys = ResultKeys {
            pipeline: pipelines.first().cloned().unwrap_or_default(),
            detector: self.detector.clone(),
            binary: self.binary_classifier.clone(),
            species: self.species_classifier.clone(),
        };
        Ok(WorkerSim {
            base_url: self.url.clone(),
            token: self.token.clone(),
            pipelines,
            concurrency: self.concurrency,
            batch_size: self.batch_size,
            post_batch: self.post_batch,
            delay: self.delay,
            poll_interval: self.poll,
            stop: StopWhen { idle: self.exit_when_idle, max_tasks: self.max_tasks },
            results: ResultFactory {
                species,
                keys,
                mean_detections: self.mean_detections,
                score_len: self.score_len.max(1),
                seed: self.seed,
            },
            retry: Retry { attempts: self.attempts.max(1), ..Retry::default() },
        })
    }
}

/// Runs the simulated workers and prints the report.
pub async fn run(args: WorkerSimArgs) -> anyhow::Result<ExitCode> {
    let sim = args.sim()?;
    let cancel = CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            info!("SIGINT: posting the results in hand, then stopping");
            on_signal.cancel();
        }
    });
    info!(
        url = %sim.base_url,
        pipelines = %sim.pipelines.join(","),
        loops = sim.concurrency,
        batch_size = sim.batch_size,
        "worker-sim started"
    );
    let report = worker_sim::run(&sim, cancel).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        println!("{}", report.render());
    }
    Ok(if report.failed() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use crate::cli::{Cli, Command};

    #[test]
    fn flags_become_a_simulator() {
        let cli = Cli::try_parse_from([
            "tally-tools",
            "worker-sim",
            "--url",
            "http://127.0.0.1:1",
            "--token",
            "k",
            "--pipeline",
            "a, b",
            "--concurrency",
            "3",
            "--exit-when-idle",
            "0.5",
        ])
        .expect("parse");
        let Command::WorkerSim(args) = cli.command else { panic!("not worker-sim") };
        let sim = args.sim().expect("sim");
        assert_eq!(sim.pipelines, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(sim.concurrency, 3);
        assert_eq!((sim.batch_size, sim.post_batch), (24, 24));
        assert_eq!(sim.stop.idle, Some(std::time::Duration::from_millis(500)));
        assert_eq!(sim.results.species.len(), 2000);
        for bad in ["--exit-when-idle=-1", "--exit-when-idle=soon"] {
            let parsed = Cli::try_parse_from([
                "tally-tools",
                "worker-sim",
                "--url",
                "u",
                "--token",
                "k",
                "--pipeline",
                "a",
                bad,
            ]);
            assert!(parsed.is_err(), "{bad} accepted");
        }
    }
}
