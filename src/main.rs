//! `churnlog`: the command line. Each command lives in its own file under `cli/`; this
//! file only sets up logging and maps errors to the exit code.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("CHURNLOG_LOG").unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    match cli::run(cli::Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("churnlog: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
