//! `tally migrate`: create Antenna's tables on an empty database, and tally's schema.

use std::process::ExitCode;

use clap::Args;

use crate::config::DbArgs;
use crate::store;

/// Options of `tally migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
}

/// Runs the migrations and says what was done.
pub async fn run(args: MigrateArgs) -> anyhow::Result<ExitCode> {
    let store = store::connect(&args.db).await?;
    let report = store::migrate::migrate(&store).await?;
    if report.antenna_tables_existed {
        println!("Antenna's tables found: left as they are");
    }
    if report.applied.is_empty() {
        println!("up to date");
    } else {
        for m in &report.applied {
            println!("applied {m}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
