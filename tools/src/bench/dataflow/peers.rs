//! The peer processes of `bench dataflow --processes N`: child processes of the benchmark
//! (`tally-tools bench dataflow-peer`), each one timely process of a loopback cluster, so that
//! each process's resident memory can be read on its own.

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tally_dataflows::engine::{self, Topology};
use tally_dataflows::Engine;

/// Options of the hidden `tally-tools bench dataflow-peer`.
#[derive(Debug, Args)]
pub struct PeerArgs {
    /// This process's index (1 or more).
    #[arg(long)]
    pub process: usize,
    /// Every process's `host:port`, process 0 first, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub addresses: Vec<String>,
    /// Timely worker threads of this process.
    #[arg(short = 'w', long, default_value_t = 1)]
    pub workers: usize,
}

/// Runs this peer until process 0 drops its engine.
pub fn run(args: PeerArgs) -> anyhow::Result<ExitCode> {
    let topology = Topology::Cluster { threads: args.workers, process: args.process, addresses: args.addresses };
    engine::run_peer(&topology).context("dataflow peer")?;
    Ok(ExitCode::SUCCESS)
}

/// The running peer processes; killed if dropped before [`Peers::wait`].
pub struct Peers {
    children: Vec<Child>,
}

impl Peers {
    /// The resident memory of each peer process, in process order.
    pub fn resident_bytes(&self) -> Vec<Option<u64>> {
        self.children.iter().map(|child| crate::stats::resident_bytes_of(child.id())).collect()
    }

    /// Waits (up to a minute) for every peer to exit after the engine was dropped; an error if
    /// one failed or did not exit.
    pub fn wait(mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        for (n, child) in self.children.iter_mut().enumerate() {
            loop {
                if let Some(status) = child.try_wait()? {
                    if !status.success() {
                        bail!("dataflow peer process {} exited with {status}", n + 1);
                    }
                    break;
                }
                if Instant::now() > deadline {
                    bail!("dataflow peer process {} did not exit after the engine stopped", n + 1);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.children.clear();
        Ok(())
    }
}

impl Drop for Peers {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts processes 1..`processes` as child processes on free loopback ports, then process 0's
/// engine in this process (which waits until every peer has connected).
pub fn start(processes: usize, workers: usize) -> anyhow::Result<(Engine, Peers)> {
    let addresses = engine::loopback_addresses(processes)?;
    let exe = std::env::current_exe().context("cannot find this executable to start dataflow peers")?;
    let mut peers = Peers { children: Vec::new() };
    for process in 1..processes {
        let child = Command::new(&exe)
            .args(["bench", "dataflow-peer", "--process", &process.to_string(), "--addresses", &addresses.join(",")])
            .args(["--workers", &workers.to_string()])
            // timely reports its connection attempts on stdout.
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start dataflow peer {process}"))?;
        peers.children.push(child);
    }
    let engine = Engine::start(Topology::Cluster { threads: workers, process: 0, addresses })?;
    Ok((engine, peers))
}
