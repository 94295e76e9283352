//! The `iotunnel` binary: parses arguments and calls [`iotunnel::cli::run`].
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = iotunnel::cli::Cli::parse();
    match iotunnel::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
