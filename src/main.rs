//! `tradeeon`: one binary for every role. With no subcommand it runs `serve` — API, workers and
//! scheduler in one process on the embedded SQLite default.

mod cli;

use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: the API allocates per request (JSON, HTTP buffers, job
/// records) from many threads at once, where glibc's arenas cost ~9 % of its CPU under load.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::main()
}
