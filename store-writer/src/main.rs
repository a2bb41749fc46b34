//! `stockade-store-writer`: the only process that writes the store and its database. Started
//! by the master with its control channel as a descriptor (`--control-fd 3`), never by hand.

use std::os::fd::RawFd;

use clap::Parser;
use stockade_common::ipc::Channel;

#[derive(Parser, Debug)]
#[command(name = "stockade-store-writer", version)]
struct Args {
    /// File descriptor of the control channel the master hands over.
    #[arg(long)]
    control_fd: RawFd,
}

fn main() {
    // Staged files are created with their final modes (0444, 0555): nothing may mask them.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
    stockade_common::child::init_logging("stockade-store-writer");
    let args = Args::parse();
    let Some(fd) = stockade_common::child::inherited_fd(args.control_fd) else {
        eprintln!(
            "stockade-store-writer: descriptor {} is not an open control channel",
            args.control_fd
        );
        std::process::exit(1);
    };
    let control = match Channel::from_fd(fd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stockade-store-writer: control channel: {e}");
            std::process::exit(1);
        }
    };
    std::process::exit(stockade_store_writer::control::serve(control));
}
