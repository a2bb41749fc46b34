//! Path arguments a raw client makes up (SECURITY.md A30, A14, V17's "serve of non-store
//! paths") and an unsigned realisation (V12), sent by an untrusted user to every path-taking
//! operation: each is refused with a clear error, nothing outside the store reaches the client,
//! the store does not change, and the daemon (and an honest client connected meanwhile) carries
//! on. Needs root; fails loudly in CI without it.

use std::os::unix::fs::symlink;

use stockade_common::worker::{Op, StderrMsg};
use stockade_tests::raw::{self, Hangup, RawConn};
use stockade_tests::sec::{assert_unchanged, snapshot, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, Daemon, User};

/// Operations that take one store path (and, for ExportPath, the obsolete sign flag).
const ONE_PATH_OPS: &[Op] = &[
    Op::IsValidPath,
    Op::QueryPathHash,
    Op::QueryReferences,
    Op::QueryReferrers,
    Op::EnsurePath,
    Op::AddTempRoot,
    Op::ExportPath,
    Op::QueryDeriver,
    Op::QueryDerivationOutputs,
    Op::QueryPathInfo,
    Op::QueryDerivationOutputNames,
    Op::QueryValidDerivers,
    Op::NarFromPath,
    Op::QueryDerivationOutputMap,
    Op::QuerySubstitutablePathInfo,
    Op::HasSubstitutes,
];

/// Sends `op` with `path` as its path argument (in a set for the set-taking operations),
/// closes the sending side and returns everything until the daemon hangs up.
fn send_path_op(c: &mut RawConn, op: Op, path: &[u8]) -> Hangup {
    c.send_u64(op.into()).unwrap();
    match op {
        Op::QueryValidPaths => {
            c.send_strs([path]).unwrap();
            c.send_u64(0).unwrap();
        }
        Op::BuildPaths => {
            c.send_strs([path]).unwrap();
            c.send_u64(0).unwrap();
        }
        Op::AddSignatures => {
            c.send_str(path).unwrap();
            c.send_strs(["k:AAAA"]).unwrap();
        }
        Op::ExportPath => {
            c.send_str(path).unwrap();
            c.send_u64(0).unwrap();
        }
        _ => c.send_str(path).unwrap(),
    }
    c.shutdown_write();
    c.read_to_hangup()
}

/// The host's secrets whose text must never reach a client: the first line of each file.
fn host_secrets() -> Vec<(String, Vec<u8>)> {
    ["/etc/shadow", "/etc/passwd"]
        .iter()
        .filter_map(|f| {
            let text = std::fs::read(f).ok()?;
            let first = text.split(|b| *b == b'\n').next()?.to_vec();
            (first.len() >= 8).then(|| (f.to_string(), first))
        })
        .collect()
}

fn assert_nothing_leaked(what: &str, bytes: &[u8], secrets: &[(String, Vec<u8>)]) {
    for (file, line) in secrets {
        assert!(
            !bytes.windows(line.len()).any(|w| w == line.as_slice()),
            "{what}: the client received a line of {file}"
        );
    }
}

/// The store: a path holding `link -> /etc` and `passwd -> /etc/passwd`, and a path that is
/// itself a symlink to `/etc`.
struct Fixture {
    d: Daemon,
    mallory: User,
    bob: User,
    /// Holds the symlinks.
    dir_path: String,
    /// Is a symlink.
    link_path: String,
}

fn fixture(audit: &AuditCollector) -> Fixture {
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .start()
        .expect("stockade");
    let mallory = ensure_user("st-mallory").unwrap();
    let bob = ensure_user("st-bob").unwrap();
    let dir = d.work_dir().join("links/escape");
    std::fs::create_dir_all(&dir).unwrap();
    symlink("/etc", dir.join("link")).unwrap();
    symlink("/etc/passwd", dir.join("passwd")).unwrap();
    let dir_path = d.run_ok(["nix-store", "--add", dir.to_str().unwrap()]);
    let top = d.work_dir().join("toplink/etc-link");
    std::fs::create_dir_all(top.parent().unwrap()).unwrap();
    symlink("/etc", &top).unwrap();
    let link_path = d.run_ok(["nix-store", "--add", top.to_str().unwrap()]);
    Fixture {
        d,
        mallory,
        bob,
        dir_path,
        link_path,
    }
}

