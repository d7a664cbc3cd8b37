//! `tally counts`: the stored counts of projects, deployments or events, for analysts.
//!
//! Times are shown as Antenna shows them: wall-clock in the configured time zone.

use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde_json::Value;

use crate::config::DbArgs;
use crate::store;
use crate::table::Table;

/// What to list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Level {
    /// One row per project, with its deployments' counts summed.
    Projects,
    /// One row per deployment.
    Deployments,
    /// One row per event.
    Events,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text.
    Table,
    /// Comma-separated values with a header row.
    Csv,
    /// A JSON array of objects.
    Json,
}

/// Options of `tally counts`.
#[derive(Debug, Args)]
pub struct CountsArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// What to list.
    #[arg(value_enum, default_value_t = Level::Deployments)]
    pub level: Level,
    /// Only this project.
    #[arg(long)]
    pub project: Option<i64>,
    /// Only this deployment (deployments and events).
    #[arg(long)]
    pub deployment: Option<i64>,
    /// Only events starting on or after this date (YYYY-MM-DD); deployments with captures on or after it.
    #[arg(long)]
    pub from: Option<String>,
    /// Only events starting before the end of this date; deployments with captures up to it.
    #[arg(long)]
    pub to: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

const PROJECTS: &str = r#"
SELECT p.id, p.name, p.default_filters_score_threshold AS threshold,
       count(d.id) AS deployments,
       coalesce(sum(d.events_count), 0) AS events,
       coalesce(sum(d.captures_count), 0) AS captures,
       coalesce(sum(d.detections_count), 0) AS detections,
       coalesce(sum(d.occurrences_count), 0) AS occurrences
FROM main_project p
LEFT JOIN main_deployment d ON d.project_id = p.id
  AND ($3::text::date IS NULL OR d.last_capture_timestamp >= $3::text::date)
  AND ($4::text::date IS NULL OR d.first_capture_timestamp < $4::text::date + 1)
WHERE ($1::int8 IS NULL OR p.id = $1) AND ($2::int8 IS NULL OR d.id = $2)
GROUP BY p.id ORDER BY p.id"#;

const DEPLOYMENTS: &str = r#"
SELECT d.id, d.name, d.project_id AS project, d.events_count AS events, d.captures_count AS captures,
       d.data_source_total_size AS total_size, d.detections_count AS detections,
       d.occurrences_count AS occurrences, d.taxa_count AS taxa,
       to_char(d.first_capture_timestamp, 'YYYY-MM-DD HH24:MI') AS first_capture,
       to_char(d.last_capture_timestamp, 'YYYY-MM-DD HH24:MI') AS last_capture
FROM main_deployment d
WHERE ($1::int8 IS NULL OR d.project_id = $1) AND ($2::int8 IS NULL OR d.id = $2)
  AND ($3::text::date IS NULL OR d.last_capture_timestamp >= $3::text::date)
  AND ($4::text::date IS NULL OR d.first_capture_timestamp < $4::text::date + 1)
ORDER BY d.id"#;

const EVENTS: &str = r#"
SELECT e.id, e.deployment_id AS deployment, coalesce(e.project_id, d.project_id) AS project,
       to_char(e.start, 'YYYY-MM-DD HH24:MI') AS start, to_char(e."end", 'YYYY-MM-DD HH24:MI') AS "end",
       e.captures_count AS captures, e.detections_count AS detections, e.occurrences_count AS occurrences
FROM main_event e
LEFT JOIN main_deployment d ON d.id = e.deployment_id
WHERE ($1::int8 IS NULL OR coalesce(e.project_id, d.project_id) = $1) AND ($2::int8 IS NULL OR e.deployment_id = $2)
  AND ($3::text::date IS NULL OR e.start >= $3::text::date)
  AND ($4::text::date IS NULL OR e.start < $4::text::date + 1)
ORDER BY e.start, e.id"#;

/// Prints the requested rows.
pub async fn run(args: CountsArgs) -> anyhow::Result<ExitCode> {
    for date in [&args.from, &args.to].into_iter().flatten() {
        anyhow::ensure!(is_date(date), "--from / --to take a date as YYYY-MM-DD, not {date:?}");
    }
    let store = store::connect(&args.db).await?;
    store::check::check_schema(&store).await?;
    let client = store.client().await?;
    let sql = match args.level {
        Level::Projects => PROJECTS,
        Level::Deployments => DEPLOYMENTS,
        Level::Events => EVENTS,
    };
    let columns: Vec<String> = client.prepare(sql).await?.columns().iter().map(|c| c.name().to_string()).collect();
    let wrapped = format!("SELECT row_to_json(x)::text FROM ({sql}) x");
    let rows = client.query(&wrapped, &[&args.project, &args.deployment, &args.from, &args.to]).await?;
    let records: Vec<serde_json::Map<String, Value>> = rows
        .iter()
        .map(|r| serde_json::from_str::<serde_json::Map<String, Value>>(r.get::<_, &str>(0)))
        .collect::<Result<_, _>>()?;
    let cell = |v: Option<&Value>| match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
    };
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&records)?),
        Format::Csv => {
            println!("{}", columns.join(","));
            for r in &records {
                let cells: Vec<String> = columns.iter().map(|c| csv_escape(&cell(r.get(c)))).collect();
                println!("{}", cells.join(","));
            }
        }
        Format::Table => {
            let header: Vec<String> = columns
                .iter()
                .map(|c| {
                    if matches!(c.as_str(), "name" | "start" | "end" | "first_capture" | "last_capture") {
                        c.clone()
                    } else {
                        format!(">{c}")
                    }
                })
                .collect();
            let header: Vec<&str> = header.iter().map(String::as_str).collect();
            let mut t = Table::new(&header);
            for r in &records {
                t.row(columns.iter().map(|c| cell(r.get(c))).collect());
            }
            print!("{}", t.render());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && s.chars().enumerate().all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

fn csv_escape(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}
