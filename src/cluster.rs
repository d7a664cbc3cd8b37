//! Running the count dataflow as a timely cluster of several processes (SPEC §7).
//!
//! The flags follow timely's own conventions: `-n` processes, `-p` this process's index, `-h`
//! a hostfile with one `host:port` per line (process 0 first), and `-w` worker threads per
//! process. Process 0 is the daemon itself: it reads Postgres and NATS, feeds every input row
//! once, receives the changed counts, writes them and acks. Every other process holds its
//! share of the dataflow's state and nothing else: no database, no NATS, no HTTP. If a
//! process is lost, process 0's next batch fails (rolled back and redelivered), `/readyz`
//! reports it, and process 0 waits for the cluster to form again, then rebuilds from
//! Postgres. A peer whose cluster ended (process 0 stopped, restarted or lost a process)
//! joins the next one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use tally_dataflows::engine::{self, Topology};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The dataflow cluster's flags (timely's `-n`, `-p`, `-h`).
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Timely processes in the dataflow cluster. 1: this process alone.
    #[arg(short = 'n', long, env = "TALLY_PROCESSES", default_value_t = 1)]
    pub processes: usize,
    /// This process's index in the cluster, 0 to n-1. Process 0 is the daemon (Postgres,
    /// NATS, HTTP); the others only hold dataflow state.
    #[arg(short = 'p', long, env = "TALLY_PROCESS", default_value_t = 0)]
    pub process: usize,
    /// A file listing every process's `host:port`, one per line, process 0 first (the
    /// address each process listens on for the others). Required when n > 1.
    #[arg(short = 'h', long, env = "TALLY_HOSTFILE")]
    pub hostfile: Option<PathBuf>,
}

impl Default for ClusterArgs {
    fn default() -> Self {
        ClusterArgs { processes: 1, process: 0, hostfile: None }
    }
}

impl ClusterArgs {
    /// Where the dataflow's workers run, `workers` threads per process.
    pub fn topology(&self, workers: usize) -> anyhow::Result<Topology> {
        if self.processes <= 1 {
            if self.process != 0 {
                bail!("-p {} needs -n greater than {}", self.process, self.process);
            }
            return Ok(Topology::local(workers));
        }
        if self.process >= self.processes {
            bail!(
                "-p {} is not a process of a cluster of {} (0 to {})",
                self.process,
                self.processes,
                self.processes - 1
            );
        }
        let path = self.hostfile.as_deref().context("a cluster (-n above 1) needs a hostfile (-h)")?;
        let addresses = read_hostfile(path, self.processes)?;
        Ok(Topology::Cluster { threads: workers.max(1), process: self.process, addresses })
    }

    /// Whether this process is a peer (holds state only) rather than the daemon.
    pub fn is_peer(&self) -> bool {
        self.processes > 1 && self.process > 0
    }
}

/// The first `processes` addresses of a hostfile: `host:port` per line; blank lines and `#`
/// comments are skipped.
pub fn read_hostfile(path: &Path, processes: usize) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read hostfile {}", path.display()))?;
    let addresses: Vec<String> = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or("").trim())
        .filter(|line| !line.is_empty())
        .map(str::to_string)
        .collect();
    if addresses.len() < processes {
        bail!("hostfile {} lists {} addresses; -n {processes} needs that many", path.display(), addresses.len());
    }
    for address in &addresses[..processes] {
        if !address.contains(':') {
            bail!("hostfile {}: {address:?} is not host:port", path.display());
        }
    }
    Ok(addresses[..processes].to_vec())
}

/// Runs this peer process: joins the cluster, holds its share of the state until the cluster
/// ends, and joins the next one, until `shutdown`. Each cluster blocks a thread of its own.
pub async fn run_peer(topology: Topology, shutdown: CancellationToken) -> anyhow::Result<()> {
    info!(%topology, "dataflow peer: holding state for process 0; no database, NATS or HTTP here");
    loop {
        let member = topology.clone();
        let mut cluster = tokio::task::spawn_blocking(move || engine::run_peer(&member));
        let outcome = tokio::select! {
            outcome = &mut cluster => outcome,
            _ = shutdown.cancelled() => {
                info!("dataflow peer: stopping");
                // The thread may be waiting for connections or holding state: the process
                // exits without joining it.
                return Ok(());
            }
        };
        match outcome {
            Ok(Ok(())) => info!(
                "dataflow peer: the cluster ended (process 0 stopped or restarted its engine); joining the next one"
            ),
            Ok(Err(e)) => warn!(error = %e, "dataflow peer: the cluster broke; joining the next one"),
            Err(e) => warn!(error = %e, "dataflow peer: the cluster's thread failed; joining the next one"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfile_lines_comments_and_counts() {
        let dir = std::env::temp_dir().join(format!("tally-hostfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("hosts");
        std::fs::write(&path, "# the cluster\nhost-a:2101\n\n  host-b:2101  # second\nhost-c:2101\n").expect("write");
        assert_eq!(read_hostfile(&path, 2).expect("two"), vec!["host-a:2101", "host-b:2101"]);
        assert_eq!(read_hostfile(&path, 3).expect("three").len(), 3);
        assert!(read_hostfile(&path, 4).is_err(), "four processes, three addresses");
        std::fs::write(&path, "host-a\n").expect("write");
        assert!(read_hostfile(&path, 1).is_err(), "no port");
        let args = ClusterArgs { processes: 3, process: 1, hostfile: Some(path.clone()) };
        assert!(args.topology(2).is_err());
        std::fs::write(&path, "a:1\nb:2\nc:3\n").expect("write");
        assert_eq!(
            args.topology(2).expect("topology"),
            Topology::Cluster { threads: 2, process: 1, addresses: vec!["a:1".into(), "b:2".into(), "c:3".into()] }
        );
        assert!(args.is_peer());
        assert!(ClusterArgs { process: 3, ..args.clone() }.topology(1).is_err(), "-p out of range");
        assert!(ClusterArgs { hostfile: None, ..args }.topology(1).is_err(), "no hostfile");
        assert_eq!(ClusterArgs::default().topology(4).expect("local"), Topology::local(4));
        std::fs::remove_dir_all(&dir).ok();
    }
}
