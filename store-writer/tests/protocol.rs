//! The broker channel's state machine, queries, roots, signatures, logs and verification.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::AsFd;

use common::*;
use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::HashAlgo;
use stockade_common::ipc::msg::{QUERY_CHUNK, VERSION};
use stockade_common::ipc::writer::{BrokerToStoreWriter, Notice};
use stockade_common::ipc::{self};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{FileIngestion, StorePath};

fn add_text(b: &mut Broker, name: &str, data: &[u8], refs: Vec<StorePath>) -> PathInfo {
    match b.call(
        Req::AddToStore {
            name: name.into(),
            method: ContentAddressMethod::Text,
            algo: HashAlgo::Sha256,
            references: refs,
            repair: false,
        },
        Some(data.to_vec()),
    ) {
        Ok(i) => i,
        other => panic!("{other:?}"),
    }
}

fn raw_channel(env: &mut Env) -> (ipc::Channel, std::thread::JoinHandle<()>) {
    let (mut ours, theirs) = ipc::socketpair().unwrap();
    ours.enable_spill(stockade_common::ipc::msg::BROKER_SPILL_MAX);
    let client = stockade_common::ipc::msg::ClientIdentity {
        conn_id: 900,
        uid: 1000,
        gid: 100,
        pid: 1,
        trusted: false,
        user_name: None,
    };
    let t = stockade_store_writer::control::spawn_session(&env.store, client, theirs);
    (ours, t)
}

fn expect_closed(mut chan: ipc::Channel, t: std::thread::JoinHandle<()>) {
    match chan.recv::<Notice>() {
        Err(ipc::Error::Closed) => {}
        other => panic!("expected close, got {other:?}"),
    }
    t.join().unwrap();
}

#[test]
fn state_machine_closes_on_violations() {
    let mut env = Env::new();
    // A request before Hello.
    let (mut c, t) = raw_channel(&mut env);
    c.send(&BrokerToStoreWriter::from(Req::QueryAllValidPaths {}), &[])
        .unwrap();
    expect_closed(c, t);
    // A Hello with another version.
    let (mut c, t) = raw_channel(&mut env);
    c.send(
        &BrokerToStoreWriter::from(Req::Hello {
            version: VERSION + 1,
        }),
        &[],
    )
    .unwrap();
    expect_closed(c, t);
    // A second Hello.
    let b = env.connect(false);
    let mut b = b;
    b.send(Req::Hello { version: VERSION });
    b.expect_closed();
    // Garbage bytes.
    let mut b = env.connect(false);
    b.chan.send_value(&vec![0xffu8; 40], &[]).unwrap();
    b.expect_closed();
    // An add that brings its own descriptor: upload pipes come from the store-writer (A70).
    let mut b = env.connect(false);
    let (sock, _other) = ipc::socketpair().unwrap();
    b.chan
        .send_value(
            &BrokerToStoreWriter::from(Req::AddToStore {
                name: "x".into(),
                method: ContentAddressMethod::Text,
                algo: HashAlgo::Sha256,
                references: vec![],
                repair: false,
            }),
            &[sock.as_fd()],
        )
        .unwrap();
    b.expect_closed();
    assert!(env.store_entries().is_empty());
    // A query over the chunk size.
    let mut b = env.connect(false);
    let p: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-t".parse().unwrap();
    b.send(Req::QueryValidPaths {
        paths: vec![p; QUERY_CHUNK + 1],
    });
    b.expect_closed();
}

