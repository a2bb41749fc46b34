//! OptimiseStore through a broker channel, and `auto-optimise-store` on adds: what is linked,
//! what the client is told, what is audited.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::HashAlgo;
use stockade_common::ipc::writer::InlineData;
use stockade_common::nar::NarWriter;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::FileIngestion;

const NAR: ContentAddressMethod = ContentAddressMethod::Fixed(FileIngestion::Recursive);

/// A tree: `shared` (the same in every tree), `own` (this tree's), `bin/tool` (executable,
/// the same in every tree).
fn tree(tag: &str) -> Vec<u8> {
    let mut w = NarWriter::new(Vec::new()).unwrap();
    let file = |w: &mut NarWriter<Vec<u8>>, name: &[u8], exe: bool, data: &[u8]| {
        w.entry(name).unwrap();
        w.regular(exe, data.len() as u64).unwrap();
        w.contents(data).unwrap();
    };
    w.directory().unwrap();
    w.entry(b"bin").unwrap();
    w.directory().unwrap();
    file(&mut w, b"tool", true, b"#!/bin/sh\necho tool\n");
    w.end_directory().unwrap();
    file(&mut w, b"own", false, format!("only in {tag}\n").as_bytes());
    file(&mut w, b"shared", false, &[b'x'; 3000]);
    w.end_directory().unwrap();
    w.finish().unwrap()
}

fn add(b: &mut Broker, name: &str, nar: &[u8]) -> PathInfo {
    let r = b.call(
        Req::AddToStoreInline {
            name: name.into(),
            method: NAR,
            algo: HashAlgo::Sha256,
            references: vec![],
            repair: false,
            data: InlineData(nar.to_vec()),
        },
        None,
    );
    match r {
        Ok(i) => i,
        other => panic!("add {name}: {other:?}"),
    }
}

fn ino(p: &Path) -> u64 {
    std::fs::symlink_metadata(p).unwrap().ino()
}

/// An environment whose audit lines reach a socket the test reads.
fn audited(tweak: impl FnOnce(&mut StoreWriterConfig)) -> (Env, UnixDatagram, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("audit");
    let server = UnixDatagram::bind(&sock).unwrap();
    server
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let env = Env::with(|c| {
        c.audit_socket = Some(sock.display().to_string());
        tweak(c);
    });
    (env, server, dir)
}

fn audit_lines(server: &UnixDatagram) -> Vec<String> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    while let Ok(n) = server.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

fn paths_of(env: &Env, infos: &[PathInfo]) -> Vec<PathBuf> {
    infos
        .iter()
        .map(|i| env.real_store().join(i.path.base_name()))
        .collect()
}

#[test]
fn optimise_store_links_duplicates_and_says_so_as_nix() {
    let (mut env, audit, _keep) = audited(|_| {});
    let mut b = env.connect(false);
    let infos: Vec<PathInfo> = (0..3)
        .map(|i| add(&mut b, &format!("t{i}"), &tree(&format!("{i}"))))
        .collect();
    let dirs = paths_of(&env, &infos);
    assert_ne!(ino(&dirs[0].join("shared")), ino(&dirs[1].join("shared")));

    let r = b.call(Req::OptimiseStore { verbosity: 3 }, None);
    assert_eq!(r, Ok(()));
    // Two copies each of `shared` (3000 bytes) and `bin/tool` (20 bytes) replaced.
    assert_eq!(
        b.logs,
        vec![(3, "0.01 MiB freed by hard-linking 4 files".to_string())]
    );
    for f in ["shared", "bin/tool"] {
        let first = ino(&dirs[0].join(f));
        assert!(dirs.iter().all(|d| ino(&d.join(f)) == first), "{f}");
    }
    assert_ne!(ino(&dirs[0].join("own")), ino(&dirs[1].join("own")));
    // The contents are still what was registered.
    let r = b
        .call(
            Req::VerifyStore {
                check_contents: true,
                repair: false,
            },
            None,
        )
        .map(|o| o.errors);
    assert_eq!(r, Ok(false), "{:?}", b.logs);

    // Again: nothing left to link; at talkative level each path is named.
    let r = b.call(Req::OptimiseStore { verbosity: 4 }, None);
    assert_eq!(r, Ok(()));
    let last = b.logs.last().cloned();
    assert_eq!(
        last,
        Some((3, "0.00 MiB freed by hard-linking 0 files".to_string()))
    );
    for i in &infos {
        let line = format!("optimising path '{}'...", env.store.full(&i.path));
        assert!(b.logs.contains(&(4, line.clone())), "{line}: {:?}", b.logs);
    }

    let lines = audit_lines(&audit);
    let ends: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("op=optimiseStore outcome=finished"))
        .collect();
    assert_eq!(ends.len(), 2, "{lines:#?}");
    assert!(
        ends[0].contains("uid=1000") && ends[0].contains("trusted=no"),
        "{}",
        ends[0]
    );
    assert!(
        ends[0].contains("paths=3 filesLinked=4 bytesFreed=6040 changedMeanwhile=0"),
        "{}",
        ends[0]
    );
    assert!(
        ends[1].contains("filesLinked=0 bytesFreed=0"),
        "{}",
        ends[1]
    );
    assert!(lines
        .iter()
        .any(|l| l.contains("op=optimiseStore outcome=started")));
}