/// Paths that are not store paths, each with a part of the error the client must see.
fn hostile_paths(f: &Fixture) -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let hash = f
        .dir_path
        .strip_prefix("/nix/store/")
        .and_then(|b| b.split('-').next())
        .unwrap()
        .to_string();
    let mut nul = f.dir_path.clone().into_bytes();
    nul.extend_from_slice(b"\0x");
    vec![
        (
            "/etc/shadow",
            b"/etc/shadow".to_vec(),
            "is not in the Nix store",
        ),
        (
            "dot-dot out of the store",
            b"/nix/store/../etc/passwd".to_vec(),
            "is not in the Nix store",
        ),
        (
            "dot-dot as a name",
            b"/nix/store/..".to_vec(),
            "invalid hash part",
        ),
        (
            "through a symlink in a store path",
            format!("{}/link/shadow", f.dir_path).into_bytes(),
            "is not in the Nix store",
        ),
        (
            "a symlink inside a store path",
            format!("{}/passwd", f.dir_path).into_bytes(),
            "is not in the Nix store",
        ),
        (
            "below a store path that is a symlink",
            format!("{}/shadow", f.link_path).into_bytes(),
            "is not in the Nix store",
        ),
        // 'e', 'o', 't', 'u' are not Nix base-32 digits.
        (
            "bad hash characters",
            b"/nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-x".to_vec(),
            "invalid hash part",
        ),
        (
            "short hash",
            b"/nix/store/abc-x".to_vec(),
            "invalid hash part",
        ),
        ("NUL byte", nul, "illegal character"),
        (
            "another store directory",
            format!("/gnu/store/{hash}-escape").into_bytes(),
            "is not in the Nix store",
        ),
        ("empty", Vec::new(), ""),
    ]
}

/// A14, A30: every path-taking operation refuses every hostile path with an error and ends
/// the connection as nix-daemon does (nix-daemon reads a path before its work starts, so a bad
/// one ends the connection); nothing of `/etc` reaches the client; the store is unchanged; an
/// honest client connected meanwhile and a new connection are served.
#[test]
fn a14_a30_paths_outside_the_store_are_refused() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let f = fixture(&audit);
    let secrets = host_secrets();
    assert!(!secrets.is_empty(), "no /etc/passwd to compare with");
    let mut honest = RawConn::session(&f.d, Some(&f.bob));
    let before = snapshot(&f.d);
    let mut ops: Vec<Op> = ONE_PATH_OPS.to_vec();
    ops.extend([Op::QueryValidPaths, Op::BuildPaths, Op::AddSignatures]);
    for (name, path, expected) in hostile_paths(&f) {
        for &op in &ops {
            let what = format!("{op:?} of {name}");
            let mut c = RawConn::session(&f.d, Some(&f.mallory));
            c.set_timeout(std::time::Duration::from_secs(20));
            let h = send_path_op(&mut c, op, &path);
            assert!(h.closed, "{what}: the connection stayed open");
            let errors = h.errors();
            assert!(
                !errors.is_empty() && !h.messages.contains(&StderrMsg::Last),
                "{what}: expected only an error, got {:?}",
                h.messages
            );
            assert!(
                errors.iter().all(|e| e.contains(expected)),
                "{what}: error {errors:?} does not say {expected:?}"
            );
            assert_nothing_leaked(&what, &h.bytes, &secrets);
        }
        assert_eq!(
            honest.is_valid_path(&f.dir_path).unwrap(),
            Ok(true),
            "{name}: the honest client was disturbed"
        );
    }
    // QueryPathFromHashPart: a hash part with non-base-32 characters finds nothing, one of the
    // wrong length is an error; neither names a path.
    for (part, ok) in [
        ("eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee", true),
        ("../etc", false),
    ] {
        let mut c = RawConn::session(&f.d, Some(&f.mallory));
        c.send_u64(Op::QueryPathFromHashPart.into()).unwrap();
        c.send_str(part).unwrap();
        c.shutdown_write();
        let h = c.read_to_hangup();
        assert_eq!(
            h.errors().is_empty(),
            ok,
            "hash part {part:?}: {:?}",
            h.messages
        );
        if ok {
            // STDERR_LAST, then an empty string: no path.
            assert_eq!(h.unparsed, 8, "hash part {part:?}: {:?}", h.bytes);
        }
    }
    assert_unchanged(&f.d, &before, "hostile paths");
    let mut fresh = RawConn::session(&f.d, Some(&f.mallory));
    assert_eq!(fresh.is_valid_path(&f.link_path).unwrap(), Ok(true));
}

