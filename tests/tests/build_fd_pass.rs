//! CVE-2024-27297's shape, through a real `nix-build`: a fixed-output builder shares the host's
//! network namespace, creates its output, opens it read-write and sends that descriptor over an
//! abstract unix socket to a process outside the build, which writes through it once the output
//! is registered. Two defences stand in the way, each shown to fail with a test-only switch
//! (scripts/defences.txt): Landlock's abstract-socket scoping in the sandbox, so the builder
//! cannot connect; and the store-writer copying a fixed output in rather than moving it, so a
//! descriptor to the staged file does not reach the stored one. Needs root.

use std::fs::{self, File};
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::thread::JoinHandle;

use nix::sys::socket::{
    getsockopt, recvmsg, sockopt::PeerCredentials, ControlMessageOwned, MsgFlags,
};
use sha2::{Digest, Sha256};
use stockade_tests::{skip_unless_root, Daemon, DaemonKind};

const ORIGINAL: &[u8] = b"original\n";
const TAMPERED: &[u8] = b"tampered\n";

/// What the host's listener saw while the build ran.
struct Seen {
    /// Connections from anyone but this process (the builder's).
    connections: usize,
    /// The descriptor a builder passed, if one did.
    fd: Option<OwnedFd>,
}

/// An abstract listener on the host, served by a thread so that the probe's wait for its ack
/// never holds up the build; [`Host::finish`] ends it.
struct Host {
    addr: SocketAddr,
    thread: JoinHandle<Seen>,
}

impl Host {
    fn listen(name: &str) -> Host {
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixListener::bind_addr(&addr).unwrap();
        let me = std::process::id() as i32;
        let thread = std::thread::spawn(move || {
            let mut seen = Seen {
                connections: 0,
                fd: None,
            };
            loop {
                let (mut s, _) = listener.accept().expect("accept");
                let peer = getsockopt(&s, PeerCredentials).expect("SO_PEERCRED");
                if peer.pid() == me {
                    // Our own connection from `finish`: the build is over.
                    return seen;
                }
                seen.connections += 1;
                if let Some(fd) = receive_fd(&s) {
                    seen.fd = Some(fd);
                    s.write_all(b"k").expect("ack");
                }
            }
        });
        Host { addr, thread }
    }

    fn finish(self) -> Seen {
        UnixStream::connect_addr(&self.addr).expect("waking the listener");
        self.thread.join().expect("the listener thread")
    }
}

/// The one descriptor sent with a byte of data, if any.
fn receive_fd(s: &UnixStream) -> Option<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .expect("recvmsg");
    let mut fds = msg.cmsgs().expect("cmsgs").flat_map(|c| match c {
        ControlMessageOwned::ScmRights(fds) => fds,
        _ => Vec::new(),
    });
    // SAFETY: SCM_RIGHTS just installed this descriptor in our table; nothing else owns it.
    fds.next().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What one attack did: the daemon, the registered output, the build's stderr and the
/// listener's view.
struct Attack {
    d: Daemon,
    out: String,
    log: String,
    seen: Seen,
}

/// Builds a fixed-output derivation (named `name`, with the right hash) whose builder passes
/// its open output to a listener on the host.
fn attack(name: &str) -> Attack {
    attack_with(name, ORIGINAL)
}

/// [`attack`] with the hash of `claimed` as the output hash: the build fails (V6) unless
/// `claimed` is what the probe writes.
fn attack_with(name: &str, claimed: &[u8]) -> Attack {
    // No build-users-group: Stockade's own uid range, out of reach of a concurrent nix-daemon.
    let d = Daemon::builder(DaemonKind::Stockade)
        .conf_line("sandbox = true")
        .start()
        .expect("stockade");
    let bb = d.add_busybox();
    let probe = d.add_static_probe();
    let socket = format!("stockade-fdpass-{}-{name}", std::process::id());
    let host = Host::listen(&socket);
    let hash: String = Sha256::digest(claimed)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let script = format!("$PROBE/bin/probe pass-fd {socket} $out");
    let expr = format!(
        "let bb = builtins.storePath \"{bb}\"; in derivation {{ name = \"{name}\"; \
         system = builtins.currentSystem; builder = \"${{bb}}/bin/sh\"; \
         PATH = \"${{bb}}/bin\"; PROBE = builtins.storePath \"{probe}\"; \
         args = [ \"-c\" {} ]; outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; \
         outputHash = \"{hash}\"; }}",
        stockade_tests::nix_string(&script)
    );
    let built = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .output();
    let seen = host.finish();
    assert_eq!(
        built.success(),
        claimed == ORIGINAL,
        "the build's outcome is not the expected one: {built}"
    );
    let out = built.stdout_str().trim_end().to_string();
    let log = built.stderr_str();
    eprintln!("the build said:\n{log}");
    Attack { d, out, log, seen }
}

