//! `stockade daemon --stdio --force-untrusted` (A57): the untrusted refusals apply even when
//! the account on the other end is in trusted-users.
//!
//! Two ways in:
//! - the real Nix client with `--store 'ssh-ng://localhost?remote-program=…'`: for the host
//!   name `localhost` Nix 2.8 skips ssh and runs `bash -c '<remote-program> --stdio'` itself,
//!   which is exactly an SSH forced command without the network. Run by an ordinary user, the
//!   `--stdio` process forwards to the running daemon's untrusted socket;
//! - the raw client over the pipes of a `--stdio` process run by root, which serves the store
//!   itself (its own store-writer and broker).
//!
//! Needs root (namespaces, useradd); fails loudly in CI without it.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use stockade_common::signature::SecretKey;
use stockade_common::store_path::StoreDir;
use stockade_common::worker::{ClientOptions, Verbosity};
use stockade_tests::raw::{
    export_stream, flat_nar, info_for, input_addressed_path, strip_ansi, RawConn,
};
use stockade_tests::sec::{instance_processes, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, stockade_bin, Daemon, RunOutput, User};

struct Setup {
    d: Daemon,
    audit: AuditCollector,
    alice: User,
    /// `ssh-ng://` store URLs whose remote program is `stockade daemon --force-untrusted`
    /// and plain `stockade daemon`.
    untrusted_url: String,
    default_url: String,
    /// A path st-alice added.
    path: String,
    evil: String,
}

fn wrapper(d: &Daemon, name: &str, args: &str) -> String {
    let bin = stockade_bin().expect("stockade binary");
    let p = d.write_work_file(
        name,
        format!("#!/bin/sh\nexec {} daemon {args} \"$@\"\n", bin.display()).as_bytes(),
    );
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("ssh-ng://localhost?remote-program={}", p.display())
}

fn setup() -> Setup {
    let alice = ensure_user("st-alice").unwrap();
    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("trusted-users = root st-alice")
        .start()
        .expect("stockade");
    let key = SecretKey::generate("test-key-1").unwrap();
    d.write_work_file("key", key.to_text().as_bytes());
    let f = d.write_work_file("alice.txt", b"alice's file\n");
    let path = d.run_as_ok(&alice, ["nix-store", "--add", f.to_str().unwrap()]);
    let sd = StoreDir::new("/nix/store").unwrap();
    let evil = input_addressed_path(&sd, "stdio-evil", "evil");
    let nar = flat_nar(b"unsigned\n");
    d.write_work_file(
        "unsigned.export",
        &export_stream(&info_for(&evil, &sd, &nar), &sd, &nar),
    );
    Setup {
        untrusted_url: wrapper(&d, "untrusted-stdio", "--force-untrusted"),
        default_url: wrapper(&d, "default-stdio", ""),
        d,
        audit,
        alice,
        path,
        evil,
    }
}

/// `cmd` (a shell command line using `$STORE`, `$WORK`, `$P`, `$EVIL`) as st-alice.
fn run(s: &Setup, store: &str, cmd: &str) -> RunOutput {
    s.d.cmd("sh")
        .args(["-c", cmd])
        .as_user(&s.alice)
        .env("STORE", store)
        .env("WORK", s.d.work_dir())
        .env("P", &s.path)
        .env("EVIL", &s.evil)
        .env("NIX_CONFIG", "experimental-features = nix-command")
        .output()
}

fn expect_refused(o: &RunOutput, text: &str) {
    assert!(!o.success(), "expected a refusal containing {text:?}: {o}");
    assert!(strip_ansi(&o.stderr_str()).contains(text), "{o}");
}

#[test]
fn force_untrusted_over_ssh_ng_refuses_a_trusted_account() {
    skip_unless_root!();
    let s = setup();
    let u = &s.untrusted_url;

    // Reads and content-addressed adds work.
    let o = run(&s, u, "nix path-info --store \"$STORE\" \"$P\"");
    assert!(o.success() && o.stdout_str().trim() == s.path, "{o}");
    let f = s.d.write_work_file("via-stdio.txt", b"added over stdio\n");
    let o = run(
        &s,
        u,
        &format!("nix-store --store \"$STORE\" --add {}", f.display()),
    );
    assert!(o.success(), "{o}");

    // The untrusted refusals, although st-alice is in trusted-users.
    expect_refused(
        &run(
            &s,
            u,
            "nix store sign --store \"$STORE\" --key-file $WORK/key \"$P\"",
        ),
        "you are not privileged to add signatures",
    );
    expect_refused(
        &run(
            &s,
            u,
            "nix-store --store \"$STORE\" --import < $WORK/unsigned.export",
        ),
        "lacks a valid signature",
    );
    expect_refused(
        &run(&s, u, "nix-store --store \"$STORE\" -r --repair \"$P\""),
        "repairing is not allowed because you are not in 'trusted-users'",
    );
    // (Nix 2.8's ssh-ng client never sends SetOptions, so `--option builders …` cannot be
    // tried this way; the raw-client tests below do.)

    // The daemon saw st-alice, untrusted, on the untrusted socket.
    let line = s.audit.wait_for(Duration::from_secs(20), |l| {
        l.contains(" accepted ")
            && l.contains(&format!(" uid={} ", s.alice.uid))
            && l.contains("socket=untrusted")
    });
    let line = line.unwrap_or_else(|| panic!("{:#?}", s.audit.lines()));
    assert!(line.contains("trusted=no"), "{line}");

    // Without --force-untrusted the same account is trusted (the contrast that shows the
    // refusals above come from the flag).
    let d = &s.default_url;
    let o = run(
        &s,
        d,
        "nix store sign --store \"$STORE\" --key-file $WORK/key \"$P\"",
    );
    assert!(o.success(), "{o}");
    let o = run(
        &s,
        d,
        "nix-store --store \"$STORE\" --import < $WORK/unsigned.export",
    );
    assert!(o.success(), "{o}");
}

