//! VerifyStore with `repair`: damaged paths are named for the broker instead of counted as
//! errors, corrupt `.links` entries are removed, each with Nix 2.8's lines, and the run's
//! findings are audited. Untrusted clients are refused (protocol.rs).

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;
use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::HashAlgo;
use stockade_common::ipc::writer::{Damage, RepairWanted, VerifyOutcome};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{FileIngestion, StorePath};

fn add(b: &mut Broker, name: &str, method: ContentAddressMethod, data: Vec<u8>) -> PathInfo {
    let req = Req::AddToStore {
        name: name.into(),
        method,
        algo: HashAlgo::Sha256,
        references: vec![],
        repair: false,
    };
    match b.call(req, Some(data)) {
        Ok(i) => i,
        other => panic!("add {name}: {other:?}"),
    }
}

fn verify(b: &mut Broker, repair: bool) -> VerifyOutcome {
    let req = Req::VerifyStore {
        check_contents: true,
        repair,
    };
    b.call(req, None).unwrap_or_else(|e| panic!("verify: {e}"))
}

fn make_writable(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn drain(audit: &UnixDatagram) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = audit.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

#[test]
fn repair_names_damaged_paths_and_removes_corrupt_links() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("audit");
    let audit = UnixDatagram::bind(&sock).unwrap();
    audit
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut env = Env::with(|c| c.audit_socket = Some(sock.display().to_string()));
    let mut b = env.connect(true);
    let tree = add(
        &mut b,
        "tree",
        ContentAddressMethod::Fixed(FileIngestion::Recursive),
        tree_nar("t"),
    );
    let gone = add(&mut b, "gone", ContentAddressMethod::Text, b"gone".to_vec());
    let req = Req::AddToStore {
        name: "user".into(),
        method: ContentAddressMethod::Text,
        algo: HashAlgo::Sha256,
        references: vec![gone.path.clone()],
        repair: false,
    };
    b.call(req, Some(b"user".to_vec())).unwrap();
    assert_eq!(verify(&mut b, true), VerifyOutcome::default());

    let real = env.real_store();
    let tree_dir = real.join(tree.path.base_name());
    make_writable(&tree_dir);
    make_writable(&tree_dir.join("data"));
    std::fs::write(tree_dir.join("data"), b"tampered").unwrap();
    std::fs::remove_file(real.join(gone.path.base_name())).unwrap();
    std::fs::create_dir_all(real.join(".links")).unwrap();
    let bogus = "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s";
    std::fs::write(real.join(".links").join(bogus), b"not what the name says").unwrap();

    let full = |p: &StorePath| format!("/nix/store/{}", p.base_name());
    // Without repair: three errors, nothing removed.
    let found = verify(&mut b, false);
    assert!(found.errors && found.repair.is_empty(), "{found:?}");
    assert!(real.join(".links").join(bogus).exists());

    // The socket holds a few lines only: read them as they come.
    let mut lines = drain(&audit);
    let found = verify(&mut b, true);
    let want = |path: &PathInfo, damage| RepairWanted {
        path: path.path.clone(),
        damage,
    };
    assert_eq!(
        found,
        VerifyOutcome {
            errors: false,
            repair: vec![
                want(&gone, Damage::Disappeared),
                want(&tree, Damage::Modified)
            ],
        },
        "{:?}",
        b.logs
    );
    let link = format!("{}/.links/{bogus}", real.display());
    let logs = &b.logs;
    let at = |level: u32, start: &str| {
        logs.iter()
            .position(|(l, t)| *l == level && t.starts_with(start))
            .unwrap_or_else(|| panic!("no {start:?} in {logs:?}"))
    };
    let order = [
        at(
            0,
            &format!(
                "path '{}' disappeared, but it still has valid referrers!",
                full(&gone.path)
            ),
        ),
        at(
            0,
            &format!("link '{link}' was modified! expected hash '{bogus}'"),
        ),
        at(3, &format!("removed link '{link}'")),
        at(0, &format!("path '{}' was modified!", full(&tree.path))),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{logs:?}");
    assert!(!real.join(".links").join(bogus).exists());
    // Still registered: the broker repairs them.
    assert!(env.is_valid(&gone.path) && env.is_valid(&tree.path));

    lines.extend(drain(&audit));
    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    assert!(has("op=verifyStore outcome=linkRemoved"), "{lines:#?}");
    assert!(
        has(&format!(
            "op=verifyStore outcome=needsRepair path={} damage=modified",
            full(&tree.path)
        )),
        "{lines:#?}"
    );
    assert!(
        has("repair=yes paths=3 errors=0 invalidated=0 sizesUpdated=0 linksRemoved=1 toRepair=2"),
        "{lines:#?}"
    );
}
