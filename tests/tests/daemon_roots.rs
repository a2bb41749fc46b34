//! AddPermRoot (op 47): not in Nix 2.8, whose clients never send it, but later Nix's mounted
//! ssh-ng store sends it whatever the protocol version, and its daemon serves trusted clients.
//! Stockade serves it too, below the state directory only. Driven with raw protocol bytes,
//! then checked with the real `nix-store -q --roots`.
//!
//! Needs root (namespaces, useradd); fails loudly in CI without it.

use stockade_tests::raw::{Outcome, RawConn};
use stockade_tests::{ensure_user, skip_unless_root};

const ADD_PERM_ROOT: u64 = 47;
const IS_VALID_PATH: u64 = 1;

/// Sends AddPermRoot; `Ok(link)` or `Err(message)`.
fn add_perm_root(c: &mut RawConn, path: &str, link: &str) -> Result<String, String> {
    c.send_u64(ADD_PERM_ROOT).unwrap();
    c.send_str(path).unwrap();
    c.send_str(link).unwrap();
    c.flush().unwrap();
    let resp = c.response().unwrap();
    match resp.outcome {
        Outcome::Last => Ok(c.r().read_string("link").unwrap()),
        Outcome::Error(e) => Err(e),
    }
}

/// The connection is still in step after an error.
fn still_in_step(c: &mut RawConn, path: &str) {
    c.send_u64(IS_VALID_PATH).unwrap();
    c.send_str(path).unwrap();
    c.flush().unwrap();
    assert!(c.response().unwrap().is_ok());
    assert_eq!(c.r().read_u64("valid").unwrap(), 1);
}

#[test]
fn perm_roots_for_trusted_clients_below_the_state_dir() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").unwrap();
    let d = stockade_tests::sec::builder(stockade_tests::DaemonKind::Stockade)
        .start()
        .expect("stockade");
    let f = d.write_work_file("rooted", b"kept alive\n");
    let path = d
        .run_ok(["nix-store", "--add", f.to_str().unwrap()])
        .trim()
        .to_string();
    let link = "/nix/var/nix/gcroots/perm/result";
    std::fs::create_dir_all(d.host_path("/nix/var/nix/gcroots/perm")).unwrap();

    // Untrusted: refused with nix-daemon's words, nothing created, connection usable.
    let mut c = RawConn::session(&d, Some(&bob));
    let e = add_perm_root(&mut c, &path, link).unwrap_err();
    assert!(
        e.contains("you are not privileged to create perm roots"),
        "{e}"
    );
    assert!(std::fs::symlink_metadata(d.host_path(link)).is_err());
    still_in_step(&mut c, &path);
    drop(c);

    // Trusted: the link (given with `..` and `//`, canonicalised), registered as a root.
    let mut c = RawConn::session(&d, None);
    let got = add_perm_root(&mut c, &path, "/nix/var/nix/gcroots//x/../perm/result").unwrap();
    assert_eq!(got, link);
    let target = std::fs::read_link(d.host_path(link)).expect("the link exists");
    assert_eq!(target.to_str(), Some(path.as_str()));
    let roots = d.run_ok(["nix-store", "-q", "--roots", &path]);
    assert!(
        roots.lines().any(|l| l == format!("{link} -> {path}")),
        "nix-store -q --roots lists the new root: {roots:?}"
    );
    // A symlink into the store may be replaced.
    assert_eq!(add_perm_root(&mut c, &path, link).unwrap(), link);

    // What it refuses, each time with the connection still in step.
    let cases = [
        (
            format!("{path}-result"),
            "in the Nix store is forbidden".to_string(),
        ),
        (
            "/tmp/stockade-perm-root".to_string(),
            "only below '/nix/var/nix'".to_string(),
        ),
        (
            "/nix/var/nix/gcroots/perm/file".to_string(),
            "already exists".to_string(),
        ),
        (
            "/nix/var/nix/gcroots/missing-dir/result".to_string(),
            "No such file or directory".to_string(),
        ),
    ];
    std::fs::write(d.host_path("/nix/var/nix/gcroots/perm/file"), b"not a link").unwrap();
    for (bad, want) in &cases {
        let e = add_perm_root(&mut c, &path, bad).unwrap_err();
        assert!(e.contains(want.as_str()), "{bad}: {e}");
        still_in_step(&mut c, &path);
    }
    assert_eq!(
        std::fs::read(d.host_path("/nix/var/nix/gcroots/perm/file")).unwrap(),
        b"not a link"
    );
    assert!(std::fs::symlink_metadata("/tmp/stockade-perm-root").is_err());
    // A symlinked directory on the way is not followed.
    std::os::unix::fs::symlink("/tmp", d.host_path("/nix/var/nix/gcroots/via")).unwrap();
    let e = add_perm_root(&mut c, &path, "/nix/var/nix/gcroots/via/result").unwrap_err();
    assert!(!e.is_empty());
    assert!(std::fs::symlink_metadata("/tmp/result").is_err());
    still_in_step(&mut c, &path);
}
