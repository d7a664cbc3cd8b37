//! `tally dead-letters list|show|replay`: inspect the result messages ingest could not save,
//! and re-publish them once the cause is fixed.

use std::io::Write;
use std::process::ExitCode;

use clap::{Args, Subcommand, ValueEnum};

use crate::config::{DbArgs, NatsArgs};
use crate::dead_letters::{self, DeadLetter, DeadLetterSummary, ListFilter, ReasonCount};
use crate::store;
use crate::table::{thousands, Table};

/// The dead-letter commands.
#[derive(Debug, Subcommand)]
pub enum DeadLettersCommand {
    /// List dead letters, newest first, with a count per reason. Only those never replayed
    /// unless `--all`.
    List(ListArgs),
    /// Print one dead letter: its metadata, then its payload (pretty-printed when it is JSON).
    Show(ShowArgs),
    /// Re-publish dead letters, payload unchanged, to the subject they arrived on, so that
    /// ingest tries them again (after fixing the cause: a missing pipeline, image or job).
    /// Each publish gets a new `Nats-Msg-Id` (`tally-replay-{id}-{n}`) and a `Tally-Replay-Of`
    /// header; a replay that fails again becomes a new dead letter.
    Replay(ReplayArgs),
}

/// Output format of `list`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Aligned text, reasons truncated.
    Table,
    /// One JSON document, nothing truncated.
    Json,
}

/// Options of `tally dead-letters list`.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// Only this job's dead letters (the per-reason counts too).
    #[arg(long)]
    pub job: Option<i64>,
    /// Only dead letters with this reason code (e.g. invalid_json, unknown_image).
    #[arg(long)]
    pub reason: Option<String>,
    /// Include dead letters already replayed.
    #[arg(long)]
    pub all: bool,
    /// Show at most this many (the newest).
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Table)]
    pub format: Format,
}

/// Options of `tally dead-letters show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// The dead letter's id (from `list`).
    pub id: i64,
    /// Write only the payload, byte for byte, to stdout (e.g. to a file for a fix-up).
    #[arg(long)]
    pub raw: bool,
}

/// Options of `tally dead-letters replay`.
#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Database options.
    #[command(flatten)]
    pub db: DbArgs,
    /// NATS options.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// The dead letters to replay (replayed again even if replayed before).
    #[arg(value_name = "ID", required_unless_present = "all", conflicts_with = "all")]
    pub ids: Vec<i64>,
    /// Replay every dead letter never replayed (narrowed by `--job` and `--reason`), oldest
    /// first.
    #[arg(long)]
    pub all: bool,
    /// With `--all`: only this job's.
    #[arg(long, conflicts_with = "ids")]
    pub job: Option<i64>,
    /// With `--all`: only those with this reason code.
    #[arg(long, conflicts_with = "ids")]
    pub reason: Option<String>,
    /// Print what would be published, publish nothing and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Runs a dead-letter command.
pub async fn run(command: DeadLettersCommand) -> anyhow::Result<ExitCode> {
    match command {
        DeadLettersCommand::List(args) => list(args).await,
        DeadLettersCommand::Show(args) => show(args).await,
        DeadLettersCommand::Replay(args) => replay(args).await,
    }
}

async fn open(db: &DbArgs) -> anyhow::Result<store::Store> {
    let store = store::connect(db).await?;
    dead_letters::check_table(&store).await?;
    Ok(store)
}

/// Reasons longer than this are cut in the table (`show` and JSON have them whole).
const REASON_WIDTH: usize = 60;

async fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.limit > 0, "--limit must be at least 1");
    let store = open(&args.db).await?;
    let filter = ListFilter {
        job: args.job,
        reason_code: args.reason.clone(),
        include_replayed: args.all,
        limit: Some(args.limit),
    };
    let letters = dead_letters::list(&store, &filter).await?;
    let by_reason = dead_letters::counts_by_reason(&store, args.job).await?;
    match args.format {
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"dead_letters": letters, "by_reason": by_reason}))?
        ),
        Format::Table => {
            if !letters.is_empty() {
                print!("{}", render(&letters));
            }
            println!("{}", summary_line(&by_reason));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn render(letters: &[DeadLetterSummary]) -> String {
    let mut t = Table::new(&[">id", "received_at", ">job", "reason_code", "reason", ">delivered", ">size", "replayed"]);
    for l in letters {
        t.row(vec![
            l.id.to_string(),
            l.received_at.clone(),
            l.job_id.map(|j| j.to_string()).unwrap_or_default(),
            l.reason_code.clone(),
            truncate(&l.reason, REASON_WIDTH),
            l.delivered.map(|d| d.to_string()).unwrap_or_default(),
            thousands(l.size),
            replayed(l),
        ]);
    }
    t.render()
}

fn replayed(l: &DeadLetterSummary) -> String {
    match l.replay_count {
        0 => "no".to_string(),
        1 => "yes".to_string(),
        n => format!("yes ×{n}"),
    }
}

/// `s` on one line, cut to `width` characters with an ellipsis.
fn truncate(s: &str, width: usize) -> String {
    let line: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.chars().count() <= width {
        line
    } else {
        let cut: String = line.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// "5 not replayed (invalid_json 3, unknown_image 2); 1 replayed".
fn summary_line(by_reason: &[ReasonCount]) -> String {
    let pending: i64 = by_reason.iter().map(|r| r.pending).sum();
    let replayed: i64 = by_reason.iter().map(|r| r.replayed).sum();
    if pending + replayed == 0 {
        return "no dead letters".to_string();
    }
    let reasons: Vec<String> =
        by_reason.iter().filter(|r| r.pending > 0).map(|r| format!("{} {}", r.reason_code, r.pending)).collect();
    let mut line = format!("{pending} not replayed");
    if !reasons.is_empty() {
        line.push_str(&format!(" ({})", reasons.join(", ")));
    }
    line.push_str(&format!("; {replayed} replayed"));
    line
}

async fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args.db).await?;
    let Some(letter) = dead_letters::get(&store, args.id).await? else {
        anyhow::bail!("no dead letter with id {} (see `tally dead-letters list --all`)", args.id);
    };
    let mut out = std::io::stdout().lock();
    if args.raw {
        out.write_all(&letter.payload)?;
    } else {
        out.write_all(describe(&letter).as_bytes())?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The metadata, one `name  value` line each, then the payload.
fn describe(letter: &DeadLetter) -> String {
    let s = &letter.summary;
    let opt = |v: Option<String>| v.unwrap_or_else(|| "—".to_string());
    let replays = match &s.replayed_at {
        None => "never".to_string(),
        Some(at) => format!("{} times, last {at}", s.replay_count),
    };
    let headers = letter.headers.as_ref().map(|h| h.to_string());
    let fields = [
        ("id", s.id.to_string()),
        ("received_at", s.received_at.clone()),
        ("subject", s.subject.clone()),
        ("job", opt(s.job_id.map(|j| j.to_string()))),
        ("reply_subject", opt(s.reply_subject.clone())),
        ("stream_sequence", opt(s.stream_sequence.map(|q| q.to_string()))),
        ("delivered", opt(s.delivered.map(|d| d.to_string()))),
        ("reason_code", s.reason_code.clone()),
        ("reason", s.reason.clone()),
        ("size", format!("{} bytes", thousands(s.size))),
        ("replayed", replays),
        ("headers", opt(headers)),
    ];
    let mut out = String::new();
    for (name, value) in fields {
        out.push_str(&format!("{name:<16}{value}\n"));
    }
    let (kind, body) = match pretty_json(&letter.payload) {
        Some(pretty) => ("JSON", pretty),
        None => {
            ("not JSON, shown as UTF-8 with invalid bytes replaced", String::from_utf8_lossy(&letter.payload).into())
        }
    };
    out.push_str(&format!("\npayload ({kind}):\n{body}"));
    if !body.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// `payload` re-indented when it is valid JSON. Keys keep their order and numbers their
/// spelling (parsing into a `Value` would sort keys and reformat numbers, which hides what the
/// sender actually sent).
fn pretty_json(payload: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(payload).ok()?;
    let text = std::str::from_utf8(payload).ok()?;
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.push_str(&"  ".repeat(depth));
    };
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                out.push(c);
                let mut escaped = false;
                for c in chars.by_ref() {
                    out.push(c);
                    match c {
                        _ if escaped => escaped = false,
                        '\\' => escaped = true,
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '{' | '[' => {
                out.push(c);
                while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
                if let Some(close) = chars.next_if(|n| matches!((c, n), ('{', '}') | ('[', ']'))) {
                    out.push(close);
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            c => out.push(c),
        }
    }
    out.push('\n');
    Some(out)
}

async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let store = open(&args.db).await?;
    let ids: Vec<i64> = if args.all {
        let filter =
            ListFilter { job: args.job, reason_code: args.reason.clone(), include_replayed: false, limit: None };
        // Oldest first, so replays reach the stream in the order the originals did.
        dead_letters::list(&store, &filter).await?.iter().rev().map(|l| l.id).collect()
    } else {
        args.ids.clone()
    };
    if ids.is_empty() {
        println!("nothing to replay");
        return Ok(ExitCode::SUCCESS);
    }
    if args.dry_run {
        let found = dead_letters::summaries(&store, &ids).await?;
        for l in &found {
            println!(
                "would publish dead letter {} to {} ({} bytes, Nats-Msg-Id {})",
                l.id,
                l.subject,
                thousands(l.size),
                dead_letters::replay_msg_id(l.id, l.replay_count.saturating_add(1))
            );
        }
        let missing: Vec<String> =
            ids.iter().filter(|id| !found.iter().any(|l| l.id == **id)).map(|id| id.to_string()).collect();
        if !missing.is_empty() {
            eprintln!("no dead letter with id {}", missing.join(", "));
        }
        println!("dry run: {} would be published; nothing was changed", found.len());
        return Ok(if missing.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
    }
    let client = args.nats.connect().await?;
    wait_connected(&client, &args.nats).await?;
    let js = async_nats::jetstream::new(client);
    let max_age = crate::ingest::nats::ConsumerArgs::default().max_age();
    let objects = crate::results_stream::ensure_bucket(&js, &args.nats.results_object_bucket, max_age).await?;
    let report = dead_letters::replay_with(&store, &js, &objects, &ids).await?;
    for p in &report.published {
        let duplicate = if p.duplicate { " (already in the stream: not stored again)" } else { "" };
        println!(
            "published dead letter {} to {} ({} bytes): stream {} sequence {}, Nats-Msg-Id {}{duplicate}",
            p.id,
            p.subject,
            thousands(p.size as u64),
            p.stream,
            p.sequence,
            p.msg_id
        );
    }
    for f in &report.failed {
        eprintln!("failed to publish dead letter {} to {}: {}", f.id, f.subject, f.error);
    }
    if !report.missing.is_empty() {
        let missing: Vec<String> = report.missing.iter().map(i64::to_string).collect();
        eprintln!("no dead letter with id {}", missing.join(", "));
    }
    println!(
        "replayed {} dead letters; {} failed; {} not found",
        report.published.len(),
        report.failed.len(),
        report.missing.len()
    );
    Ok(if report.failed.is_empty() && report.missing.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Waits for the first connection. `NatsArgs::connect` retries the initial connection in the
/// background and returns at once, so without this an unreachable server shows up only as
/// publish-ack timeouts, one per dead letter, instead of one clear error.
async fn wait_connected(client: &async_nats::Client, nats: &NatsArgs) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + nats.nats_connect_timeout;
    while client.connection_state() != async_nats::connection::State::Connected {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "cannot connect to NATS at {} within {} s (is nats-server running with -js?)",
            nats.nats_url,
            nats.nats_connect_timeout.as_secs_f64()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_json_keeps_order_numbers_and_strings() {
        let raw = br#"{"z":1.50,"a":[ ],"s":"a,b:{\"}","o":{"k":[1,2]},"e":{}}"#;
        let pretty = pretty_json(raw).expect("valid JSON");
        let expected = "{\n  \"z\": 1.50,\n  \"a\": [],\n  \"s\": \"a,b:{\\\"}\",\n  \"o\": {\n    \"k\": [\n      1,\n      2\n    ]\n  },\n  \"e\": {}\n}\n";
        assert_eq!(pretty, expected);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&pretty).expect("still JSON"),
            serde_json::from_slice::<serde_json::Value>(raw).expect("JSON")
        );
        assert_eq!(pretty_json(b"{\"a\": NaN}"), None);
        assert_eq!(pretty_json(b"\xff"), None);
        assert_eq!(pretty_json(b"42").as_deref(), Some("42\n"));
    }

    #[test]
    fn truncates_and_summarises() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("a\nlong  reason here", 8), "a long …");
        let counts = [
            ReasonCount { reason_code: "invalid_json".into(), pending: 3, replayed: 1 },
            ReasonCount { reason_code: "unknown_image".into(), pending: 0, replayed: 2 },
        ];
        assert_eq!(summary_line(&counts), "3 not replayed (invalid_json 3); 3 replayed");
        assert_eq!(summary_line(&[]), "no dead letters");
    }
}
