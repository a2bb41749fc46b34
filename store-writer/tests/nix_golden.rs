//! Against the real Nix 2.8: the same paths for the same data, the same database rows, and
//! Nix itself reading (and verifying) a store the store-writer wrote. Nix only ever runs in a
//! private mount namespace over a throw-away `/nix` (a tmpfs with our temporary directories
//! bind-mounted on `/nix/store` and `/nix/var`); the host's `/nix` is never touched.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::*;
use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::{Encoding, HashAlgo};
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::{FileIngestion, StorePath};

/// Whether Nix is installed; without it the test fails under CI and is skipped otherwise.
/// Looked up on PATH only: even `nix-store --version` opens the host's store database.
fn have_nix() -> bool {
    let ok = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|d| {
            std::fs::metadata(d.join("nix-store"))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    });
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "nix-store is required under CI (install nix-bin)"
        );
        eprintln!("skipping: nix-store is not installed");
    }
    ok
}

/// Runs `script` with Nix's store at `store` and state at `var` (bind-mounted on a tmpfs
/// `/nix` in a private mount namespace). Returns stdout; panics on failure.
fn in_nix(work: &Path, store: &Path, var: &Path, script: &str) -> String {
    let conf = work.join("nixconf");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("nix.conf"),
        "sandbox = false\nbuild-users-group =\nsubstituters =\n",
    )
    .unwrap();
    let home = work.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let full = format!(
        "set -e; mount -t tmpfs none /nix; mkdir -p /nix/store /nix/var; \
         mount --bind '{}' /nix/store; mount --bind '{}' /nix/var; {script}",
        store.display(),
        var.display()
    );
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &full])
        .env("NIX_CONF_DIR", &conf)
        .env("HOME", &home)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env_remove("NIX_REMOTE")
        .env_remove("NIX_STORE_DIR")
        .env_remove("NIX_STATE_DIR")
        .env_remove("NIX_LOG_DIR")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "nix script failed: {script}\nstdout: {stdout}\nstderr: {stderr}"
    );
    stdout
}

