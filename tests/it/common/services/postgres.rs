//! [`PrivatePostgres`]: a cluster of its own, initdb'd per value, driven with pg_ctl.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{describe, free_port, fresh_dir, output, run, tail, PORT_ATTEMPTS, READY_TIMEOUT};

/// A Postgres cluster of its own: initdb'd in a temp dir, trust auth, user `postgres`.
///
/// `fsync = off` for speed. It stays crash-consistent for the crashes tests make: an immediate
/// stop kills the postmaster, not the OS, and the page cache keeps every write Postgres made;
/// `full_page_writes` and `synchronous_commit` keep their defaults so recovery replays the WAL.
pub struct PrivatePostgres {
    /// Holds `data/` (PGDATA), the Unix socket and `postgres.log`; removed on drop.
    dir: PathBuf,
    /// Fixed for the life of the value so URLs survive restarts.
    port: u16,
    /// Where initdb, pg_ctl and psql are.
    bin: PathBuf,
}

impl PrivatePostgres {
    /// Runs initdb and starts the server, retrying on another port when the first is taken.
    pub fn start() -> PrivatePostgres {
        let bin = postgres_bindir();
        let dir = fresh_dir("pg");
        let as_root = is_root();
        if as_root {
            // initdb and postgres refuse to run as root: the cluster belongs to the postgres user.
            run(Command::new("chown").arg("postgres:postgres").arg(&dir), "chown the cluster directory to postgres");
            let reachable = Command::new("runuser").args(["-u", "postgres", "--", "test", "-w"]).arg(&dir).status();
            if !reachable.is_ok_and(|s| s.success()) {
                panic!("the postgres OS user cannot write {}: point TMPDIR at a directory it can reach", dir.display());
            }
        }
        let data = dir.join("data");
        let mut initdb = pg_command(&bin, "initdb", &dir);
        initdb.arg("-D").arg(&data).args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync"]);
        run(&mut initdb, "initdb");
        let conf = format!(
            "\n# tally test harness\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nshared_buffers = 32MB\nmax_connections = 50\n",
            dir.display()
        );
        std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .expect("append to postgresql.conf");

        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            let pg = PrivatePostgres { dir: dir.clone(), port: free_port(), bin: bin.clone() };
            match pg.try_start() {
                Ok(()) => return pg,
                Err(e) => failures.push(e),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        panic!("private Postgres did not start on any of {PORT_ATTEMPTS} ports:\n{}", failures.join("\n---\n"));
    }

    /// `postgres://postgres@127.0.0.1:PORT/db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Its directory; every process it runs has this path on its command line.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `CREATE DATABASE name`; `name` must be a plain lowercase identifier.
    pub fn create_database(&self, name: &str) {
        assert!(
            !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "database name {name:?} must be [a-z0-9_]+"
        );
        let mut psql = Command::new(self.bin.join("psql"));
        psql.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-U", "postgres", "-d", "postgres"])
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("CREATE DATABASE {name}"));
        run(&mut psql, &format!("CREATE DATABASE {name} on private Postgres port {}", self.port));
    }

    /// Clean restart: `pg_ctl stop -m fast`, then start on the same port.
    pub fn restart(&self) {
        self.stop();
        self.resume();
    }

    /// Crash and recover: `pg_ctl stop -m immediate` (no shutdown checkpoint, like a killed
    /// postmaster), then start, which replays the WAL. Committed rows must survive.
    pub fn crash_restart(&self) {
        self.pg_ctl_stop("immediate").unwrap_or_else(|e| panic!("{e}"));
        self.resume();
    }

    /// Stops it (`-m fast`) and leaves it down until [`PrivatePostgres::resume`].
    pub fn stop(&self) {
        self.pg_ctl_stop("fast").unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts it again after [`PrivatePostgres::stop`], on the same port and data.
    pub fn resume(&self) {
        self.try_start().unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_start(&self) -> Result<(), String> {
        let mut pg_ctl = pg_command(&self.bin, "pg_ctl", &self.dir);
        pg_ctl
            .arg("start")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("postgres.log"))
            .args(["-w", "-t", &READY_TIMEOUT.as_secs().to_string(), "-o"])
            .arg(format!("-p {}", self.port));
        let out = output(&mut pg_ctl, "pg_ctl start");
        if out.status.success() {
            return Ok(());
        }
        // A failed start can leave a postmaster behind (timeout): make sure it is gone.
        let _ = self.pg_ctl_stop("immediate");
        Err(format!(
            "private Postgres in {} did not start on port {}: {}\nend of postgres.log:\n{}",
            self.dir.display(),
            self.port,
            describe(&out),
            tail(&self.dir.join("postgres.log"))
        ))
    }

    fn pg_ctl_stop(&self, mode: &str) -> Result<(), String> {
        let mut pg_ctl = pg_command(&self.bin, "pg_ctl", &self.dir);
        pg_ctl.arg("stop").arg("-D").arg(self.dir.join("data")).args(["-m", mode, "-w"]);
        let out = output(&mut pg_ctl, "pg_ctl stop");
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("pg_ctl stop -m {mode} failed for {}: {}", self.dir.display(), describe(&out)))
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl_stop("immediate");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `pg_config --bindir`, else the newest `/usr/lib/postgresql/<version>/bin`, checked to hold
/// what the harness runs.
fn postgres_bindir() -> PathBuf {
    let from_pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let newest_debian = || {
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .collect();
        versions.sort();
        versions.pop().map(|(_, bin)| bin)
    };
    let bin = from_pg_config.filter(|b| b.join("initdb").exists()).or_else(newest_debian).unwrap_or_else(|| {
        panic!("no PostgreSQL server binaries: neither pg_config --bindir nor /usr/lib/postgresql/*/bin; install postgresql")
    });
    for tool in ["initdb", "pg_ctl", "postgres", "psql"] {
        assert!(bin.join(tool).exists(), "{tool} not found at {}: install postgresql", bin.display());
    }
    bin
}

/// `tool` from `bin`, run as the postgres OS user when we are root (initdb and postgres refuse
/// root), from `dir` so the postgres user can read its working directory.
fn pg_command(bin: &Path, tool: &str, dir: &Path) -> Command {
    let mut command = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    };
    command.current_dir(dir).env("LC_ALL", "C");
    command
}

/// Whether this process runs as root: `/proc/self` belongs to the effective uid.
fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}