/// The untrusted refusals on a raw connection to a `--stdio --force-untrusted` process.
fn untrusted_checks(c: &mut RawConn, s: &Setup, log: &dyn Fn() -> String) {
    let sd = StoreDir::new("/nix/store").unwrap();
    c.handshake()
        .unwrap_or_else(|e| panic!("handshake: {e}\n{}", log()));
    let mut opts = ClientOptions {
        verbosity: Verbosity::Debug,
        ..Default::default()
    };
    opts.overrides
        .insert("builders".into(), "ssh://evil x86_64-linux".into());
    let resp = c.set_client_options(&opts).unwrap();
    assert!(resp.is_ok(), "{resp:?}");
    assert!(
        resp.logs.iter().any(|l| l.contains(
            "ignoring the client-specified setting 'builders', because it is a restricted setting and you are not a trusted user"
        )),
        "{resp:?}"
    );
    assert_eq!(c.is_valid_path(&s.path).unwrap(), Ok(true));
    let resp = c.add_signatures(&s.path, &["test-key-1:c2ln"]).unwrap();
    assert_eq!(
        resp.error("AddSignatures"),
        "you are not privileged to add signatures"
    );
    let nar = flat_nar(b"unsigned\n");
    let info = info_for(&s.evil, &sd, &nar);
    let resp = c.add_to_store_nar(&info, &sd, &nar, true).unwrap();
    assert!(
        resp.error("unsigned AddToStoreNar")
            .contains("lacks a valid signature"),
        "{resp:?}"
    );
    assert_eq!(c.is_valid_path(&s.evil).unwrap(), Ok(false), "{}", log());
    // Refused before any work: the error comes twice and the connection ends.
    let resp = c.build_paths(&[&s.path], 1).unwrap();
    assert!(
        resp.error("repair")
            .contains("repairing is not allowed because you are not in 'trusted-users'"),
        "{resp:?}"
    );
    let rest = c.read_to_hangup();
    assert!(rest.closed, "{rest:?}");
}

/// st-alice (trusted) runs `--stdio --force-untrusted` herself, as an SSH forced command
/// would: it forwards to the daemon's untrusted socket.
#[test]
fn force_untrusted_stdio_forwarded_for_a_trusted_account() {
    skip_unless_root!();
    let s = setup();
    let bin = stockade_bin().unwrap();
    let err = s.d.base_dir().join("logs/stdio-alice.err");
    let mut c = RawConn::over_stdio(
        &s.d,
        Some(&s.alice),
        &bin,
        &["daemon", "--stdio", "--force-untrusted"],
        &err,
    )
    .expect("start --stdio");
    let log = || std::fs::read_to_string(&err).unwrap_or_default();
    untrusted_checks(&mut c, &s, &log);
}

/// Root runs `--stdio --force-untrusted` while the daemon runs: it forwards to the daemon's
/// untrusted socket rather than serving the store with a second store-writer (A75).
#[test]
fn force_untrusted_stdio_as_root_forwards_untrusted() {
    skip_unless_root!();
    let s = setup();
    let bin = stockade_bin().unwrap();
    let err = s.d.base_dir().join("logs/stdio-root.err");
    let mut c = RawConn::over_stdio(
        &s.d,
        None,
        &bin,
        &["daemon", "--stdio", "--force-untrusted"],
        &err,
    )
    .expect("start --stdio");
    let log = || std::fs::read_to_string(&err).unwrap_or_default();
    untrusted_checks(&mut c, &s, &log);
    assert!(!log().contains("mode=stdio"), "served locally: {}", log());
}

/// A `--stdio` instance started by root while the daemon serves clients must leave the
/// daemon's brokers alone.
#[test]
fn stdio_as_root_leaves_the_daemons_clients_alone() {
    skip_unless_root!();
    let s = setup();
    let bob = ensure_user("st-bob").unwrap();
    let mut c = RawConn::connect_as(&s.d, &bob).expect("connect");
    c.handshake().expect("handshake");
    assert_eq!(instance_processes(&s.d, "stockade-broker").len(), 1);
    let bin = stockade_bin().unwrap();
    let err = s.d.base_dir().join("logs/stdio.err");
    let mut stdio = RawConn::over_stdio(
        &s.d,
        None,
        &bin,
        &["daemon", "--stdio", "--force-untrusted"],
        &err,
    )
    .expect("start --stdio");
    stdio.handshake().expect("stdio handshake");
    assert_eq!(
        c.is_valid_path(&s.path).ok(),
        Some(Ok(true)),
        "the daemon's client lost its broker when a --stdio instance started"
    );
}