/// Landlock's scoping: the builder cannot connect to the host's abstract socket, so no
/// descriptor leaves the sandbox (and the build still succeeds).
#[test]
fn a_fixed_output_builder_cannot_pass_a_descriptor_out() {
    skip_unless_root!();
    let a = attack("pass-fd-landlock");
    assert!(
        a.log.contains("pass-fd: refused") && !a.log.contains("pass-fd: sent"),
        "the probe's line is missing or says it sent:\n{}",
        a.log
    );
    assert_eq!(
        a.seen.connections, 0,
        "the host's listener got a connection from the builder"
    );
    assert!(a.seen.fd.is_none());
}

/// The store-writer copies a fixed output in: even with a descriptor to the builder's file in
/// hand (Landlock off), writing through it leaves the stored output and its hash as they were.
/// With Landlock on nothing arrives; whatever the probe says must match what the host saw.
#[test]
fn a_passed_descriptor_cannot_change_the_stored_output() {
    skip_unless_root!();
    let a = attack("pass-fd-copy");
    // nix-build has returned: the output is registered.
    let stored = a.d.host_path(&a.out);
    if a.log.contains("pass-fd: sent") {
        let fd = a.seen.fd.as_ref().unwrap_or_else(|| {
            panic!(
                "the probe sent a descriptor the host never received:\n{}",
                a.log
            )
        });
        // The attacker's move, now that the path is valid; the descriptor itself is writable.
        File::from(fd.try_clone().expect("dup"))
            .write_all_at(TAMPERED, 0)
            .expect("writing through the builder's descriptor");
        eprintln!(
            "wrote {:?} through the descriptor the builder passed out",
            String::from_utf8_lossy(TAMPERED)
        );
    } else {
        assert!(a.log.contains("pass-fd: refused"), "{}", a.log);
        assert_eq!(a.seen.connections, 0, "a connection without a descriptor");
    }
    let now = fs::read(&stored).expect("the stored output");
    assert_eq!(
        String::from_utf8_lossy(&now),
        String::from_utf8_lossy(ORIGINAL),
        "the stored output {} changed",
        a.out
    );
    a.d.run_ok(["nix-store", "--verify-path", &a.out]);
}

/// CVE-2025-46416: the V1 attack with a fixed-output derivation that fails (its output does
/// not match the claimed hash), whose output is deleted, not registered. The builder still
/// cannot connect out (Landlock's scoping; `without-landlock` shows it fails), and whatever
/// descriptor did leave names a file that is gone from the staging directory once the build
/// has failed, nor is anything registered.
#[test]
fn v6_a_failing_fixed_output_builder_cannot_pass_a_descriptor_out() {
    skip_unless_root!();
    let a = attack_with("pass-fd-failing", TAMPERED);
    if let Some(fd) = &a.seen.fd {
        let st = nix::sys::stat::fstat(fd.as_raw_fd()).expect("fstat");
        eprintln!("a descriptor arrived; its file has {} links", st.st_nlink);
        assert_eq!(st.st_nlink, 0, "the failed output was not deleted");
    }
    assert!(
        a.log.contains("pass-fd: refused") && !a.log.contains("pass-fd: sent"),
        "the probe's line is missing or says it sent:\n{}",
        a.log
    );
    assert_eq!(
        a.seen.connections, 0,
        "the host's listener got a connection from the failing builder"
    );
    assert!(a.out.is_empty(), "{}", a.out);
}
