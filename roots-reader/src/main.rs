//! `stockade-roots-reader`: finds the store paths running processes use (runtime GC roots) in
//! `/proc`. Started once by the master with its control channel as a descriptor
//! (`--control-fd 3`), never by hand.

use std::os::fd::RawFd;

use clap::Parser;
use stockade_common::ipc::Channel;

#[derive(Parser, Debug)]
#[command(name = "stockade-roots-reader", version)]
struct Args {
    /// File descriptor of the control channel the master hands over.
    #[arg(long)]
    control_fd: RawFd,
}

fn main() {
    stockade_common::child::init_logging("stockade-roots-reader");
    let args = Args::parse();
    let Some(fd) = stockade_common::child::inherited_fd(args.control_fd) else {
        eprintln!(
            "stockade-roots-reader: descriptor {} is not an open control channel",
            args.control_fd
        );
        std::process::exit(1);
    };
    let control = match Channel::from_fd(fd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stockade-roots-reader: control channel: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = stockade_roots_reader::serve::serve(control, args.control_fd) {
        log::error!("{e}");
        std::process::exit(1);
    }
}
