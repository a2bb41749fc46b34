//! Test client: connect to the socket named by argv[1], print the first line the server sends,
//! or `CLOSED` when it closes without sending anything; with `--hold`, keep the connection open
//! until standard input ends.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(path) = args.get(1) else {
        eprintln!("usage: probe SOCKET [--hold]");
        std::process::exit(2);
    };
    let hold = args.iter().any(|a| a == "--hold");
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            println!("CONNECT-FAILED {e}");
            return;
        }
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) | Err(_) => println!("CLOSED"),
        Ok(_) => print!("{line}"),
    }
    if hold {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
    }
}
