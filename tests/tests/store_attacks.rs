//! Store operations an untrusted user turns against files outside the store and against other
//! users (SECURITY.md A31, A32, V16), sent raw as `st-mallory`: indirect roots pointing at
//! `/etc/passwd`, at bob's files and through symlinks are recorded as nix-daemon records them
//! and never followed, created, deleted or chowned, not even by a later collection; the
//! per-user directories belong to their user only; AddBuildLog and an input-addressed
//! BuildDerivation are refused in nix-daemon's words, and succeed for the trusted `st-alice`.
//! Canaries live in the test's own directories. Needs root; fails loudly in CI without it.

use std::collections::BTreeSet;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use stockade_common::derivation::{Derivation, DerivationOutput};
use stockade_common::store_path::StoreDir;
use stockade_common::worker::Op;
use stockade_tests::fsutil::tree_fingerprint;
use stockade_tests::raw::{Outcome, RawConn};
use stockade_tests::sec::{stockade_with, AuditCollector};
use stockade_tests::{busybox_derivation, ensure_user, skip_unless_root, Daemon, User};

const WAIT: std::time::Duration = std::time::Duration::from_secs(60);

fn start(audit: &AuditCollector) -> Daemon {
    stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("trusted-users = root st-alice")
        .start()
        .expect("stockade")
}

fn chown(p: &Path, u: &User) {
    std::os::unix::fs::lchown(p, Some(u.uid), Some(u.gid)).unwrap();
}

fn mkdir_owned(p: &Path, u: &User, mode: u32) {
    std::fs::create_dir_all(p).unwrap();
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    chown(p, u);
}

/// Fingerprints of everything the attacks aim at: must not change.
fn canaries(paths: &[&Path]) -> Vec<String> {
    paths
        .iter()
        .map(|p| {
            let contents = std::fs::read(p).map(|c| c.len()).unwrap_or(0);
            format!(
                "{}: {} {contents}",
                p.display(),
                tree_fingerprint(p).unwrap()
            )
        })
        .collect()
}

