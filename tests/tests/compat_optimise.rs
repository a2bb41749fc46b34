//! `nix-store --optimise` / `nix store optimise` and `auto-optimise-store` through nix-daemon
//! and through Stockade, each over its own fresh /nix: the same output, the duplicates hard
//! linked (one inode), the contents intact (`nix-store --verify --check-contents`), and a
//! second run that links nothing. Against nix-daemon 2.8 with Nix 2.8's clients, and against
//! nix-daemon 2.26 with Nix 2.26's.
//!
//! Needs root (and the newer Nix for the 2.26 test); fails loudly in CI without them.

use stockade_tests::session::{compare, run_steps, step, Step, StepRun};
use stockade_tests::{
    busybox_derivation, ensure_user, skip_unless_newer_nix, skip_unless_root, Daemon, DaemonKind,
};

/// Three trees sharing most of their files (a file twice within one tree, an executable, a
/// symlink, an empty file), each with one file of its own, and two flat files with the same
/// contents.
fn prepare(d: &Daemon) {
    let shared = "shared contents\n".repeat(200);
    for i in 0..3 {
        d.write_work_file(&format!("d{i}/shared"), shared.as_bytes());
        d.write_work_file(&format!("d{i}/sub/deep/shared"), shared.as_bytes());
        d.write_work_file(&format!("d{i}/empty"), b"");
        d.write_work_file(&format!("d{i}/own"), format!("tree {i}\n").as_bytes());
        let exe = d.write_work_file(&format!("d{i}/bin/tool"), b"#!/bin/sh\necho tool\n");
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        // The same bytes as shared, but executable: another NAR, never linked to it.
        let exe = d.write_work_file(&format!("d{i}/bin/shared"), shared.as_bytes());
        std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        std::os::unix::fs::symlink("sub/deep/shared", d.work_dir().join(format!("d{i}/link")))
            .unwrap();
    }
    d.write_work_file("flat-1", b"flat and the same\n");
    d.write_work_file("flat-2", b"flat and the same\n");
}

/// How many inodes `rel` has across the three trees (`.` for the flat files).
fn inodes(rel: &str) -> Step {
    if rel == "." {
        return step("stat -c %i $(tail -2 $WORK/paths) | sort -u | wc -l");
    }
    step(format!(
        "for p in $(head -3 $WORK/paths); do stat -c %i $p/{rel}; done | sort -u | wc -l"
    ))
}

fn link_checks() -> Vec<Step> {
    let mut v: Vec<Step> = ["shared", "sub/deep/shared", "bin/tool", "link", "own", "."]
        .into_iter()
        .map(inodes)
        .collect();
    // One inode for shared and sub/deep/shared together; bin/shared apart.
    v.push(step(
        "P=$(head -1 $WORK/paths); stat -c %i $P/shared $P/sub/deep/shared $P/bin/shared | sort -u | wc -l",
    ));
    v
}

fn add_all() -> Step {
    step(
        "nix-store --add $WORK/d0 $WORK/d1 $WORK/d2 $WORK/flat-1 $WORK/flat-2 > $WORK/paths \
         && cat $WORK/paths",
    )
}

/// With `damage` (Nix 2.8's texts), the first run also meets a writable store file (skipped
/// with a warning) and a `.links` entry of the wrong size (removed with a warning, made anew).
fn optimise_steps(user: &stockade_tests::User, damage: bool) -> Vec<Step> {
    let mut v = vec![add_all()];
    v.extend(link_checks());
    v.push(step(if damage {
        "P=$(head -1 $WORK/paths); chmod u+w $(sed -n 3p $WORK/paths)/own \
         && echo garbage > /nix/store/.links/$(nix-hash --type sha256 --base32 $P/shared) \
         && nix-store --optimise"
    } else {
        "nix-store --optimise"
    }));
    v.extend(link_checks());
    v.push(step("ls /nix/store/.links | wc -l"));
    v.push(step("nix-store --verify --check-contents"));
    // Nothing left: each valid path named at -v, in order, and the inodes loaded.
    v.push(step("nix-store --optimise -v"));
    v.push(step("nix store optimise"));
    // Any user may ask (nix-daemon checks nothing).
    v.push(step("nix-store --optimise").as_user(user));
    // A new path with a duplicate is linked by the next run.
    v.push(step(
        "mkdir -p $WORK/d3 && cp -r $WORK/d0/shared $WORK/d0/sub $WORK/d3/ \
         && nix-store --add $WORK/d3 && nix-store --optimise",
    ));
    v.push(step("nix-store --verify --check-contents"));
    v
}

fn auto_steps() -> Vec<Step> {
    let mut v = vec![add_all()];
    // Linked as they were added.
    v.extend(link_checks());
    // A build output with the flat files' contents: linked to them as it is registered.
    v.push(step(
        "OUT=$(nix-build --no-out-link -E \"$EXPR\") && stat -c %i $OUT $(tail -2 $WORK/paths) \
         | sort -u | wc -l",
    ));
    v.push(step("nix-store --verify --check-contents"));
    v.push(step("nix-store --optimise"));
    v
}