/// NarFromPath of a valid path and returns the NAR bytes after `STDERR_LAST`.
fn nar_of(d: &Daemon, user: &User, path: &str) -> Vec<u8> {
    let mut c = RawConn::session(d, Some(user));
    let h = send_path_op(&mut c, Op::NarFromPath, path.as_bytes());
    assert!(
        h.messages.last() == Some(&StderrMsg::Last),
        "NarFromPath {path}: {:?}",
        h.messages
    );
    h.bytes[h.bytes.len() - h.unparsed..].to_vec()
}

/// A30: the NAR of a valid path holding symlinks out of the store, and of a path that is a
/// symlink to `/etc`, holds the links as links: nothing they point to is read.
#[test]
fn a30_symlinks_in_store_paths_are_served_as_links() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let f = fixture(&audit);
    let secrets = host_secrets();
    let dir_nar = nar_of(&f.d, &f.mallory, &f.dir_path);
    let expect_dir = raw::nar_from_tokens(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"directory",
        b"entry",
        b"(",
        b"name",
        b"link",
        b"node",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"/etc",
        b")",
        b")",
        b"entry",
        b"(",
        b"name",
        b"passwd",
        b"node",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"/etc/passwd",
        b")",
        b")",
        b")",
    ]);
    assert_eq!(dir_nar, expect_dir, "the NAR of {}", f.dir_path);
    let link_nar = nar_of(&f.d, &f.mallory, &f.link_path);
    let expect_link = raw::nar_from_tokens(&[
        b"nix-archive-1",
        b"(",
        b"type",
        b"symlink",
        b"target",
        b"/etc",
        b")",
    ]);
    assert_eq!(link_nar, expect_link, "the NAR of {}", f.link_path);
    assert_nothing_leaked("NarFromPath", &dir_nar, &secrets);
    // QueryPathInfo answers with the registered facts: the NAR size is that of the links.
    let mut c = RawConn::session(&f.d, Some(&f.mallory));
    c.send_u64(Op::QueryPathInfo.into()).unwrap();
    c.send_str(&f.dir_path).unwrap();
    c.flush().unwrap();
    assert!(c.response().unwrap().is_ok());
    assert!(c.r().read_bool("valid").unwrap());
    c.r().read_string("deriver").unwrap();
    c.r().read_string("hash").unwrap();
    c.r().read_path_set("refs").unwrap();
    c.r().read_u64("time").unwrap();
    let size = c.r().read_u64("size").unwrap();
    assert_eq!(size, expect_dir.len() as u64);
}

/// V12: an untrusted RegisterDrvOutput is refused; no realisation is registered (the store
/// and database are unchanged, QueryRealisation finds nothing) and the connection carries on.
#[test]
fn v12_an_untrusted_realisation_is_refused() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let f = fixture(&audit);
    let before = snapshot(&f.d);
    let id = "sha256:1b4c3d4fbbd6a0a09d0ffa9bb2ed1b8e2c4a2a5c3c7d9a8c1b2e3f4a5b6c7d8e!out";
    let realisation = format!(
        "{{\"id\":\"{id}\",\"outPath\":\"{}\",\"signatures\":[],\"dependentRealisations\":{{}}}}",
        f.dir_path.trim_start_matches("/nix/store/")
    );
    let mut c = RawConn::session(&f.d, Some(&f.mallory));
    c.send_u64(Op::RegisterDrvOutput.into()).unwrap();
    c.send_str(&realisation).unwrap();
    c.flush().unwrap();
    let err = c.response().unwrap().error("RegisterDrvOutput");
    assert!(
        err.contains("ca-derivations") || err.contains("lacks a valid signature"),
        "RegisterDrvOutput: {err}"
    );
    // The same connection goes on: the error came during the operation's work.
    c.send_u64(Op::QueryRealisation.into()).unwrap();
    c.send_str(id).unwrap();
    c.flush().unwrap();
    assert!(c.response().unwrap().is_ok());
    assert_eq!(c.r().read_u64("count").unwrap(), 0, "a realisation exists");
    assert_eq!(c.is_valid_path(&f.dir_path).unwrap(), Ok(true));
    assert_unchanged(&f.d, &before, "RegisterDrvOutput");
    let db = f.d.host_path("/nix/var/nix/db/db.sqlite");
    let conn =
        rusqlite::Connection::open_with_flags(&db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let has_table: i64 = conn
        .query_row(
            "select count(*) from sqlite_master where name = 'Realisations'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    if has_table > 0 {
        let n: i64 = conn
            .query_row("select count(*) from Realisations", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0, "realisations registered");
    }
}

