//! `nix-store --verify --check-contents --repair` through Stockade (no nix-daemon here; see
//! compat_repair.rs for the comparison): a tampered build output is rebuilt from its deriver
//! and registered anew, a vanished one that is still referred to is built again, a tampered
//! path without a deriver cannot be repaired, and each repair is audited.
//!
//! Needs root (namespaces, and writing into the store as the tamperer); fails loudly in CI
//! without it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use stockade_tests::sec::{stockade_with, AuditCollector};
use stockade_tests::{busybox_derivation, skip_unless_root, Daemon, RunOutput};

/// How long an audit line may take to arrive.
const WAIT: Duration = Duration::from_secs(30);

fn start(audit: &AuditCollector) -> Daemon {
    stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .start()
        .expect("stockade")
}

/// `text` without terminal colours.
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn stderr(o: &RunOutput) -> String {
    plain(&o.stderr_str())
}

/// Overwrites `file` inside the store path `path` (as root: store files are read-only).
fn tamper(d: &Daemon, path: &str, file: &str, contents: &str) {
    let dir = d.host_path(path);
    let target = if file.is_empty() {
        dir.clone()
    } else {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir.join(file)
    };
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&target, contents).unwrap();
}

fn verify(d: &Daemon, repair: bool) -> RunOutput {
    let mut c = d.cmd("nix-store").args(["--verify", "--check-contents"]);
    if repair {
        c = c.arg("--repair");
    }
    c.output()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_tampered_output_is_rebuilt_from_its_deriver() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let bb = d.add_busybox();
    let expr = busybox_derivation(
        &bb,
        "repairable",
        "busybox mkdir $out; echo original > $out/f",
    );
    let drv = d.run_ok(["nix-instantiate", "-E", &expr]);
    let out = d.build_ok(&expr);
    tamper(&d, &out, "f", "tampered\n");

    let checked = verify(&d, false);
    assert!(!checked.success(), "{checked}");
    assert!(
        stderr(&checked).contains(&format!(
            "path '{out}' was modified! expected hash 'sha256:"
        )),
        "{checked}"
    );

    let repaired = verify(&d, true);
    assert!(repaired.success(), "{repaired}");
    let said = stderr(&repaired);
    let modified = said
        .find(&format!("path '{out}' was modified!"))
        .unwrap_or_else(|| panic!("{repaired}"));
    let rebuilt = said
        .find(&format!("repairing outputs of '{drv}'"))
        .unwrap_or_else(|| panic!("{repaired}"));
    // The repair build checks the outputs first, as Nix's does.
    let corrupt = said
        .find(&format!(
            "checking path '{out}'...\npath '{out}' is corrupted or missing!"
        ))
        .unwrap_or_else(|| panic!("{repaired}"));
    assert!(modified < corrupt && corrupt < rebuilt, "{repaired}");
    assert!(!said.contains("error"), "{repaired}");

    let host = d.host_path(&out);
    assert_eq!(
        std::fs::read_to_string(host.join("f")).unwrap(),
        "original\n"
    );
    assert_eq!((mode(&host), mode(&host.join("f"))), (0o555, 0o444));
    let again = verify(&d, false);
    assert!(again.success(), "{again}");
    assert!(!stderr(&again).contains("modified"), "{again}");

    let line = audit.wait_for(WAIT, |l| l.contains("op=repairPath"));
    let line = line.unwrap_or_else(|| panic!("no repair audited: {:#?}", audit.lines()));
    assert!(
        line.contains(&format!("path={out} result=repaired drv={drv}")),
        "{line}"
    );

    // Tampered and made unreadable to others (the broker, which plans the rebuild, reads
    // the store as nobody in particular): damaged all the same.
    tamper(&d, &out, "f", "hidden\n");
    std::fs::set_permissions(host.join("f"), std::fs::Permissions::from_mode(0o600)).unwrap();
    let repaired = verify(&d, true);
    assert!(repaired.success(), "{repaired}");
    assert!(
        stderr(&repaired).contains(&format!("path '{out}' is corrupted or missing!")),
        "{repaired}"
    );
    assert_eq!(
        std::fs::read_to_string(host.join("f")).unwrap(),
        "original\n"
    );
    assert!(
        audit
            .wait_for(WAIT, |l| l.contains("op=verifyStore outcome=needsRepair")
                && l.contains(&format!("path={out} damage=modified")))
            .is_some(),
        "{:#?}",
        audit.lines()
    );
}

#[test]
fn a_vanished_output_still_referred_to_is_built_again() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let bb = d.add_busybox();
    let dep = busybox_derivation(&bb, "dep", "echo dependency > $out");
    // `${dep}`, an antiquotation: busybox_derivation would escape it.
    let user = format!(
        "let dep = {dep}; in {}",
        busybox_derivation(&bb, "user", "echo @DEP@ > $out").replace("@DEP@", "${dep}")
    );
    let dep_out = d.build_ok(&dep);
    let user_out = d.build_ok(&user);
    let refs = d.run_ok(["nix-store", "-q", "--references", &user_out]);
    assert!(refs.lines().any(|l| l == dep_out), "{refs}");
    std::fs::remove_file(d.host_path(&dep_out)).unwrap();

    let repaired = verify(&d, true);
    assert!(repaired.success(), "{repaired}");
    assert!(
        stderr(&repaired).contains(&format!(
            "path '{dep_out}' disappeared, but it still has valid referrers!"
        )),
        "{repaired}"
    );
    assert_eq!(
        std::fs::read_to_string(d.host_path(&dep_out)).unwrap(),
        "dependency\n"
    );
    let again = verify(&d, false);
    assert!(again.success(), "{again}");
}

#[test]
fn a_tampered_path_without_a_deriver_cannot_be_repaired() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let f = d.write_work_file("plain.txt", b"plain\n");
    let added = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    tamper(&d, &added, "", "changed\n");

    let o = verify(&d, true);
    assert!(!o.success(), "{o}");
    let said = stderr(&o);
    let modified = said
        .find(&format!("path '{added}' was modified!"))
        .unwrap_or_else(|| panic!("{o}"));
    let cannot = said
        .find(&format!("error: cannot repair path '{added}'"))
        .unwrap_or_else(|| panic!("{o}"));
    assert!(modified < cannot, "{o}");
    assert!(said.contains("not all store errors were fixed"), "{o}");
    // Still the tampered contents: nothing was put in its place.
    assert_eq!(
        std::fs::read_to_string(d.host_path(&added)).unwrap(),
        "changed\n"
    );
    let line = audit.wait_for(WAIT, |l| l.contains("op=repairPath"));
    let line = line.unwrap_or_else(|| panic!("no repair audited: {:#?}", audit.lines()));
    assert!(
        line.contains(&format!("path={added} result=noValidDeriver")),
        "{line}"
    );
}
