//! [`PrivateNats`]: a JetStream server of its own, a child process of the test.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{free_port, fresh_dir, tail, PORT_ATTEMPTS, READY_TIMEOUT};

/// A NATS server with JetStream of its own, a child process of the test.
pub struct PrivateNats {
    /// Holds `jetstream/` (the store) and `nats.log`; removed on drop.
    dir: PathBuf,
    /// Fixed for the life of the value so clients can reconnect after a restart.
    port: u16,
    /// The nats-server executable.
    bin: PathBuf,
    /// The running server; `None` while stopped or killed.
    child: Mutex<Option<Child>>,
    /// A configuration file (`-c`), for settings without a flag.
    config: Option<PathBuf>,
}

impl PrivateNats {
    /// Spawns `nats-server -js` on a free port and waits until it answers with JetStream on.
    pub fn start() -> PrivateNats {
        Self::start_with_config(None)
    }

    /// [`PrivateNats::start`] with a `max_payload` other than the default 1 MiB.
    pub fn with_max_payload(bytes: usize) -> PrivateNats {
        Self::start_with_config(Some(format!("max_payload: {bytes}\n")))
    }

    fn start_with_config(config: Option<String>) -> PrivateNats {
        let bin = find_executable("nats-server").unwrap_or_else(|| {
            panic!("nats-server not found in PATH or /usr/sbin: install it (apt-get install nats-server, or scripts/services)")
        });
        let dir = fresh_dir("nats");
        let config = config.map(|text| {
            let path = dir.join("nats.conf");
            std::fs::write(&path, text).expect("write nats.conf");
            path
        });
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let nats = PrivateNats {
                dir: dir.clone(),
                port: free_port(),
                bin: bin.clone(),
                child: Mutex::new(None),
                config: config.clone(),
            };
            match nats.try_spawn() {
                Ok(()) => return nats,
                Err(e) => failures.push(e),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("private NATS did not start on any of {PORT_ATTEMPTS} ports:\n{}", failures.join("\n---\n"));
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its directory; the server's command line holds this path.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Clean restart: SIGTERM (the server flushes its store), then start again on the same
    /// port and store, so streams, messages and durable consumers persist.
    pub fn restart(&self) {
        self.stop();
        self.resume();
    }

    /// Crash restart: SIGKILL, then start again on the same port and store. What the server
    /// had written to its files survives; with nats-server 2.9.10 that includes every message
    /// it had acknowledged (`tests/it/services_harness.rs` checks it), as the OS keeps the writes.
    pub fn crash_restart(&self) {
        self.kill();
        self.resume();
    }

    /// SIGTERM and wait for it to exit; it stays down until [`PrivateNats::resume`].
    pub fn stop(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut child) = guard.take() else { panic!("private NATS on port {} is not running", self.port) };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("private NATS on port {} ignored SIGTERM for 10 s: killed it", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL and reap; it stays down until [`PrivateNats::resume`]. No-op when already down.
    pub fn kill(&self) {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut child) = guard.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again after [`PrivateNats::stop`] or [`PrivateNats::kill`].
    pub fn resume(&self) {
        self.try_spawn().unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_spawn(&self) -> Result<(), String> {
        let mut guard = self.child.lock().unwrap_or_else(|e| e.into_inner());
        assert!(guard.is_none(), "private NATS on port {} is already running", self.port);
        let log_path = self.dir.join("nats.log");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path).expect("open nats.log");
        let mut command = Command::new(&self.bin);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let mut child = command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone nats.log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            match nats_hello(self.port) {
                Some(info) if info.contains("\"jetstream\":true") => break,
                Some(info) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("port {} answers without JetStream: {info}", self.port));
                }
                None => {}
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "private NATS in {} did not answer on port {} ({}); end of nats.log:\n{}",
                    self.dir.display(),
                    self.port,
                    exited.map_or_else(|| format!("no answer in {READY_TIMEOUT:?}"), |s| format!("exited: {s}")),
                    tail(&log_path)
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        *guard = Some(child);
        Ok(())
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The INFO line of the NATS server on `port` once it also answered PING; `None` when nothing
/// answers yet.
fn nats_hello(port: u16) -> Option<String> {
    let stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut info = String::new();
    reader.read_line(&mut info).ok()?;
    if !info.starts_with("INFO ") {
        return None;
    }
    (&stream).write_all(b"CONNECT {\"verbose\":false}\r\nPING\r\n").ok()?;
    let mut pong = String::new();
    reader.read_line(&mut pong).ok()?;
    (pong.trim_end() == "PONG").then(|| info.trim_end().to_string())
}

fn find_executable(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let dirs: Vec<&str> = path.split(':').chain(["/usr/sbin", "/usr/local/sbin", "/usr/bin"]).collect();
    dirs.into_iter().map(|d| Path::new(d).join(name)).find(|p| p.is_file())
}
