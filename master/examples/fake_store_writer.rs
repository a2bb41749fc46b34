//! Test double for `stockade-store-writer`: speaks the master's control protocol and records
//! what it is told, and what it can do, in `$STOCKADE_FAKE_LOG` (one line per event).
//! `STOCKADE_FAKE_WRITER_FAIL=REASON` makes it answer `Start` with `Failed`.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

use stockade_common::ipc::msg::{MasterToStoreWriter, StoreWriterToMaster, VERSION};
use stockade_common::ipc::{Channel, Error};

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

/// `Name:\tvalue` fields of /proc/self/status, as `name=value` words.
fn status_words(names: &[&str]) -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut out = Vec::new();
    for l in status.lines() {
        if let Some((k, v)) = l.split_once(':') {
            if names.contains(&k) {
                out.push(format!(
                    "{k}={}",
                    v.split_whitespace().collect::<Vec<_>>().join(",")
                ));
            }
        }
    }
    out.join(" ")
}

fn open_fds() -> String {
    // Probing with fcntl opens nothing itself (listing /proc/self/fd would add its own fd).
    (0..1024)
        .filter(|fd| nix::fcntl::fcntl(*fd, nix::fcntl::FcntlArg::F_GETFD).is_ok())
        .map(
            |fd: i32| match std::fs::read_link(format!("/proc/self/fd/{fd}")) {
                Ok(t) if fd > 3 => format!("{fd}:{}", t.display()),
                _ => fd.to_string(),
            },
        )
        .collect::<Vec<_>>()
        .join(",")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) != Some("--control-fd")
        || args.get(2).map(String::as_str) != Some("3")
    {
        eprintln!("fake-store-writer: expected --control-fd 3, got {args:?}");
        std::process::exit(2);
    }
    log(&format!(
        "writer-start {} fds={}",
        status_words(&[
            "Uid",
            "Gid",
            "Groups",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs"
        ]),
        open_fds()
    ));
    // SAFETY: the master passes the control channel as fd 3 and nothing else in this process
    // uses that number.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let mut chan = match Channel::from_fd(fd) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fake-store-writer: {e}");
            std::process::exit(2);
        }
    };
    let mut clients: HashMap<u64, Vec<OwnedFd>> = HashMap::new();
    loop {
        let (msg, fds) = match chan.recv::<MasterToStoreWriter>() {
            Ok(m) => m,
            Err(Error::Closed) => {
                log("writer-eof");
                return;
            }
            Err(e) => {
                eprintln!("fake-store-writer: {e}");
                std::process::exit(2);
            }
        };
        let reply = match msg {
            MasterToStoreWriter::Hello { version } => {
                log(&format!("hello version={version}"));
                Some(StoreWriterToMaster::Hello { version: VERSION })
            }
            MasterToStoreWriter::Start(cfg) => {
                log(&format!(
                    "start store={} state={} log={} as_root={} require_sigs={} audit={:?} \
                     confinement={:?} seccomp-mode={:?}",
                    cfg.store_dir,
                    cfg.state_dir,
                    cfg.log_dir,
                    cfg.as_root,
                    cfg.require_sigs,
                    cfg.audit_socket,
                    cfg.lockdown.confinement,
                    cfg.lockdown.seccomp
                ));
                match std::env::var("STOCKADE_FAKE_WRITER_FAIL") {
                    Ok(reason) => {
                        let _ = chan.send(&StoreWriterToMaster::Failed { reason }, &[]);
                        std::process::exit(1);
                    }
                    Err(_) => Some(StoreWriterToMaster::Ready),
                }
            }
            MasterToStoreWriter::NewClient { client } => {
                log(&format!(
                    "new-client conn={} uid={} gid={} pid={} trusted={} fds={}",
                    client.conn_id,
                    client.uid,
                    client.gid,
                    client.pid,
                    client.trusted,
                    fds.len()
                ));
                clients.insert(client.conn_id, fds);
                None
            }
            MasterToStoreWriter::ClientGone { conn_id } => {
                log(&format!(
                    "client-gone conn={conn_id} known={}",
                    clients.remove(&conn_id).is_some()
                ));
                None
            }
            MasterToStoreWriter::Shutdown => {
                log("shutdown");
                return;
            }
            MasterToStoreWriter::BuilderHelper => {
                log("builder-helper-channel");
                None
            }
            other => {
                log(&format!("unexpected {other:?}"));
                None
            }
        };
        if let Some(r) = reply {
            if let Err(e) = chan.send(&r, &[]) {
                eprintln!("fake-store-writer: {e}");
                std::process::exit(2);
            }
        }
    }
}
