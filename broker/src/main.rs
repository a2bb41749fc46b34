//! `stockade-broker`: the unprivileged worker-protocol server for one client.
//!
//! Exec'd by the master under a uid of its own with no capabilities. Everything it needs
//! arrives on fd 3 in one `MasterToBroker::Start` message: the client's socket, its channel to
//! the store-writer and its configuration. It locks itself down before reading a byte from the
//! client, then serves the session and exits.

mod budget;
mod builder;
mod conn;
mod ctx;
mod error;
mod goals;
mod handlers;
mod lockdown;
mod reply;
mod serve;
mod session;
mod start;
mod store;

use std::process::ExitCode;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "stockade-broker",
    version,
    about = "Stockade's per-client protocol server (started by the master)"
)]
struct Args {
    /// Descriptor of the start channel from the master.
    #[arg(long, default_value_t = 3)]
    control_fd: i32,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    serve::serve(start::start(args.control_fd)?)
}
