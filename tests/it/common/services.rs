//! Private, throwaway Postgres and NATS servers for crash-safety tests: a test may stop, crash
//! and restart its own instances mid-stream without disturbing other tests running in parallel
//! against the shared services of `scripts/services`.
//!
//! Each instance lives in a fresh directory under `std::env::temp_dir()` (so `TMPDIR`) named
//! `tally-test-{pg,nats}-<pid>-<n>`, listens on 127.0.0.1 only, and keeps its port and its data
//! across restarts, so URLs handed out before a restart stay valid. Dropping the value stops the
//! server and removes the directory. A test process killed with SIGKILL cannot run `Drop`: its
//! servers stay up; find them with `pgrep -af tally-test-`.
//!
//! Everything here blocks (`std::process::Command`, `std::thread::sleep`). From async tests,
//! either call it before spawning the work that must keep running, or run it on a blocking
//! thread so the runtime keeps driving connections meanwhile:
//! `tokio::task::spawn_blocking(move || pg.crash_restart())` with the server in an `Arc`, or
//! `tokio::task::block_in_place(|| pg.crash_restart())` in a `multi_thread` test.
//!
//! Missing binaries make these panic with what to install: they never skip.

mod nats;
mod postgres;

pub use nats::PrivateNats;
pub use postgres::PrivatePostgres;

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// How long a server gets to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How many fresh ports a first start tries before giving up.
const PORT_ATTEMPTS: usize = 5;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A port on 127.0.0.1 that is free now, chosen below the kernel's ephemeral range: a port
/// from `bind(0)` is an ephemeral one, and while a server is down for a restart the kernel may
/// hand it to some outgoing connection, so the server could not get it back.
fn free_port() -> u16 {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOW: u16 = 10_000;
    if ephemeral_low > LOW + 1_000 {
        for _ in 0..100 {
            let port = LOW + (RandomState::new().build_hasher().finish() % u64::from(ephemeral_low - LOW)) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// A new empty directory `tally-test-<kind>-<pid>-<n>` under the temp dir.
fn fresh_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "tally-test-{kind}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    ));
    // A leftover from an earlier process with the same pid is ours to replace.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

fn output(command: &mut Command, what: &str) -> Output {
    command.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {what} ({command:?}): {e}"))
}

fn run(command: &mut Command, what: &str) {
    let out = output(command, what);
    assert!(out.status.success(), "{what} failed: {}", describe(&out));
}

fn describe(out: &Output) -> String {
    format!(
        "{}; stdout: {}; stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    )
}

/// The last 20 lines of a log file.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