/// V17, the daemon that accepted `.drv`s with wrong output paths (Nix b2027f70d9): mallory
/// takes a real input-addressed derivation and gives its `out` a path of her choosing. Added
/// as a derivation (raw AddTextToStore) or as a file (`nix-store --add`: a NAR-hashed store
/// path, but named `….drv`) it is refused, its output paths recomputed (the store-writer
/// checks every path named `….drv`, however added); building it then fails, as it is not in
/// the store. Nothing is built at the chosen path.
#[test]
fn v17_a_derivation_with_a_wrong_output_path_is_neither_added_nor_built() {
    use stockade_common::derivation::{name_from_drv_path, Derivation, DerivationOutput};
    use stockade_common::hash::Hash;
    use stockade_common::store_path::StoreDir;
    skip_unless_root!();
    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .start()
        .expect("stockade");
    let mallory = ensure_user("st-mallory").unwrap();
    let bb = d.add_busybox();
    let expr = stockade_tests::busybox_derivation(&bb, "v17", "echo built > $out");
    let drv = d
        .run_ok(["nix-instantiate", "-E", &expr])
        .trim()
        .to_string();
    let sd = StoreDir::new(&d.store_dir()).unwrap();
    let drv_path = sd.parse(&drv).unwrap();
    let text = std::fs::read(d.host_path(&drv)).unwrap();
    let name = name_from_drv_path(&drv_path).unwrap();
    let mut lying = Derivation::parse(&sd, &text, name).unwrap();
    let chosen = sd
        .make_path("output:out", &Hash::sha256(b"v17 chosen"), &lying.name)
        .unwrap();
    let chosen_s = sd.display(&chosen);
    lying.outputs.insert(
        "out".into(),
        DerivationOutput::InputAddressed(chosen.clone()),
    );
    lying
        .env
        .insert(b"out".to_vec(), chosen_s.clone().into_bytes());
    let lying_text = lying.to_aterm(&sd).unwrap();
    let lying_path = sd.display(&lying.drv_path(&sd).unwrap());

    // As a derivation: refused.
    let mut c = RawConn::session(&d, Some(&mallory));
    c.send_u64(Op::AddTextToStore.into()).unwrap();
    c.send_str(format!("{}.drv", lying.name)).unwrap();
    c.send_str(&lying_text).unwrap();
    let refs: Vec<String> = lying.references().iter().map(|p| sd.display(p)).collect();
    c.send_strs(&refs).unwrap();
    c.flush().unwrap();
    let err = c
        .response()
        .unwrap()
        .error("AddTextToStore of the lying derivation");
    assert!(err.contains("has incorrect output"), "{err}");
    assert_eq!(c.is_valid_path(&lying_path).unwrap(), Ok(false));
    drop(c);
    let built = d
        .cmd("nix-store")
        .args(["--realise", &lying_path])
        .as_user(&mallory)
        .output();
    assert!(!built.success(), "{built}");

    // As a file (`nix-store --add`: a NAR-hashed path, but named `….drv`): refused the same.
    let f = d.write_work_file("v17/v17.drv", &lying_text);
    std::fs::set_permissions(&f, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let as_file = d
        .cmd("nix-store")
        .args(["--add", f.to_str().unwrap()])
        .as_user(&mallory)
        .output();
    assert!(!as_file.success(), "{as_file}");
    assert!(
        as_file.stderr_str().contains("has incorrect output"),
        "{as_file}"
    );
    assert!(!d.host_path(&chosen_s).exists(), "{chosen_s} was built");
    let mut c = RawConn::session(&d, Some(&mallory));
    assert_eq!(c.is_valid_path(&chosen_s).unwrap(), Ok(false));
}
