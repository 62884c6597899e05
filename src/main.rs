//! `tradeeon`: one binary for every role. With no subcommand it runs `serve` — API, workers and
//! scheduler in one process on the embedded SQLite default.

mod cli;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::main()
}
