//! `stockade-store-writer`: the only process that writes the store and its database. Started by the master, never by hand; a stub until its issue lands.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "stockade-store-writer", version)]
struct Args {
    /// File descriptor of the control channel the master hands over.
    #[arg(long)]
    control_fd: Option<i32>,
}

fn main() {
    let args = Args::parse();
    eprintln!("stockade-store-writer: not implemented yet ({args:?})");
    std::process::exit(1);
}
