//! A58 (SECURITY.md §4.8): a compromised broker sends, over its own channels, the messages
//! only the master may send the store-writer and the builder-helper about connections
//! (`NewClient` naming root as trusted with a channel of its own, `ClientGone` and
//! `BrokerStarted` for another client's connection, a build uid, a new store-writer or helper
//! channel, a GC socket, runtime roots, `Shutdown`). Each receiver reads a broker's channel
//! as that channel's type only, so every one is a protocol violation there: the channel is
//! closed and the closing audited under the broker's own connection and uid, the passed
//! channel is dropped unserved, and the connection named, the master, the store-writer and
//! the helper serve on. Needs root and `STOCKADE_EVIL_BROKER` (see compromised_broker.rs).

use stockade_tests::evil::{evil_broker, field, libexec_with, Evil, WAIT};
use stockade_tests::raw::RawConn;
use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{busybox_derivation, ensure_user, skip_unless_root};

/// The master-only messages the evil broker sends (`master-only <name> <conn>`), and whether
/// each passes a channel of the broker's making.
const MESSAGES: &[(&str, bool)] = &[
    ("writer-new-client", true),
    ("writer-client-gone", false),
    ("writer-builder-helper", true),
    ("writer-gc-socket", true),
    ("writer-runtime-roots", false),
    ("writer-shutdown", false),
    ("builder-new-client", true),
    ("builder-client-gone", false),
    ("builder-uid", false),
    ("builder-store-writer", true),
    ("builder-broker-started", false),
    ("builder-shutdown", false),
];

#[test]
fn a58_a_broker_cannot_send_what_only_the_master_may() {
    skip_unless_root!();
    let Some(evil) = evil_broker() else {
        return;
    };
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let libexec = libexec_with(&evil);
    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .env("STOCKADE_LIBEXEC_DIR", libexec.path().to_str().unwrap())
        .start()
        .expect("stockade with the evil broker");
    let f = d.write_work_file("a58.txt", b"a58\n");
    let path = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);

    // Bob's connection, the one the forged ClientGone and BrokerStarted name.
    let mut b = RawConn::session(&d, Some(&bob));
    let bob_uid = bob.uid.to_string();
    let accepted = audit
        .wait_for(WAIT, |l| {
            let l = audit_line(l);
            field(l, "uid") == Some(bob_uid.as_str()) && l.contains(" accepted ")
        })
        .unwrap_or_else(|| panic!("no accepted line for bob: {:#?}", audit.lines()));
    let bob_conn = field(audit_line(&accepted), "conn").unwrap().to_string();

    let mallory_uid = mallory.uid.to_string();
    let mut conns = Vec::new();
    for (msg, passes_channel) in MESSAGES {
        // Evil::connect checks `whoami`: mallory's uid, untrusted.
        let mut m = Evil::connect(&d, &mallory);
        let o = m
            .ask(&format!("master-only {msg} {bob_conn}"))
            .unwrap_or_else(|| panic!("{msg}: the broker died"));
        assert!(o.starts_with("refused channel=closed"), "{msg}: {o}");
        if *passes_channel {
            assert!(o.ends_with(" fake=closed"), "{msg}: {o}");
        }
        let closed = audit
            .wait_for(WAIT, |l| {
                let l = audit_line(l);
                field(l, "conn") == Some(m.conn.as_str())
                    && l.contains("protocol")
                    && l.contains("outcome=closed")
            })
            .unwrap_or_else(|| {
                panic!("{msg}: the violation was not audited: {:#?}", audit.lines())
            });
        assert_eq!(
            field(audit_line(&closed), "uid"),
            Some(mallory_uid.as_str()),
            "{msg}: {closed}"
        );
        // Bob's connection is still his and still served.
        assert_eq!(b.is_valid_path(&path).unwrap(), Ok(true), "after {msg}");
        conns.push(m.conn.clone());
    }
    // Whoever wrote them, the lines of those connections name mallory, never root or trust.
    for l in audit.lines() {
        let l = audit_line(&l);
        if field(l, "conn").is_some_and(|c| conns.iter().any(|x| x == c)) {
            assert_eq!(field(l, "uid"), Some(mallory_uid.as_str()), "{l}");
            assert!(!l.contains("trusted=yes"), "{l}");
        }
    }
    assert!(
        !audit
            .lines()
            .iter()
            .any(|l| l.contains("store-writer-died")),
        "{:#?}",
        audit.lines()
    );

    // The store-writer and the helper serve bob on: an add and a build.
    let g = d.write_work_file("a58-bob.txt", b"a58 bob\n");
    std::fs::set_permissions(&g, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let added = d.run_as_ok(&bob, ["nix-store", "--add", g.to_str().unwrap()]);
    assert_eq!(b.is_valid_path(added.trim()).unwrap(), Ok(true));
    let bb = d.add_busybox();
    let expr = busybox_derivation(&bb, "a58-bob", "echo built > $out");
    let out = d.run_as_ok(&bob, ["nix-build", "--no-out-link", "-E", &expr]);
    assert!(d.host_path(out.trim()).exists(), "{out}");
    assert!(stockade_tests::process_alive(d.pid()), "the master exited");
}
