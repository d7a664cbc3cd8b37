//! Command-line interface: one module per subcommand, dispatched from [`run`].

pub mod counts;
pub mod dead_letters;
pub mod job;
pub mod migrate;
pub mod rebuild;
pub mod serve;
pub mod verify;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::telemetry::LogArgs;

/// tally keeps Antenna's stored counts (per event, deployment and image, under each
/// project's score threshold and include/exclude taxa) exact and up to date, incrementally.
#[derive(Debug, Parser)]
#[command(name = "tally", version, propagate_version = true)]
pub struct Cli {
    /// Logging options.
    #[command(flatten)]
    pub log: LogArgs,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: rebuild the count dataflow from Postgres, then consume ML results from
    /// NATS JetStream, save them, keep every count exact and ack. Serves /healthz, /readyz and
    /// /metrics. SIGTERM finishes the batch in hand, acks it and exits. With `-n`, `-p` and
    /// `-h`, the count dataflow runs as a timely cluster: process 0 is the daemon, the others
    /// hold dataflow state only.
    #[command(disable_help_flag = true, mut_arg("database_url", |a| a.required(false).required_unless_present("process").default_value("").hide_default_value(true)))]
    Serve(Box<crate::server::Config>),
    /// Create Antenna's tables on an empty database (none are touched where they exist) and
    /// tally's own schema `tally`. Idempotent.
    Migrate(migrate::MigrateArgs),
    /// Load every count input from Postgres into the dataflow, then write every stored count
    /// that differs from its definition (on a timely cluster with `-n`, `-p`, `-h`).
    #[command(disable_help_flag = true, mut_arg("database_url", |a| a.required(false).required_unless_present("process").default_value("").hide_default_value(true)))]
    Rebuild(rebuild::RebuildArgs),
    /// Recompute every count with SQL (independently of the dataflow) and report the stored
    /// values that differ; exit status 1 when any do. `--fix` writes the correct values.
    Verify(verify::VerifyArgs),
    /// List projects, deployments or events with their stored counts (table, CSV or JSON).
    Counts(counts::CountsArgs),
    /// Inspect the result messages ingest could not save (stored whole with the reason), and
    /// re-publish them once the cause is fixed.
    #[command(subcommand)]
    DeadLetters(dead_letters::DeadLettersCommand),
    /// Create an async ML job as Antenna does (a jobs_job row and one NATS task per image),
    /// show its status and task queue, cancel it, or read and follow its log.
    #[command(subcommand)]
    Job(job::JobCommand),
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(args) => block_on_then_leave(serve::run(*args)),
        Command::Migrate(args) => runtime()?.block_on(migrate::run(args)),
        Command::Rebuild(args) => block_on_then_leave(rebuild::run(args)),
        Command::Verify(args) => runtime()?.block_on(verify::run(args)),
        Command::Counts(args) => runtime()?.block_on(counts::run(args)),
        Command::DeadLetters(command) => runtime()?.block_on(dead_letters::run(command)),
        Command::Job(command) => runtime()?.block_on(job::run(command)),
    }
}

/// The async runtime of the commands that talk to services (the tools use it too).
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Runs `command` to its end, then leaves without waiting for blocking threads: a dataflow
/// peer's or process 0's timely thread may still be waiting for the other processes to
/// connect (timely retries forever), and dropping a runtime waits for its blocking threads.
fn block_on_then_leave(
    command: impl std::future::Future<Output = anyhow::Result<ExitCode>>,
) -> anyhow::Result<ExitCode> {
    let runtime = runtime()?;
    let outcome = runtime.block_on(command);
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    outcome
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};
    use crate::cluster::ClusterArgs;
    use crate::config::DbArgs;

    #[test]
    fn a_dataflow_peer_needs_no_database_url_and_process_0_does() {
        for command in ["serve", "rebuild"] {
            let parsed = Cli::try_parse_from(["tally", command, "-n", "2", "-p", "1", "-h", "hosts"]);
            assert!(parsed.is_ok(), "{command} as a peer without --database-url: {:?}", parsed.err());
        }
        let Ok(Cli { command: Command::Serve(config), .. }) =
            Cli::try_parse_from(["tally", "serve", "-n", "2", "-p", "1", "-h", "hosts", "--database-url", ""])
        else {
            panic!("serve parses");
        };
        assert!(config.cluster.is_peer());
        // Process 0 (or a lone process) given no URL is refused before connecting.
        let err = DbArgs::for_url("").require_url().expect_err("an empty URL is refused");
        assert!(err.to_string().contains("--database-url"), "{err}");
        assert!(DbArgs::for_url("postgres://postgres@127.0.0.1/x").require_url().is_ok());
        // -p without -n is a mistake, not a lone process.
        assert!(ClusterArgs { processes: 1, process: 1, hostfile: None }.topology(1).is_err());
    }
}
