//! The `tally-tools` binary: parse arguments, set up logging, run the tool.

use clap::Parser;

fn main() -> std::process::ExitCode {
    tally::memory::return_large_frees();
    let cli = tally_tools::cli::Cli::parse();
    tally::telemetry::init(&cli.log);
    match tally_tools::cli::run(cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
