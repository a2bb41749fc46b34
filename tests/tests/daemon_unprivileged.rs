//! Ordinary-user mode: Stockade started by a non-root user over a store named with
//! NIX_STORE_DIR / NIX_STATE_DIR / NIX_CONF_DIR in a temporary directory (`sandbox = false`).
//! It starts, says in one line what it cannot do, serves `nix-store --add`, queries and builds
//! for that user, and still confines its brokers (no_new_privs, seccomp).
//!
//! Needs root to create the user and the namespace; fails loudly in CI without it.

use std::os::unix::fs::MetadataExt;

use stockade_tests::sec::{db_descriptors, instance_processes, private_broker_uids};
use stockade_tests::{
    busybox_derivation, ensure_user, skip_unless_root, Daemon, DaemonKind, Layout,
};

#[test]
fn stockade_as_an_ordinary_user() {
    skip_unless_root!();
    let owner = ensure_user("st-owner").unwrap();
    let d = Daemon::builder(DaemonKind::Stockade)
        .layout(Layout::Redirected)
        .run_as(&owner)
        .stockade_conf(&private_broker_uids())
        .start()
        .expect("stockade as st-owner");
    let store = d.store_dir();
    assert!(store.starts_with(d.base_dir().to_str().unwrap()), "{store}");

    // One line saying what is unavailable, naming the uid.
    let log = d.log();
    let notices: Vec<&str> = log.lines().filter(|l| l.contains("not root")).collect();
    assert_eq!(
        notices.len(),
        1,
        "expected one line about running without root:\n{log}"
    );
    assert!(
        notices[0].contains(&format!("uid {}", owner.uid)),
        "{}",
        notices[0]
    );

    let f = d.write_work_file("owner.txt", b"the owner's file\n");
    let path = d.run_as_ok(&owner, ["nix-store", "--add", f.to_str().unwrap()]);
    assert!(path.starts_with(&format!("{store}/")), "{path}");
    // No cgroup for an ordinary user's brokers: rlimits hold their budget, said once however
    // many connections there were.
    d.run_as_ok(&owner, ["nix-store", "-q", "--hash", &path]);
    let log = d.log();
    let fallback =
        log.matches("brokers get no cgroup").count() + log.matches("broker cgroups: none").count();
    assert_eq!(
        fallback, 1,
        "expected one line about brokers' rlimits:\n{log}"
    );
    let on_disk = d.host_path(&path);
    let meta = std::fs::symlink_metadata(&on_disk).unwrap();
    assert_eq!(
        meta.uid(),
        owner.uid,
        "the store belongs to the daemon's user"
    );
    assert_eq!(meta.mode() & 0o7777, 0o444);
    assert_eq!(
        d.run_as_ok(
            &owner,
            ["nix-store", "--check-validity", "--print-invalid", &path]
        ),
        ""
    );
    let hash = d.run_as_ok(&owner, ["nix-store", "-q", "--hash", &path]);
    assert!(hash.starts_with("sha256:"), "{hash}");
    assert!(!d
        .run_as_ok(&owner, ["nix-store", "--dump", &path])
        .is_empty());
    let listed = d
        .cmd("nix")
        .args(["path-info", "--all"])
        .env("NIX_CONFIG", "experimental-features = nix-command")
        .as_user(&owner)
        .ok();
    assert_eq!(listed, path);

    // A directory added (moved into place although canonical directories are read-only and
    // the daemon has no CAP_DAC_OVERRIDE), then a build by the owner that uses it.
    let bb = d.add_busybox();
    let expr = busybox_derivation(&bb, "owned", "busybox mkdir $out; echo built > $out/f");
    let built = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .as_user(&owner)
        .ok();
    assert!(built.starts_with(&format!("{store}/")), "{built}");
    assert_eq!(
        std::fs::read_to_string(d.host_path(&built).join("f")).unwrap(),
        "built\n"
    );
    let meta = std::fs::symlink_metadata(d.host_path(&built)).unwrap();
    assert_eq!(
        meta.mode() & 0o7777,
        0o555,
        "canonical again after the move"
    );

    // `sandbox = false` (this harness's nix.conf), as Nix's own test suite runs its daemon:
    // the builder sees the host's files and runs as the daemon's user.
    let host_file = d.write_work_file("host-only.txt", b"from the host\n");
    let script = format!(
        "busybox cat {} > $out; busybox id -u >> $out",
        host_file.display()
    );
    let impure = d
        .cmd("nix-build")
        .args([
            "--no-out-link",
            "-E",
            &busybox_derivation(&bb, "impure", &script),
        ])
        .as_user(&owner)
        .ok();
    assert_eq!(
        std::fs::read_to_string(d.host_path(&impure)).unwrap(),
        format!("from the host\n{}\n", owner.uid)
    );

    // Its processes: all of the owner's uid, never root; brokers still locked down.
    let mut client = stockade_tests::raw::RawConn::connect_as(&d, &owner).expect("connect");
    client.handshake().expect("handshake");
    let procs = instance_processes(&d, "stockade");
    assert!(
        procs.iter().any(|p| p.exe == "stockade-broker"),
        "{procs:?}"
    );
    for p in &procs {
        assert!(
            p.uids.iter().all(|u| *u == owner.uid),
            "{} runs as {:?}",
            p.exe,
            p.uids
        );
        assert_eq!(p.cap_eff, 0, "{p:?}");
        if p.exe != "stockade" {
            assert_eq!(p.no_new_privs, Some(1), "{p:?}");
        }
        if p.exe == "stockade-broker" {
            assert_eq!(p.seccomp, Some(2), "{p:?}");
            // Same uid as the store-writer: SQLite would hold the WAL open read-write, so
            // the broker leaves the database to the store-writer.
            let fds = db_descriptors(p.pid);
            assert!(
                fds.is_empty(),
                "the broker holds nothing of the database: {fds:?}"
            );
        }
    }
}