fn make_source(dir: &Path) {
    std::fs::create_dir_all(dir.join("src/bin")).unwrap();
    std::fs::write(dir.join("src/bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
    std::fs::set_permissions(
        dir.join("src/bin/tool"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::fs::write(dir.join("src/readme"), b"read me\n").unwrap();
    std::os::unix::fs::symlink("readme", dir.join("src/link")).unwrap();
    std::fs::write(dir.join("blob"), vec![7u8; 10_000]).unwrap();
}

fn row(db: &Path, path: &str) -> Vec<Option<String>> {
    let conn = rusqlite::Connection::open(db).unwrap();
    conn.query_row(
        "select hash, deriver, cast(narSize as text), cast(ultimate as text), sigs, ca \
         from ValidPaths where path = ?",
        [path],
        |r| {
            Ok((0..6)
                .map(|i| r.get::<_, Option<String>>(i).unwrap())
                .collect())
        },
    )
    .unwrap()
}

#[test]
fn same_paths_rows_and_nix_reads_our_store() {
    if !have_nix() {
        return;
    }
    let mut env = Env::new();
    let work = tempfile::tempdir().unwrap();
    make_source(work.path());

    // Pure Nix in its own throw-away store.
    let nix_store = work.path().join("nix-store");
    let nix_var = work.path().join("nix-var");
    std::fs::create_dir_all(&nix_store).unwrap();
    std::fs::create_dir_all(&nix_var).unwrap();
    let out = in_nix(
        work.path(),
        &nix_store,
        &nix_var,
        &format!(
            "nix-store --add '{src}'; nix-store --add-fixed sha1 '{blob}'; \
             nix-instantiate --eval --read-write-mode -E 'builtins.toFile \"hello.txt\" \"hello world\"'",
            src = work.path().join("src").display(),
            blob = work.path().join("blob").display()
        ),
    );
    let nix_paths: Vec<String> = out
        .lines()
        .map(|l| l.trim_matches('"').to_string())
        .collect();
    assert_eq!(nix_paths.len(), 3, "{out}");

    // The store-writer, fed the same data as a broker would.
    let mut b = env.connect(false);
    let mut nar = Vec::new();
    stockade_common::nar::dump(&work.path().join("src"), &mut nar).unwrap();
    let add = |b: &mut Broker, name: &str, method, algo, data: Vec<u8>| -> PathInfo {
        match b.call(
            Req::AddToStore {
                name: name.into(),
                method,
                algo,
                references: vec![],
                repair: false,
            },
            Some(data),
        ) {
            Ok(i) => i,
            other => panic!("{other:?}"),
        }
    };
    let ours = [
        add(
            &mut b,
            "src",
            ContentAddressMethod::Fixed(FileIngestion::Recursive),
            HashAlgo::Sha256,
            nar,
        ),
        add(
            &mut b,
            "blob",
            ContentAddressMethod::Fixed(FileIngestion::Flat),
            HashAlgo::Sha1,
            std::fs::read(work.path().join("blob")).unwrap(),
        ),
        add(
            &mut b,
            "hello.txt",
            ContentAddressMethod::Text,
            HashAlgo::Sha256,
            b"hello world".to_vec(),
        ),
    ];
    let sd = env.sd();
    for (info, theirs) in ours.iter().zip(&nix_paths) {
        let full = sd.display(&info.path);
        assert_eq!(&full, theirs);
        // Identical rows: same hash rendering, NULLs in the same columns, same ca.
        assert_eq!(
            row(&env.state().join("db/db.sqlite"), &full),
            row(&nix_var.join("nix/db/db.sqlite"), &full),
            "{full}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(env.state().join("db/schema")).unwrap(),
        std::fs::read_to_string(nix_var.join("nix/db/schema")).unwrap()
    );

    // More kinds of registration: a signed input-addressed path with references, a batch.
    let mut t = env.connect(true);
    let dep = &ours[2].path;
    let nar_a = tree_nar("signed");
    let mut a = info_for(&sd, "signed-pkg", &nar_a, std::slice::from_ref(dep));
    a.deriver = Some(
        "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-signed-pkg.drv"
            .parse()
            .unwrap(),
    );
    a.sign(&sd, &env.key).unwrap();
    assert_eq!(
        b.call(
            Req::AddNar {
                info: Box::new(a.clone()),
                repair: false,
                dont_check_sigs: false,
                batch: None
            },
            Some(nar_a)
        ),
        Ok(())
    );
    let nar_c = tree_nar("batched");
    let c = info_for(
        &sd,
        "batched",
        &nar_c,
        &[a.path.clone(), ours[0].path.clone()],
    );
    let r = t.call(
        Req::AddNar {
            info: Box::new(c.clone()),
            repair: false,
            dont_check_sigs: true,
            batch: Some(5),
        },
        Some(nar_c),
    );
    assert_eq!(r, Ok(()));
    assert_eq!(t.call(Req::CommitBatch { batch: 5 }, None), Ok(()));

    // Now real Nix, without a daemon, on the store the store-writer wrote.
    let mut all: Vec<PathInfo> = ours.to_vec();
    all.push(env.store.db().query_path_info(&a.path).unwrap().unwrap());
    all.push(env.store.db().query_path_info(&c.path).unwrap().unwrap());
    let mut script = String::from("nix-store --verify --check-contents; echo verified; ");
    for i in &all {
        let p = sd.display(&i.path);
        script.push_str(&format!(
            "echo \"hash $(nix-store -q --hash {p})\"; echo \"size $(nix-store -q --size {p})\"; \
             echo \"refs $(nix-store -q --references {p} | sort | tr '\\n' ' ')\"; \
             echo \"deriver $(nix-store -q --deriver {p})\"; "
        ));
    }
    let paths: Vec<String> = all.iter().map(|i| sd.display(&i.path)).collect();
    script.push_str(&format!(
        "nix-store --check-validity {}; echo valid",
        paths.join(" ")
    ));
    let out = in_nix(
        work.path(),
        &env.real_store(),
        &env.dir.path().join("var"),
        &script,
    );
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("verified"), "{out}");
    for i in &all {
        assert_eq!(
            lines.next().unwrap(),
            format!("hash {}", i.nar_hash.to_typed(Encoding::Base32))
        );
        assert_eq!(lines.next().unwrap(), format!("size {}", i.nar_size));
        let refs: BTreeSet<String> = i.references.iter().map(|r| sd.display(r)).collect();
        let mut want = String::from("refs ");
        for r in &refs {
            want.push_str(r);
            want.push(' ');
        }
        assert_eq!(lines.next().unwrap().trim_end(), want.trim_end());
        let deriver = i
            .deriver
            .as_ref()
            .map_or("unknown-deriver".to_string(), |d| sd.display(d));
        assert_eq!(lines.next().unwrap(), format!("deriver {deriver}"));
    }
    assert_eq!(lines.next(), Some("valid"), "{out}");

    // And the reverse: a path real Nix adds to our store is read back by the store-writer.
    let extra = work.path().join("extra");
    std::fs::write(&extra, b"added by nix").unwrap();
    let out = in_nix(
        work.path(),
        &env.real_store(),
        &env.dir.path().join("var"),
        &format!("nix-store --add '{}'", extra.display()),
    );
    let p: StorePath = sd.parse(out.trim()).unwrap();
    match b.call(Req::QueryPathInfo { path: p.clone() }, None) {
        Ok(Some(i)) => {
            assert_eq!(i.nar_hash, sha256(&file_nar(b"added by nix", false)));
            assert!(i.ca.is_some());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.call(Req::IsValidPath { path: p }, None), Ok(true));
}
