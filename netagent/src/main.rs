//! `netagent`: the daemon (`netagent up`) and the CLI that drives it.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = netagent::cli::Cli::parse();
    match netagent::cli::run(cli) {
        Ok(code) => code,
        Err(e) => {
            // One line per problem (configuration errors may list several).
            for line in e.to_string().lines() {
                eprintln!("netagent: {line}");
            }
            ExitCode::FAILURE
        }
    }
}
