//! The `tally` binary: parse arguments, set up logging, run the subcommand.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tally::memory::return_large_frees();
    let cli = tally::cli::Cli::parse();
    tally::telemetry::init(&cli.log);
    match tally::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
