//! Test double for `stockade-builder-helper`: speaks the master's control protocol (`Hello`,
//! `Start` → `Ready`) and records what it is told in `$STOCKADE_FAKE_LOG`; brokers' build
//! channels are closed at once.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

use stockade_common::ipc::builder::{BuilderToMaster, MasterToBuilder};
use stockade_common::ipc::msg::VERSION;
use stockade_common::ipc::Channel;

fn log(line: &str) {
    if let Some(path) = std::env::var_os("STOCKADE_FAKE_LOG") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            // One write(2) per line: the two doubles append to the same file, and a
            // formatted `writeln!` may split a line into several writes that interleave.
            let _ = f.write_all(format!("{line}\n").as_bytes());
        }
    }
}

fn main() {
    // SAFETY: the master passes the control channel as fd 3 and nothing else in this process
    // uses that number.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let Ok(mut chan) = Channel::from_fd(fd) else {
        std::process::exit(2);
    };
    while let Ok((msg, _fds)) = chan.recv::<MasterToBuilder>() {
        let reply = match msg {
            MasterToBuilder::Hello { .. } => Some(BuilderToMaster::Hello { version: VERSION }),
            MasterToBuilder::Start(_) => Some(BuilderToMaster::Ready),
            MasterToBuilder::NewClient { client } => {
                log(&format!("helper-new-client conn={}", client.conn_id));
                None
            }
            MasterToBuilder::Shutdown => return,
            _ => None,
        };
        if let Some(r) = reply {
            if chan.send(&r, &[]).is_err() {
                std::process::exit(2);
            }
        }
    }
}
