//! A tiny HTTP/1.0 file server on 127.0.0.1 for fixed-output builds that download
//! (`builtin:fetchurl`): fixed-output builders share the host's network namespace, so both
//! nix-daemon's and Stockade's reach it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;

/// Serves `files` (URL path → body) until the test process ends; anything else is a 404.
/// Returns the port.
pub fn serve(files: BTreeMap<String, Vec<u8>>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test HTTP server");
    let port = listener.local_addr().expect("its address").port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(match conn.try_clone() {
                Ok(c) => c,
                Err(_) => continue,
            });
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // The headers, up to the empty line.
            let mut line = String::new();
            while reader.read_line(&mut line).map(|n| n > 2).unwrap_or(false) {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let reply = match files.get(path) {
                Some(body) => {
                    let mut r = format!(
                        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\r\n",
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(body);
                    r
                }
                None => b"HTTP/1.0 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n".to_vec(),
            };
            let _ = conn.write_all(&reply);
        }
    });
    port
}
