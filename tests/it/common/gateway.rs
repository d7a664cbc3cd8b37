//! The worker gateway served in-process on `127.0.0.1:0`: either the daemon as
//! `tally serve --no-ingest` runs it (`tally::server::start`), or, for the tests of a gateway
//! still connecting, a gateway whose connections the test sets itself, served alone.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tally::config::{DbArgs, NatsArgs};
use tally::gateway::{self, Gateway, GatewayArgs};
use tally::server::{self, Config};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A gateway being served.
pub struct Served {
    /// Where it answers.
    pub addr: SocketAddr,
    /// What to stop.
    inner: Inner,
}

enum Inner {
    Daemon(server::Running),
    Alone { shutdown: CancellationToken, server: JoinHandle<std::io::Result<()>>, background: JoinHandle<()> },
}

impl Served {
    /// `tally serve --no-ingest` over the database `db` and the NATS of `nats`, ready (its
    /// gateway connected).
    pub async fn daemon(db: DbArgs, nats: NatsArgs, args: GatewayArgs) -> Served {
        let mut config = Config::new(db, nats);
        config.gateway = args;
        config.no_ingest = true;
        let running = server::start(config, CancellationToken::new())
            .await
            .expect("tally starts")
            .until_ready(Duration::from_secs(60))
            .await
            .unwrap_or_else(|e| panic!("the gateway did not become ready: {e:#}"));
        Served { addr: running.addr, inner: Inner::Daemon(running) }
    }

    /// `gateway` alone, connected or not: the test sets its store and NATS when it wants.
    pub async fn alone(gateway: Arc<Gateway>) -> Served {
        tally::metrics::install();
        let shutdown = CancellationToken::new();
        let background = gateway.run_background(shutdown.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(tally::http::serve(listener, gateway::router(gateway), shutdown.clone()));
        Served { addr, inner: Inner::Alone { shutdown, server, background } }
    }

    /// Stops it and waits for its tasks.
    pub async fn stop(self) {
        match self.inner {
            Inner::Daemon(running) => running.stop().await.expect("tally stops cleanly"),
            Inner::Alone { shutdown, server, background } => {
                shutdown.cancel();
                server.await.expect("server task").expect("server");
                background.await.expect("background task");
            }
        }
    }
}
