//! `stockade`: the master process. For now it only parses its command line; the accept loop and
//! supervision arrive with the daemon issue.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "stockade",
    version,
    about = "Privilege-separated Nix store daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the store daemon in the foreground.
    Daemon(DaemonArgs),
}

#[derive(clap::Args, Debug)]
struct DaemonArgs {
    /// Serve one client on standard input/output instead of listening on the socket.
    #[arg(long)]
    stdio: bool,
    /// Treat the client as trusted.
    #[arg(long, conflicts_with_all = ["force_untrusted", "default_trust"])]
    force_trusted: bool,
    /// Treat the client as untrusted.
    #[arg(long, conflicts_with_all = ["force_trusted", "default_trust"])]
    force_untrusted: bool,
    /// Decide trust from the configuration (the default).
    #[arg(long)]
    default_trust: bool,
    /// Override a nix.conf setting.
    #[arg(long = "option", num_args = 2, value_names = ["NAME", "VALUE"])]
    option: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    match cli.command {
        Command::Daemon(args) => {
            eprintln!("stockade: the daemon is not implemented yet ({args:?})");
            std::process::exit(1);
        }
    }
}
