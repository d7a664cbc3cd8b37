//! Who used the machine's CPUs during a timed run (Linux `/proc`): this process, the Postgres
//! backends serving its database, the NATS server, and everything else. On a shared 2-core
//! machine the last share decides how much of the figures is ingest's own speed.

use std::fs;

/// CPU time so far, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    /// Busy ticks of all CPUs (`/proc/stat`, everything but idle and iowait).
    busy: u64,
    /// All ticks of all CPUs.
    total: u64,
    /// This process.
    this: u64,
    /// Postgres backends whose title names the benchmark's database.
    backends: u64,
    /// `nats-server`.
    nats: u64,
}

/// Shares of the machine's CPU time over an interval, in % of all CPUs.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuShares {
    /// Busy.
    pub busy: f64,
    /// This process (ingest, publisher, bench).
    pub this: f64,
    /// Its Postgres backends.
    pub backends: f64,
    /// The NATS server.
    pub nats: f64,
    /// Everything else: other processes, other databases, Postgres' background writers.
    pub others: f64,
}

impl CpuSnapshot {
    /// Reads the counters; `database` names the backends to attribute to the run. Processes
    /// that exit between two snapshots are counted only in `busy` (so in "others").
    pub fn take(database: &str) -> CpuSnapshot {
        let mut s = CpuSnapshot::default();
        if let Some(cpu) = fs::read_to_string("/proc/stat").ok().and_then(|t| t.lines().next().map(str::to_string)) {
            let v: Vec<u64> = cpu.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            s.total = v.iter().take(8).sum();
            s.busy = s.total - v.get(3).copied().unwrap_or(0) - v.get(4).copied().unwrap_or(0);
        }
        s.this = ticks("self").unwrap_or(0);
        let Ok(entries) = fs::read_dir("/proc") else { return s };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().filter(|p| p.bytes().all(|b| b.is_ascii_digit())) else { continue };
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "nats-server" {
                s.nats += ticks(pid).unwrap_or(0);
            } else if comm.trim() == "postgres" {
                let cmdline = fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if cmdline.contains(database) {
                    s.backends += ticks(pid).unwrap_or(0);
                }
            }
        }
        s
    }

    /// Shares between `self` (earlier) and `later`.
    pub fn shares(&self, later: &CpuSnapshot) -> CpuShares {
        let total = later.total.saturating_sub(self.total).max(1) as f64;
        let pct = |a: u64, b: u64| 100.0 * b.saturating_sub(a) as f64 / total;
        let busy = pct(self.busy, later.busy);
        let (this, backends, nats) =
            (pct(self.this, later.this), pct(self.backends, later.backends), pct(self.nats, later.nats));
        CpuShares { busy, this, backends, nats, others: (busy - this - backends - nats).max(0.0) }
    }
}

/// utime + stime of a process, in clock ticks.
fn ticks(pid: &str) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may contain spaces; fields resume after its closing parenthesis.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}