#[test]
fn auto_optimise_links_each_added_path() {
    let (mut env, audit, _keep) = audited(|c| c.auto_optimise_store = true);
    let mut b = env.connect(true);
    let infos: Vec<PathInfo> = (0..2)
        .map(|i| add(&mut b, &format!("t{i}"), &tree(&format!("{i}"))))
        .collect();
    let dirs = paths_of(&env, &infos);
    for f in ["shared", "bin/tool"] {
        assert_eq!(ino(&dirs[0].join(f)), ino(&dirs[1].join(f)), "{f}");
    }
    let entry = std::fs::read_dir(env.real_store().join(".links"))
        .unwrap()
        .count();
    // shared, tool, and each tree's own file.
    assert_eq!(entry, 4);
    // A flat file with the contents of a tree's file: linked as well.
    let flat = b.call(
        Req::AddToStoreInline {
            name: "flat".into(),
            method: ContentAddressMethod::Fixed(FileIngestion::Flat),
            algo: HashAlgo::Sha256,
            references: vec![],
            repair: false,
            data: InlineData(vec![b'x'; 3000]),
        },
        None,
    );
    let flat = env.real_store().join(flat.unwrap().path.base_name());
    assert_eq!(ino(&flat), ino(&dirs[0].join("shared")));
    let md = std::fs::symlink_metadata(&dirs[1]).unwrap();
    assert_eq!((md.mode() & 0o7777, md.mtime()), (0o555, 1));

    let r = b
        .call(
            Req::VerifyStore {
                check_contents: true,
                repair: false,
            },
            None,
        )
        .map(|o| o.errors);
    assert_eq!(r, Ok(false), "{:?}", b.logs);
    let lines = audit_lines(&audit);
    let autos: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("op=autoOptimise outcome=finished"))
        .collect();
    // The first tree linked nothing (and is not audited), the second two files, the flat one.
    assert_eq!(autos.len(), 2, "{lines:#?}");
    assert!(
        autos[0].contains("filesLinked=2 bytesFreed=3020"),
        "{}",
        autos[0]
    );
    assert!(
        autos[1].contains("filesLinked=1 bytesFreed=3000"),
        "{}",
        autos[1]
    );
}

#[test]
fn without_auto_optimise_adds_are_not_linked() {
    let mut env = Env::new();
    let mut b = env.connect(true);
    let infos: Vec<PathInfo> = (0..2)
        .map(|i| add(&mut b, &format!("t{i}"), &tree(&format!("{i}"))))
        .collect();
    let dirs = paths_of(&env, &infos);
    assert_ne!(ino(&dirs[0].join("shared")), ino(&dirs[1].join("shared")));
    assert_eq!(
        std::fs::read_dir(env.real_store().join(".links"))
            .unwrap()
            .count(),
        0
    );
}
