//! A72: with `require-sigs = false` nix-daemon lets any client repair a valid path with a NAR
//! of its choosing (AddToStoreNar with `repair`), i.e. replace what everyone else depends on.
//! Through Stockade an untrusted repair may only put back the registered contents; a trusted
//! client keeps nix-daemon's power. Needs root (a second user, namespaces).

use stockade_tests::raw::{flat_nar, info_for, input_addressed_path, Outcome, RawConn};
use stockade_tests::{ensure_user, skip_unless_root, Daemon, DaemonKind};

fn add(c: &mut RawConn, d: &Daemon, data: &[u8], repair: bool) -> Outcome {
    let sd = stockade_common::store_path::StoreDir::new(&d.store_dir()).unwrap();
    let nar = flat_nar(data);
    let path = input_addressed_path(&sd, "a72", "shared-lib");
    let info = info_for(&path, &sd, &nar);
    c.send_add_to_store_nar_header(&info, &sd, repair, true)
        .unwrap();
    c.send_framed(&nar, 64 * 1024).unwrap();
    c.flush().unwrap();
    c.response().unwrap().outcome
}

fn contents(d: &Daemon) -> String {
    let sd = stockade_common::store_path::StoreDir::new(&d.store_dir()).unwrap();
    let path = input_addressed_path(&sd, "a72", "shared-lib");
    std::fs::read_to_string(d.host_path(&path)).unwrap()
}

#[test]
fn an_untrusted_repair_only_restores_the_registered_contents() {
    skip_unless_root!();
    let mallory = ensure_user("st-mallory").unwrap();
    let d = Daemon::builder(DaemonKind::Stockade)
        .conf_line("require-sigs = false")
        .start()
        .expect("stockade");
    let mut root = RawConn::connect(&d).unwrap();
    root.handshake().unwrap();
    assert_eq!(
        add(&mut root, &d, b"the real library\n", false),
        Outcome::Last
    );

    let mut m = RawConn::connect_as(&d, &mallory).unwrap();
    m.handshake().unwrap();
    // Without repair an add of a valid path changes nothing (as in nix-daemon).
    assert_eq!(add(&mut m, &d, b"a trojan\n", false), Outcome::Last);
    assert_eq!(contents(&d), "the real library\n");
    // With repair, other contents are refused, and the path is untouched.
    match add(&mut m, &d, b"a trojan\n", true) {
        Outcome::Error(e) => assert!(
            e.contains("not in 'trusted-users'") && e.contains("registered"),
            "{e}"
        ),
        other => panic!("an untrusted repair replaced a valid path: {other:?}"),
    }
    assert_eq!(contents(&d), "the real library\n");
    d.run_ok(["nix-store", "--verify", "--check-contents"]);
    // Putting back the registered contents is a repair anyone may do.
    assert_eq!(add(&mut m, &d, b"the real library\n", true), Outcome::Last);
    assert_eq!(contents(&d), "the real library\n");

    // A trusted client keeps nix-daemon's power.
    assert_eq!(
        add(&mut root, &d, b"a patched library\n", true),
        Outcome::Last
    );
    assert_eq!(contents(&d), "a patched library\n");
    let audit = d.log();
    assert!(
        audit.contains("outcome=refused") && audit.contains(&format!("uid={}", mallory.uid)),
        "no audit line for the refused repair"
    );
}