fn run(reference: DaemonKind, newer: bool, conf: Option<&str>, steps: &[Step]) {
    let start = |kind: DaemonKind| {
        let name = kind.name();
        let b = Daemon::builder(kind);
        let b = if newer { b.newer_clients() } else { b };
        let b = match conf {
            Some(line) => b.conf_line(line),
            None => b,
        };
        b.start().unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let nix = start(reference);
    let stockade = start(DaemonKind::Stockade);
    let session = |d: &Daemon| -> Vec<StepRun> {
        prepare(d);
        let expr = match conf {
            Some(_) => {
                let bb = d.add_busybox();
                busybox_derivation(&bb, "flat-built", "echo 'flat and the same' > $out")
            }
            None => String::new(),
        };
        let env = [
            ("EXPR", expr),
            ("WORK", d.work_dir().display().to_string()),
            (
                "NIX_CONFIG",
                "experimental-features = nix-command".to_string(),
            ),
        ];
        run_steps(d, steps, &env)
    };
    let a = session(&nix);
    let b = session(&stockade);
    let norm = |d: &Daemon| {
        let base = d.base_dir().display().to_string();
        move |s: &str| s.replace(&base, "<base>")
    };
    if let Err(report) = compare(&a, &b, &norm(&nix), &norm(&stockade)) {
        panic!("{report}");
    }
    linked_as_expected(&a, conf.is_some(), !newer);
}

/// Besides being equal on both daemons: the files really were linked. Steps 1-7 count inodes
/// right after the adds (linked already when auto-optimised), 9-15 after `--optimise`.
fn linked_as_expected(a: &[StepRun], auto: bool, damage: bool) {
    let out = |i: usize| a[i].out.stdout_str().trim().to_string();
    let linked = ["1", "1", "1", "1", "3", "1", "2"];
    let unlinked = ["3", "3", "3", "3", "3", "2", "3"];
    let first = if auto { linked } else { unlinked };
    for (k, want) in first.iter().enumerate() {
        assert_eq!(out(1 + k), *want, "step {}: {}", 1 + k, a[1 + k].out);
    }
    if auto {
        assert_eq!(out(8), "1", "{}", a[8].out);
        return;
    }
    // 5 copies of shared, 2 each of empty, bin/tool, bin/shared and link, 1 flat file.
    let said = a[8].out.stderr_str();
    assert!(
        said.contains("freed by hard-linking 14 files"),
        "{}",
        a[8].out
    );
    if damage {
        assert!(
            said.contains("removing corrupted link '/nix/store/.links/"),
            "{said}"
        );
        assert!(
            said.contains("skipping suspicious writable file '/nix/store/"),
            "{said}"
        );
    }
    for (k, want) in linked.iter().enumerate() {
        assert_eq!(out(9 + k), *want, "step {}: {}", 9 + k, a[9 + k].out);
    }
}

#[test]
fn optimise_as_nix_daemon_nix_2_8() {
    skip_unless_root!();
    let user = ensure_user("st-opt").unwrap();
    run(DaemonKind::Nix, false, None, &optimise_steps(&user, true));
}

#[test]
fn auto_optimise_as_nix_daemon_nix_2_8() {
    skip_unless_root!();
    run(
        DaemonKind::Nix,
        false,
        Some("auto-optimise-store = true"),
        &auto_steps(),
    );
}

#[test]
fn optimise_as_nix_daemon_nix_2_26() {
    skip_unless_newer_nix!();
    let user = ensure_user("st-opt").unwrap();
    run(
        DaemonKind::NixNewer,
        true,
        None,
        &optimise_steps(&user, false),
    );
}

/// A Stockade run by an ordinary user (no capabilities, Landlock and seccomp still on): the
/// directories are read-only to their owner too, so each replacement makes its directory
/// writable for a moment and canonical again (0555, mtime 1) afterwards.
#[test]
fn optimise_in_a_daemon_run_by_an_ordinary_user() {
    skip_unless_root!();
    use std::os::unix::fs::MetadataExt;
    let owner = ensure_user("st-owner").unwrap();
    let d = Daemon::builder(DaemonKind::Stockade)
        .layout(stockade_tests::Layout::Redirected)
        .run_as(&owner)
        .stockade_conf(&stockade_tests::sec::private_broker_uids())
        .start()
        .expect("stockade as st-owner");
    prepare(&d);
    let dirs: Vec<String> = (0..3)
        .map(|i| d.work_dir().join(format!("d{i}")).display().to_string())
        .collect();
    let out = d.run_as_ok(&owner, ["nix-store", "--add", &dirs[0], &dirs[1], &dirs[2]]);
    let paths: Vec<std::path::PathBuf> = out.lines().map(|p| d.host_path(p)).collect();
    assert_eq!(paths.len(), 3, "{out}");
    let o = d
        .cmd("nix-store")
        .arg("--optimise")
        .as_user(&owner)
        .output();
    assert!(o.success(), "{o}");
    assert!(
        o.stderr_str().contains("freed by hard-linking 13 files"),
        "{o}"
    );
    let ino = |p: &std::path::Path| std::fs::symlink_metadata(p).unwrap().ino();
    for rel in ["shared", "sub/deep/shared", "bin/tool", "link", "empty"] {
        let first = ino(&paths[0].join(rel));
        assert!(paths.iter().all(|p| ino(&p.join(rel)) == first), "{rel}");
    }
    for p in &paths {
        for dir in [p.clone(), p.join("sub/deep"), p.join("bin")] {
            let md = std::fs::symlink_metadata(&dir).unwrap();
            assert_eq!(
                (md.mode() & 0o7777, md.mtime()),
                (0o555, 1),
                "{}",
                dir.display()
            );
        }
    }
    let v = d
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .as_user(&owner)
        .output();
    assert!(v.success() && !v.stderr_str().contains("modified"), "{v}");
}
