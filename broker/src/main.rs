//! `stockade-broker`: the unprivileged worker-protocol server for one client. Started by the master, never by hand; a stub until its issue lands.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "stockade-broker", version)]
struct Args {
    /// File descriptor of the control channel the master hands over.
    #[arg(long)]
    control_fd: Option<i32>,
}

fn main() {
    let args = Args::parse();
    eprintln!("stockade-broker: not implemented yet ({args:?})");
    std::process::exit(1);
}