#[test]
fn queries() {
    let mut env = Env::new();
    let mut b = env.connect(false);
    let a = add_text(&mut b, "a", b"a", vec![]);
    let c = add_text(&mut b, "c", b"c", vec![a.path.clone()]);
    let missing: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-missing".parse().unwrap();

    assert_eq!(
        b.call(
            Req::IsValidPath {
                path: a.path.clone()
            },
            None
        ),
        Ok(true)
    );
    assert_eq!(
        b.call(
            Req::IsValidPath {
                path: missing.clone()
            },
            None
        ),
        Ok(false)
    );
    assert_eq!(
        b.call(
            Req::QueryValidPaths {
                paths: vec![a.path.clone(), missing.clone(), c.path.clone()]
            },
            None
        ),
        Ok(vec![a.path.clone(), c.path.clone()])
    );
    match b.call(
        Req::QueryPathInfo {
            path: c.path.clone(),
        },
        None,
    ) {
        Ok(Some(i)) => {
            assert_eq!(i.references, [a.path.clone()].into());
            assert_eq!(i.nar_hash, c.nar_hash);
            assert_eq!(i.ca, c.ca);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        b.call(
            Req::QueryPathInfo {
                path: missing.clone()
            },
            None
        ),
        Ok(None)
    );
    assert_eq!(
        b.call(
            Req::QueryReferrers {
                path: a.path.clone()
            },
            None
        ),
        Ok(vec![c.path.clone()])
    );
    assert_eq!(
        b.call(
            Req::QueryValidDerivers {
                path: a.path.clone()
            },
            None
        ),
        Ok(vec![])
    );
    assert_eq!(
        b.call(
            Req::QueryPathFromHashPart {
                hash_part: a.path.hash_part().into()
            },
            None
        ),
        Ok(Some(a.path.clone()))
    );
    assert_eq!(
        b.call(
            Req::QueryPathFromHashPart {
                hash_part: missing.hash_part().into()
            },
            None
        ),
        Ok(None)
    );
    // Nix checks only the length: 32 characters that are not Nix base32 name no path.
    assert_eq!(
        b.call(
            Req::QueryPathFromHashPart {
                hash_part: "hv2lxdwpbmd9zfj87n6n7z5wxhnswiz%".into()
            },
            None
        ),
        Ok(None)
    );
    for bad in ["short", "hv2lxdwpbmd9zfj87n6n7z5wxhnswizxx", ""] {
        assert_eq!(
            error_of(b.call(
                Req::QueryPathFromHashPart {
                    hash_part: bad.into()
                },
                None
            )),
            "invalid hash part"
        );
    }
    let drv: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-foo.drv".parse().unwrap();
    assert_eq!(
        plain(&error_of(b.call(Req::QueryDerivationOutputs { drv }, None))),
        "path '/nix/store/hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-foo.drv' is not valid"
    );
    let mut all = vec![a.path.clone(), c.path.clone()];
    all.sort();
    assert_eq!(b.call(Req::QueryAllValidPaths {}, None), Ok(all));
    assert_eq!(
        b.call(Req::QueryRealisation { id: "x".into() }, None),
        Ok(None)
    );
    assert!(error_of(b.call(
        Req::RegisterDrvOutput {
            realisation: "{}".into()
        },
        None
    ))
    .starts_with("experimental Nix feature 'ca-derivations' is disabled"));
}

#[test]
fn temp_roots_are_locked_files_that_live_with_the_connection() {
    let mut env = Env::new();
    let mut b = env.connect(false);
    let a = add_text(&mut b, "a", b"a", vec![]);
    // The add itself registered a temporary root for the new path, in Nix's format.
    let file = env
        .state()
        .join(format!("temproots/{}-1", std::process::id()));
    let contents = std::fs::read(&file).unwrap();
    assert_eq!(
        contents,
        format!("/nix/store/{}\0", a.path.base_name()).into_bytes()
    );
    let other: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-other".parse().unwrap();
    assert_eq!(
        b.call(
            Req::AddTempRoot {
                path: other.clone()
            },
            None
        ),
        Ok(())
    );
    assert_eq!(
        b.call(
            Req::AddTempRoot {
                path: other.clone()
            },
            None
        ),
        Ok(())
    );
    let contents = String::from_utf8(std::fs::read(&file).unwrap()).unwrap();
    assert_eq!(
        contents.matches('\0').count(),
        2,
        "duplicates are not written twice"
    );
    // Nix's GC tries an exclusive lock to see whether the owner lives: it must fail.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Err((_, e)) => assert_eq!(e, nix::errno::Errno::EWOULDBLOCK),
        Ok(_) => panic!("temporary roots file is not locked"),
    }
    // Roots: censored for the untrusted client, `{temp:<pid>}` for a trusted one.
    match b.call(Req::FindRoots {}, None) {
        Ok(r) => {
            assert!(
                r.contains(&("{censored}".to_string(), a.path.clone())),
                "{r:?}"
            );
            assert!(
                r.contains(&("{censored}".to_string(), other.clone())),
                "{r:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    let mut t = env.connect(true);
    match t.call(Req::FindRoots {}, None) {
        Ok(r) => {
            let label = format!("{{temp:{}}}", std::process::id());
            assert!(r.contains(&(label, a.path.clone())), "{r:?}");
        }
        other => panic!("{other:?}"),
    }
    b.close();
    assert!(!file.exists(), "the roots go with the connection");
}

#[test]
fn indirect_roots_and_find_roots() {
    let mut env = Env::new();
    let mut b = env.connect(false);
    let a = add_text(&mut b, "a", b"a", vec![]);
    let home = tempfile::tempdir().unwrap();
    let link = home.path().join("result");
    std::os::unix::fs::symlink(format!("/nix/store/{}", a.path.base_name()), &link).unwrap();
    let link_s = link.display().to_string();
    // Given with redundant components: canonicalised like Nix's absPath.
    let messy = format!("{}/./sub/../result", home.path().display());
    assert_eq!(b.call(Req::AddIndirectRoot { link: messy }, None), Ok(()));
    let hash = stockade_common::base32::encode(
        stockade_common::hash::Hash::of(HashAlgo::Sha1, link_s.as_bytes()).digest(),
    );
    let auto = env.state().join("gcroots/auto").join(&hash);
    assert_eq!(std::fs::read_link(&auto).unwrap(), link);
    assert!(error_of(b.call(
        Req::AddIndirectRoot {
            link: "relative/x".into()
        },
        None
    ))
    .contains("invalid root link"));

    // A direct root in gcroots and a profile link.
    std::os::unix::fs::symlink(
        format!("/nix/store/{}", a.path.base_name()),
        env.state().join("gcroots/direct"),
    )
    .unwrap();
    // A root to an invalid path is skipped; a dangling auto link is removed.
    std::os::unix::fs::symlink(
        "/nix/store/hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-gone",
        env.state().join("gcroots/invalid"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "/nonexistent/result",
        env.state().join("gcroots/auto/dangling"),
    )
    .unwrap();

    let mut t = env.connect(true);
    let roots = match t.call(Req::FindRoots {}, None) {
        Ok(r) => r,
        other => panic!("{other:?}"),
    };
    let links: BTreeSet<&str> = roots
        .iter()
        .filter(|(_, p)| *p == a.path)
        .map(|(l, _)| l.as_str())
        .collect();
    let direct = env.state().join("gcroots/direct").display().to_string();
    assert!(links.contains(link_s.as_str()), "{roots:?}");
    assert!(links.contains(direct.as_str()), "{roots:?}");
    assert!(!roots.iter().any(|(_, p)| p.name() == "gone"), "{roots:?}");
    assert!(std::fs::symlink_metadata(env.state().join("gcroots/auto/dangling")).is_err());
}

#[test]
fn privileged_requests_check_trust() {
    let mut env = Env::new();
    let mut u = env.connect(false);
    let a = add_text(&mut u, "a", b"a", vec![]);
    let sig = "test-key-1:AAAA".to_string();
    assert_eq!(
        error_of(u.call(
            Req::AddSignatures {
                path: a.path.clone(),
                sigs: vec![sig.clone()]
            },
            None
        )),
        "you are not privileged to add signatures"
    );
    assert_eq!(
        error_of(u.call(
            Req::AddPermRoot {
                path: a.path.clone(),
                link: "/tmp/x".into()
            },
            None
        )),
        "you are not privileged to create perm roots"
    );
    assert_eq!(
        error_of(
            u.call(
                Req::VerifyStore {
                    check_contents: false,
                    repair: true
                },
                None
            )
            .map(|o| o.errors)
        ),
        "you are not privileged to repair paths"
    );
    let drv: StorePath = "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-foo.drv".parse().unwrap();
    assert_eq!(
        error_of(u.call(Req::AddBuildLog { drv: drv.clone() }, Some(b"log".to_vec()))),
        "you are not privileged to add logs"
    );
    assert!(env
        .store
        .db()
        .query_path_info(&a.path)
        .unwrap()
        .unwrap()
        .sigs
        .is_empty());

    let mut t = env.connect(true);
    assert_eq!(
        t.call(
            Req::AddSignatures {
                path: a.path.clone(),
                sigs: vec![sig.clone()]
            },
            None
        ),
        Ok(())
    );
    assert_eq!(
        env.store
            .db()
            .query_path_info(&a.path)
            .unwrap()
            .unwrap()
            .sigs,
        [sig].into()
    );
    assert!(error_of(t.call(
        Req::AddSignatures {
            path: a.path.clone(),
            sigs: vec!["a b".into()]
        },
        None
    ))
    .contains("invalid signature"));

    // Build logs: bzip2, kept when present.
    let log = b"line 1\nline 2\n".repeat(1000);
    assert_eq!(
        t.call(Req::AddBuildLog { drv: drv.clone() }, Some(log.clone())),
        Ok(())
    );
    let base = drv.base_name();
    let file = env
        .dir
        .path()
        .join("var/log/nix/drvs")
        .join(&base[..2])
        .join(format!("{}.bz2", &base[2..]));
    let mut got = Vec::new();
    bzip2::read::BzDecoder::new(std::fs::File::open(&file).unwrap())
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, log);
    assert_eq!(
        t.call(
            Req::AddBuildLog { drv: drv.clone() },
            Some(b"other".to_vec())
        ),
        Ok(())
    );
    let mut again = Vec::new();
    bzip2::read::BzDecoder::new(std::fs::File::open(&file).unwrap())
        .read_to_end(&mut again)
        .unwrap();
    assert_eq!(again, log, "an existing log is kept");
    let not_drv = a.path.clone();
    assert!(
        error_of(t.call(Req::AddBuildLog { drv: not_drv }, Some(b"x".to_vec())))
            .contains("is not a derivation")
    );
}

#[test]
fn verify_store() {
    let mut env = Env::new();
    let mut b = env.connect(false);
    let a = add_text(&mut b, "a", b"a", vec![]);
    let user = add_text(&mut b, "user", b"user", vec![a.path.clone()]);
    let lonely = add_text(&mut b, "lonely", b"lonely", vec![]);
    let tree = match b.call(
        Req::AddToStore {
            name: "tree".into(),
            method: ContentAddressMethod::Fixed(FileIngestion::Recursive),
            algo: HashAlgo::Sha256,
            references: vec![],
            repair: false,
        },
        Some(tree_nar("t")),
    ) {
        Ok(i) => i,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        b.call(
            Req::VerifyStore {
                check_contents: true,
                repair: false
            },
            None
        )
        .map(|o| o.errors),
        Ok(false)
    );
    let texts: Vec<&str> = b.logs.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        texts,
        [
            "reading the Nix store...",
            "checking path existence...",
            "checking link hashes...",
            "checking store hashes..."
        ]
    );

    // A missing path without referrers is dropped; one with a valid referrer is an error.
    let real = env.real_store();
    std::fs::remove_file(real.join(lonely.path.base_name())).unwrap();
    std::fs::remove_file(real.join(a.path.base_name())).unwrap();
    assert_eq!(
        b.call(
            Req::VerifyStore {
                check_contents: false,
                repair: false
            },
            None
        )
        .map(|o| o.errors),
        Ok(true)
    );
    let full = |p: &StorePath| format!("/nix/store/{}", p.base_name());
    assert!(
        b.logs.contains(&(
            3,
            format!(
                "path '{}' disappeared, removing from database...",
                full(&lonely.path)
            )
        )),
        "{:?}",
        b.logs
    );
    assert!(
        b.logs.contains(&(
            0,
            format!(
                "path '{}' disappeared, but it still has valid referrers!",
                full(&a.path)
            )
        )),
        "{:?}",
        b.logs
    );
    assert!(!env.is_valid(&lonely.path));
    assert!(env.is_valid(&a.path));
    assert!(env.is_valid(&user.path));

    // A modified file is found with check_contents.
    let data = real.join(tree.path.base_name()).join("data");
    let mut perms = std::fs::metadata(&data).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
    std::fs::set_permissions(&data, perms).unwrap();
    std::fs::write(&data, b"tampered").unwrap();
    assert_eq!(
        b.call(
            Req::VerifyStore {
                check_contents: true,
                repair: false
            },
            None
        )
        .map(|o| o.errors),
        Ok(true)
    );
    assert!(
        b.logs.iter().any(|(l, t)| *l == 0
            && t.starts_with(&format!(
                "path '{}' was modified! expected hash 'sha256:",
                full(&tree.path)
            ))),
        "{:?}",
        b.logs
    );
}

#[test]
fn as_root_store_and_per_user_directories() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root");
        return;
    }
    let env = Env::with(|c| c.as_root = true);
    let md = std::fs::metadata(env.real_store()).unwrap();
    assert_eq!(md.permissions().mode() & 0o7777, 0o1775);
    assert_eq!(md.uid(), 0);
    let want_gid = nix::unistd::Group::from_name("nixbld")
        .unwrap()
        .map_or(0, |g| g.gid.as_raw());
    assert_eq!(md.gid(), want_gid);
    stockade_store_writer::roots::create_user_dirs(&env.store, "alice", 1234).unwrap();
    for base in ["profiles/per-user", "gcroots/per-user"] {
        let parent = std::fs::metadata(env.state().join(base)).unwrap();
        assert_eq!(parent.permissions().mode() & 0o7777, 0o755);
        let d = std::fs::symlink_metadata(env.state().join(base).join("alice")).unwrap();
        assert!(d.is_dir());
        assert_eq!(d.uid(), 1234);
        assert_eq!(d.permissions().mode() & 0o7777, 0o755);
    }
    // A planted symlink is not followed.
    std::os::unix::fs::symlink("/etc", env.state().join("profiles/per-user/mallory")).unwrap();
    assert!(stockade_store_writer::roots::create_user_dirs(&env.store, "mallory", 1000).is_err());
    assert_eq!(std::fs::metadata("/etc").unwrap().uid(), 0);
    assert!(stockade_store_writer::roots::create_user_dirs(&env.store, "../x", 1000).is_err());
}
