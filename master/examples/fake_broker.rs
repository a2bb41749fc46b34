//! Test double for `stockade-broker`: receives `Start` from the master and writes one line about
//! itself and its client to the client socket, then waits for the client to hang up.
//!
//! The line: `conn=N client-uid=U trusted=B … confinement=… seccomp-mode=… Uid=… Gid=… Groups=…
//! CapEff=… … fds=…`.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use stockade_common::ipc::msg::MasterToBroker;
use stockade_common::ipc::Channel;

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

fn fail(msg: &str) -> ! {
    eprintln!("fake-broker: {msg}");
    std::process::exit(2);
}

fn main() {
    // SAFETY: the master passes the start channel as fd 3 and nothing else uses that number.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let mut chan = Channel::from_fd(fd).unwrap_or_else(|e| fail(&e.to_string()));
    // Before receiving: what the broker was started with.
    let fds_at_start = open_fds();
    let (msg, mut fds) = chan
        .recv::<MasterToBroker>()
        .unwrap_or_else(|e| fail(&e.to_string()));
    let MasterToBroker::Start(cfg) = msg else {
        fail("not Start")
    };
    if fds.len() != 3 {
        fail("expected three descriptors");
    }
    let _builder_end = fds.pop().unwrap_or_else(|| fail("no builder end"));
    let writer_end = fds.pop().unwrap_or_else(|| fail("no writer end"));
    let client = fds.pop().unwrap_or_else(|| fail("no client"));
    let mut client = UnixStream::from(client);
    // Who created the other end of the socket we serve: the client itself, or the master when
    // it splices pipes.
    let peer_pid = stockade_common::ipc::peer_cred(&client).map_or(0, |c| c.pid);
    let line = format!(
        "conn={} peer-pid={peer_pid} client-uid={} client-pid={} trusted={} store={} \
         confinement={:?} seccomp-mode={:?} {} fds-at-start={}\n",
        cfg.client.conn_id,
        cfg.client.uid,
        cfg.client.pid,
        cfg.client.trusted,
        cfg.store_dir,
        cfg.lockdown.confinement,
        cfg.lockdown.seccomp,
        status_words(&[
            "Uid",
            "Gid",
            "Groups",
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
            "Seccomp"
        ]),
        fds_at_start
    );
    let _ = client.write_all(line.as_bytes());
    let mut sink = [0u8; 256];
    while let Ok(n) = client.read(&mut sink) {
        if n == 0 {
            break;
        }
    }
    drop(writer_end);
}