/// The targets of the links in `gcroots/auto`.
fn auto_roots(d: &Daemon) -> BTreeSet<String> {
    std::fs::read_dir(d.host_path("/nix/var/nix/gcroots/auto"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            std::fs::read_link(&p)
                .unwrap_or_else(|e| panic!("{} is not a link: {e}", p.display()))
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn add_indirect_root(c: &mut RawConn, link: &str) -> Result<(), String> {
    match c.add_indirect_root(link.as_bytes()).unwrap().outcome {
        Outcome::Last => Ok(()),
        Outcome::Error(e) => Err(e),
    }
}

fn add_perm_root(c: &mut RawConn, path: &str, link: &str) -> Result<String, String> {
    c.send_u64(Op::AddPermRoot.into()).unwrap();
    c.send_str(path).unwrap();
    c.send_str(link).unwrap();
    c.flush().unwrap();
    match c.response().unwrap().outcome {
        Outcome::Last => Ok(c.r().read_string("link").unwrap()),
        Outcome::Error(e) => Err(e),
    }
}

/// A31: mallory's indirect roots at `/etc/passwd`, at bob's files, through her symlink to
/// bob's directory and to `/etc`, and at a file that does not exist: each is recorded as
/// `gcroots/auto/<hash> -> link` (as nix-daemon records it), and nothing outside the store
/// is created, followed into, deleted or chowned, neither then nor by a collection run as
/// mallory (which deletes a dead path, keeps the one bob's link roots through her symlink,
/// and removes only the stale `auto` link). Perm roots outside the state directory are
/// refused to alice too, and to mallory in nix-daemon's words.
#[test]
fn a31_indirect_roots_outside_the_store_are_not_followed() {
    skip_unless_root!();
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let alice = ensure_user("st-alice").unwrap();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let add = |name: &str, text: &str| {
        let f = d.write_work_file(&format!("src/{name}"), text.as_bytes());
        d.run_ok(["nix-store", "--add", f.to_str().unwrap()])
    };
    let live = add("live", "rooted through bob's link\n");
    let dead = add("dead", "rooted by nothing\n");

    // bob's directory: a private file, a link into the store, a dangling link into it.
    let bob_dir = d.work_dir().join("home/bob");
    mkdir_owned(&bob_dir, &bob, 0o700);
    let secret = bob_dir.join("secret");
    std::fs::write(&secret, "bob's secret\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    chown(&secret, &bob);
    for (name, target) in [("live", live.clone()), ("dangling", format!("{live}-gone"))] {
        symlink(&target, bob_dir.join(name)).unwrap();
        chown(&bob_dir.join(name), &bob);
    }
    // mallory's: symlinks to bob's directory and to /etc.
    let m_dir = d.work_dir().join("home/mallory");
    mkdir_owned(&m_dir, &mallory, 0o755);
    for (name, target) in [("via", bob_dir.as_path()), ("etc", Path::new("/etc"))] {
        symlink(target, m_dir.join(name)).unwrap();
        chown(&m_dir.join(name), &mallory);
    }
    let s = |p: PathBuf| p.to_str().unwrap().to_string();
    let links = [
        "/etc/passwd".to_string(),
        s(secret.clone()),
        s(m_dir.join("via/secret")),
        s(m_dir.join("etc/passwd")),
        s(m_dir.join("via/live")),
        s(bob_dir.join("dangling")),
        s(bob_dir.join("new-file")),
        s(m_dir.join("missing/deeper")),
    ];
    let watched = [
        bob_dir.as_path(),
        m_dir.as_path(),
        Path::new("/etc/passwd"),
        Path::new("/etc/shadow"),
    ];
    let before = canaries(&watched);

    let mut c = RawConn::session(&d, Some(&mallory));
    for l in &links {
        add_indirect_root(&mut c, l).unwrap_or_else(|e| panic!("AddIndirectRoot {l}: {e}"));
    }
    let want: BTreeSet<String> = links.iter().cloned().collect();
    assert_eq!(auto_roots(&d), want);
    assert_eq!(
        canaries(&watched),
        before,
        "AddIndirectRoot changed a canary"
    );
    // AddPermRoot: not mallory's (nix-daemon's words), and alice's only below the state dir.
    let e = add_perm_root(&mut c, &live, &s(m_dir.join("perm"))).unwrap_err();
    assert!(
        e.contains("you are not privileged to create perm roots"),
        "{e}"
    );
    drop(c);
    let mut a = RawConn::session(&d, Some(&alice));
    for link in [
        s(bob_dir.join("perm")),
        s(m_dir.join("via/perm")),
        "/etc/perm".into(),
    ] {
        let e = add_perm_root(&mut a, &live, &link).unwrap_err();
        assert!(
            e.contains("creates permanent roots only below"),
            "alice's perm root at {link}: {e}"
        );
    }
    drop(a);
    assert!(!Path::new("/etc/perm").exists());
    assert_eq!(canaries(&watched), before, "AddPermRoot changed a canary");

    // A collection as mallory: reads the links, follows none with privilege.
    d.run_as_ok(&mallory, ["nix-store", "--gc"]);
    let valid = |p: &str| d.host_path(p).symlink_metadata().is_ok();
    assert!(
        !valid(&dead),
        "the collection did not run: {dead} is still there"
    );
    assert!(
        valid(&live),
        "{live}, rooted through bob's link, was deleted"
    );
    assert_eq!(
        canaries(&watched),
        before,
        "the collection changed a canary"
    );
    let mut left = want.clone();
    left.remove(&s(m_dir.join("missing/deeper")));
    left.remove(&s(bob_dir.join("new-file")));
    assert_eq!(auto_roots(&d), left, "only stale auto links go");
}

/// V16: what a connection makes for its user (`profiles/per-user/<name>` and
/// `gcroots/per-user/<name>`, the user's, 0755, below root's 0755 `per-user`), that mallory
/// cannot make or reach bob's through the daemon or by hand, and that a symlink planted as
/// bob's directory (as a world-writable `per-user` of old let anyone do) is not followed
/// when bob connects: its target keeps its owner and mode.
#[test]
fn v16_a_user_cannot_make_or_take_over_another_users_per_user_directory() {
    skip_unless_root!();
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let f = d.write_work_file("v16", b"a path\n");
    let path = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    let bases = [
        "/nix/var/nix/profiles/per-user",
        "/nix/var/nix/gcroots/per-user",
    ];

    // A store-writer round trip: the directories are made before the session is served.
    let mut c = RawConn::session(&d, Some(&mallory));
    c.add_temp_root(&path).unwrap().unwrap();
    for base in bases {
        let parent = d.host_path(base).symlink_metadata().unwrap();
        assert_eq!((parent.uid(), parent.mode() & 0o7777), (0, 0o755), "{base}");
        let own = d.host_path(&format!("{base}/st-mallory"));
        let m = own.symlink_metadata().unwrap();
        assert!(m.is_dir(), "{}", own.display());
        assert_eq!((m.uid(), m.mode() & 0o7777), (mallory.uid, 0o755), "{base}");
        assert!(!d.host_path(&format!("{base}/st-bob")).exists(), "{base}");
    }
    // Through the daemon: an indirect root names bob's directory, a perm root would make it.
    let in_bobs = "/nix/var/nix/gcroots/per-user/st-bob/result";
    add_indirect_root(&mut c, in_bobs).unwrap();
    assert!(add_perm_root(&mut c, &path, in_bobs).is_err());
    drop(c);
    // By hand, as mallory.
    for base in bases {
        let bobs = d.host_path(&format!("{base}/st-bob"));
        let cmd = format!(
            "mkdir {0} || ln -s /tmp {0} || true; test ! -e {0}",
            bobs.display()
        );
        d.cmd("sh").args(["-c", &cmd]).as_user(&mallory).ok();
        assert!(!bobs.exists(), "{}", bobs.display());
    }

    // Planted (as only root can now): gcroots/per-user/st-bob -> mallory's private directory.
    let target = d.work_dir().join("mallory-private");
    mkdir_owned(&target, &mallory, 0o700);
    let planted = d.host_path("/nix/var/nix/gcroots/per-user/st-bob");
    symlink(&target, &planted).unwrap();
    let before = tree_fingerprint(&target).unwrap();
    let mut b = RawConn::session(&d, Some(&bob));
    b.add_temp_root(&path).unwrap().unwrap();
    drop(b);
    // bob's round trip came after his directories were made (or not).
    assert_eq!(
        tree_fingerprint(&target).unwrap(),
        before,
        "the planted link was followed"
    );
    let t = target.metadata().unwrap();
    assert_eq!((t.uid(), t.mode() & 0o7777), (mallory.uid, 0o700));
    d.wait_for_log(WAIT, |l| l.contains("per-user directories"))
        .unwrap_or_else(|| panic!("no warning about bob's directories: {}", d.log_tail(30)));
    assert!(planted.symlink_metadata().unwrap().file_type().is_symlink());
    let bobs = d
        .host_path("/nix/var/nix/profiles/per-user/st-bob")
        .symlink_metadata()
        .unwrap();
    assert!(bobs.is_dir());
    assert_eq!((bobs.uid(), bobs.mode() & 0o7777), (bob.uid, 0o755));
}

/// Sends AddBuildLog of `drv` (a base name, as Nix sends it) with `log` as its framed data.
fn add_build_log(c: &mut RawConn, drv: &str, log: &[u8]) -> Result<(), String> {
    c.send_u64(Op::AddBuildLog.into()).unwrap();
    c.send_str(drv).unwrap();
    c.send_framed(log, 4096).unwrap();
    c.flush().unwrap();
    match c.response().unwrap().outcome {
        Outcome::Last => {
            c.r().read_u64("result").unwrap();
            Ok(())
        }
        Outcome::Error(e) => Err(e),
    }
}

/// Sends BuildDerivation of `drv_path` with the stored derivation `drv` inline; the status
/// and error message of the result, or the error.
fn build_derivation(
    c: &mut RawConn,
    sd: &StoreDir,
    drv_path: &str,
    drv: &Derivation,
) -> Result<(u64, String), String> {
    c.send_u64(Op::BuildDerivation.into()).unwrap();
    c.send_str(drv_path).unwrap();
    c.send_u64(drv.outputs.len() as u64).unwrap();
    for (name, out) in &drv.outputs {
        let DerivationOutput::InputAddressed(p) = out else {
            panic!("{name} is not input-addressed");
        };
        for field in [name.as_str(), &sd.display(p), "", ""] {
            c.send_str(field).unwrap();
        }
    }
    c.send_strs(drv.input_srcs.iter().map(|p| sd.display(p)))
        .unwrap();
    c.send_str(&drv.system).unwrap();
    c.send_str(&drv.builder).unwrap();
    c.send_strs(drv.args.iter()).unwrap();
    c.send_u64(drv.env.len() as u64).unwrap();
    for (k, v) in &drv.env {
        c.send_str(k).unwrap();
        c.send_str(v).unwrap();
    }
    c.send_u64(0).unwrap();
    c.flush().unwrap();
    match c.response().unwrap().outcome {
        Outcome::Last => Ok((
            c.r().read_u64("status").unwrap(),
            c.r().read_string("errorMsg").unwrap(),
        )),
        Outcome::Error(e) => Err(e),
    }
}

/// A32: AddBuildLog and an input-addressed BuildDerivation, sent raw. As mallory: refused in
/// nix-daemon's words, nothing written under the log directory, nothing built, audited, the
/// connection goes on. As alice (trusted): the log is stored and the derivation built.
#[test]
fn a32_build_logs_and_input_addressed_builds_need_trust() {
    skip_unless_root!();
    let mallory = ensure_user("st-mallory").unwrap();
    let alice = ensure_user("st-alice").unwrap();
    let audit = AuditCollector::new();
    let d = start(&audit);
    let bb = d.add_busybox();
    let expr = busybox_derivation(&bb, "a32", "echo built > $out");
    let drv_path = d
        .run_ok(["nix-instantiate", "-E", &expr])
        .trim()
        .to_string();
    let sd = StoreDir::new(&d.store_dir()).unwrap();
    let sp = sd.parse(&drv_path).unwrap();
    let text = std::fs::read(d.host_path(&drv_path)).unwrap();
    let drv = Derivation::parse(&sd, &text, "a32").unwrap();
    let DerivationOutput::InputAddressed(out) = &drv.outputs["out"] else {
        panic!("not input-addressed");
    };
    let out = sd.display(out);
    let logs = d.host_path("/nix/var/log/nix/drvs");
    let log_file = logs.join(&sp.base_name()[..2]).join(&sp.base_name()[2..]);
    let logs_before = tree_fingerprint(&logs).unwrap();

    let mut m = RawConn::session(&d, Some(&mallory));
    let e = add_build_log(&mut m, sp.base_name(), b"forged log\n").unwrap_err();
    assert!(e.contains("you are not privileged to add logs"), "{e}");
    let e = build_derivation(&mut m, &sd, &drv_path, &drv).unwrap_err();
    assert!(
        e.contains("you are not privileged to build input-addressed derivations"),
        "{e}"
    );
    assert_eq!(
        m.is_valid_path(&out).unwrap(),
        Ok(false),
        "the connection goes on"
    );
    drop(m);
    assert_eq!(
        tree_fingerprint(&logs).unwrap(),
        logs_before,
        "a log was written"
    );
    assert!(!d.host_path(&out).exists(), "{out} was built for mallory");
    for op in ["addBuildLog", "buildDerivation"] {
        let uid = format!(" uid={} ", mallory.uid);
        audit
            .wait_for(WAIT, |l| {
                l.contains(&uid) && l.contains(&format!(" op={op} outcome=denied "))
            })
            .unwrap_or_else(|| panic!("{op} refusal not audited: {:#?}", audit.lines()));
    }

    let mut a = RawConn::session(&d, Some(&alice));
    add_build_log(&mut a, sp.base_name(), b"alice's log\n").unwrap();
    let stored = std::fs::read(&log_file)
        .or_else(|_| std::fs::read(format!("{}.bz2", log_file.display())))
        .unwrap_or_else(|e| panic!("no log at {}: {e}", log_file.display()));
    assert!(!stored.is_empty());
    let (status, msg) = build_derivation(&mut a, &sd, &drv_path, &drv).unwrap();
    assert_eq!(status, 0, "alice's build: {msg}");
    drop(a);
    assert_eq!(std::fs::read(d.host_path(&out)).unwrap(), b"built\n");
}
