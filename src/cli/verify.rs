//! `tally verify`: recompute every count with SQL and report the stored values that differ.

use std::process::ExitCode;

use clap::{Args, ValueEnum};

use crate::config::DbArgs;
use crate::store;
use crate::store::verify::{Difference, Scope};
use crate::table::{format_micros, Table};

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text.
    Table,
    /// One JSON document.
    Json,
}

/// Options of `tally verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// Only owners filtered by this project (their own, or their deployment's).
    #[arg(long)]
    pub project: Option<i64>,
    /// Only this deployment, its events and its images.
    #[arg(long)]
    pub deployment: Option<i64>,
    /// Write the correct values of the rows that differ.
    #[arg(long)]
    pub fix: bool,
    /// Django's query cache, invalidated for the tables `--fix` writes.
    #[command(flatten)]
    pub django_cache: crate::django_cache::DjangoCacheArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Verifies; exits 1 when differences remain (none remain after a successful `--fix`).
pub async fn run(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let store = store::connect(&args.db).await?;
    store::check::check_schema(&store).await?;
    let scope = Scope { project: args.project, deployment: args.deployment };
    // A spinner on a terminal (hidden otherwise): the recompute takes ~50 s per 1M detections.
    let spinner = indicatif::ProgressBar::new_spinner().with_message("recomputing every count in SQL");
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let verification = store::verify::verify(&store, scope).await;
    spinner.finish_and_clear();
    let verification = verification?;
    let checked = verification.expected.images.len()
        + verification.expected.events.len()
        + verification.expected.deployments.len();
    let differences = &verification.differences;
    let mut remaining = differences.len();
    let mut fixed = None;
    if args.fix && !differences.is_empty() {
        let written = store::verify::fix(&store, &verification).await?;
        crate::django_cache::invalidate_once(&args.django_cache, &written.tables()).await?;
        remaining = store::verify::verify(&store, scope).await?.differences.len();
        fixed = Some(written.total());
    }
    match args.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "owners_checked": checked,
                "differences": differences,
                "rows_fixed": fixed,
                "differences_remaining": remaining,
            }))?
        ),
        Format::Table => {
            if !differences.is_empty() {
                print!("{}", render(differences));
            }
            println!("{checked} owners checked, {} differences", differences.len());
            if let Some(rows) = fixed {
                println!("fixed {rows} rows; {remaining} differences remain");
            }
        }
    }
    Ok(if remaining == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn render(differences: &[Difference]) -> String {
    let mut t = Table::new(&["table", ">id", "column", ">stored", ">expected"]);
    let show = |column: &str, v: Option<i64>| match v {
        None => "NULL".to_string(),
        Some(v) if column.ends_with("timestamp") || column == "start" || column == "end" => format_micros(v),
        Some(v) => v.to_string(),
    };
    for d in differences {
        t.row(vec![
            d.table.to_string(),
            d.id.to_string(),
            d.column.to_string(),
            show(d.column, d.stored),
            show(d.column, d.expected),
        ]);
    }
    t.render()
}
