//! `tally serve`: the daemon until SIGTERM or SIGINT, when it finishes and acks the batch in
//! hand and exits. Everything but the signals is [`crate::server`].

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::server::{self, Config};

/// Runs the daemon until a signal; or, as process 1 or above of a dataflow cluster, holds
/// that process's share of the dataflow until a signal.
pub async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let shutdown = CancellationToken::new();
    // Checked before anything else, so that a wrong -n/-p/-h fails at once.
    let topology = config.cluster.topology(config.ingest.workers)?;
    spawn_signal_handler(shutdown.clone());
    if config.cluster.is_peer() {
        crate::cluster::run_peer(topology, shutdown).await?;
        return Ok(ExitCode::SUCCESS);
    }
    config.db.require_url()?;
    match server::start(config, shutdown).await?.wait().await {
        Ok(()) => {
            info!("tally stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            error!(error = %e, "tally stopped on an error");
            Err(e)
        }
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => info!("SIGINT: finishing the batch in hand, then stopping"),
            _ = terminate => info!("SIGTERM: finishing the batch in hand, then stopping"),
        }
        shutdown.cancel();
    });
}
