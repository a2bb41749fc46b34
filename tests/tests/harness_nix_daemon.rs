//! Self-tests of the harness against the real nix-daemon: if these pass, a failure in a
//! Stockade test is about Stockade, not about the harness.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stockade_tests::{
    busybox_derivation, ensure_user, host_nix_fingerprint, process_alive, skip_unless_root, Daemon,
    DaemonKind, HarnessError, Layout,
};

fn is_store_path(p: &str, store: &str) -> bool {
    p.strip_prefix(store)
        .and_then(|r| r.strip_prefix('/'))
        .is_some_and(|name| name.len() > 33 && name.as_bytes().get(32) == Some(&b'-'))
}

#[test]
fn add_and_read_back_as_root() {
    skip_unless_root!();
    let d = Daemon::start_nix().expect("start nix-daemon");
    let contents = b"hello from the harness\n";
    let file = d.write_work_file("hello.txt", contents);
    let path = d.run_ok(["nix-store", "--add", file.to_str().unwrap()]);
    assert!(is_store_path(&path, "/nix/store"), "{path}");
    assert!(path.ends_with("-hello.txt"), "{path}");

    // The daemon wrote into the throw-away store, not into the host's.
    let host_copy = d.host_path(&path);
    assert_eq!(fs::read(&host_copy).unwrap(), contents);
    assert!(
        !Path::new(&path).exists(),
        "{path} leaked into the host /nix"
    );
    // Clients see the store at the logical path.
    let listing = d.run_ok(["ls", "/nix/store"]);
    assert!(listing.lines().any(|l| path.ends_with(l)), "{listing}");

    // Read back three ways: the NAR, its hash, and the file contents.
    let dumped = d.cmd("nix-store").args(["--dump", &path]).output();
    assert!(dumped.success(), "{dumped}");
    let expected = d.cmd("nix-store").arg("--dump").arg(&file).output();
    assert_eq!(dumped.stdout, expected.stdout);
    assert!(dumped.stdout.windows(contents.len()).any(|w| w == contents));

    let hash = d.run_ok(["nix-store", "-q", "--hash", &path]);
    let expected_hash = d.run_ok([
        "nix-hash",
        "--type",
        "sha256",
        "--base32",
        file.to_str().unwrap(),
    ]);
    assert_eq!(hash, format!("sha256:{expected_hash}"));

    let cat = d.run_ok([
        "nix",
        "--extra-experimental-features",
        "nix-command",
        "store",
        "cat",
        &path,
    ]);
    assert_eq!(format!("{cat}\n").as_bytes(), contents);

    // The daemon really served this client, as trusted root.
    assert!(
        d.log().contains("user root (trusted)"),
        "daemon log:\n{}",
        d.log()
    );
    // A path that was never added is not valid.
    let fake = format!("{}/{}-hello.txt", d.store_dir(), "0".repeat(32));
    d.cmd("nix-store").args(["--check-validity", &fake]).fails();
}

#[test]
fn build_with_busybox() {
    skip_unless_root!();
    let d = Daemon::start_nix().expect("start nix-daemon");
    let bb = d.add_busybox();
    assert!(
        is_store_path(&bb, "/nix/store") && bb.ends_with("-busybox"),
        "{bb}"
    );
    assert!(d.host_path(&bb).join("bin/busybox").is_file());

    // The brief's literal expression.
    let expr = format!(
        "derivation {{ name = \"x\"; system = builtins.currentSystem; \
         builder = \"${{builtins.storePath \"{bb}\"}}/bin/sh\"; args = [\"-c\" \"echo hi > $out\"]; }}"
    );
    let out = d.build_ok(&expr);
    assert!(
        is_store_path(&out, "/nix/store") && out.ends_with("-x"),
        "{out}"
    );
    assert_eq!(fs::read_to_string(d.host_path(&out)).unwrap(), "hi\n");
    // Output canonicalised by the daemon: read-only, mtime 1.
    let meta = fs::metadata(d.host_path(&out)).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o444);
    assert_eq!(meta.mtime(), 1);

    // The helper's derivation, with applets, references to its input, and a directory output.
    let expr = busybox_derivation(
        &bb,
        "tree",
        "busybox mkdir -p $out/sub && echo \"${x:-quoted}\" > $out/sub/f && busybox ln -s $PATH/sh $out/sh",
    );
    let out2 = d.build_ok(&expr);
    assert_eq!(
        fs::read_to_string(d.host_path(&out2).join("sub/f")).unwrap(),
        "quoted\n"
    );
    let refs = d.run_ok(["nix-store", "-q", "--references", &out2]);
    assert_eq!(
        refs, bb,
        "the output refers to busybox through the sh symlink"
    );
    // Building again is a no-op that returns the same path.
    assert_eq!(d.build_ok(&expr), out2);
}

#[test]
fn client_as_unprivileged_user() {
    skip_unless_root!();
    let alice = ensure_user("st-alice").expect("create st-alice");
    assert_ne!(alice.uid, 0);
    assert_eq!(
        ensure_user("st-alice").unwrap(),
        alice,
        "ensure_user is idempotent"
    );
    assert!(ensure_user("alice").is_err(), "only st-* names");

    let d = Daemon::start_nix().expect("start nix-daemon");
    assert_eq!(d.run_as_ok(&alice, ["id", "-un"]), "st-alice");
    let groups = d.run_as_ok(&alice, ["id", "-G"]);
    assert!(
        !groups.split(' ').any(|g| g == "0"),
        "root's groups leaked: {groups}"
    );
    // Its HOME and empty user config are its own.
    let home = d.run_as_ok(
        &alice,
        [
            "sh",
            "-c",
            "echo $HOME; echo $XDG_CONFIG_HOME; stat -c %U $HOME",
        ],
    );
    let lines: Vec<&str> = home.lines().collect();
    assert!(lines[0].ends_with("/home/st-alice"), "{home}");
    assert_eq!(lines[2], "st-alice");

    let file = d.write_work_file("alice.txt", b"added by alice\n");
    let path = d.run_as_ok(&alice, ["nix-store", "--add", file.to_str().unwrap()]);
    assert!(is_store_path(&path, "/nix/store"), "{path}");
    // Root sees the same path through its own connection.
    d.run_ok(["nix-store", "--check-validity", &path]);
    assert!(
        d.log().contains("user st-alice"),
        "the daemon saw the client's real uid:\n{}",
        d.log()
    );
    assert!(!d.log().contains("user st-alice (trusted)"));
}

#[test]
fn two_daemons_do_not_interfere() {
    skip_unless_root!();
    let a = Daemon::start_nix().expect("start A");
    let b = Daemon::start_nix().expect("start B");
    assert_ne!(a.base_dir(), b.base_dir());
    let fa = a.write_work_file("same-name", b"content A\n");
    let fb = b.write_work_file("same-name", b"content B\n");
    let pa = a.run_ok(["nix-store", "--add", fa.to_str().unwrap()]);
    let pb = b.run_ok(["nix-store", "--add", fb.to_str().unwrap()]);
    assert_ne!(pa, pb);
    a.run_ok(["nix-store", "--check-validity", &pa]);
    b.run_ok(["nix-store", "--check-validity", &pb]);
    a.cmd("nix-store").args(["--check-validity", &pb]).fails();
    b.cmd("nix-store").args(["--check-validity", &pa]).fails();
    assert!(!b.host_path(&pa).exists() && !a.host_path(&pb).exists());
}

#[test]
fn daemons_in_parallel_threads() {
    skip_unless_root!();
    // A daemon dies with the thread that started it, so each thread owns its own.
    let results: Vec<(Vec<String>, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                s.spawn(move || {
                    let d = Daemon::start_nix().expect("start");
                    let mut mine = Vec::new();
                    for i in 0..10 {
                        let f = d.write_work_file(
                            &format!("f{i}"),
                            format!("thread {t} file {i}\n").as_bytes(),
                        );
                        mine.push(d.run_ok(["nix-store", "--add", f.to_str().unwrap()]));
                    }
                    let listing = d.run_ok(["ls", "/nix/store"]);
                    let seen = listing
                        .lines()
                        .filter(|l| !l.starts_with('.'))
                        .map(|l| format!("/nix/store/{l}"))
                        .collect();
                    (mine, seen)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (mine, seen) in &results {
        let mut mine = mine.clone();
        let mut seen = seen.clone();
        mine.sort();
        seen.sort();
        assert_eq!(mine, seen, "each store holds exactly its own paths");
    }
    assert!(results[0].0.iter().all(|p| !results[1].0.contains(p)));
}

#[test]
fn daemon_death_is_reported_with_its_output() {
    skip_unless_root!();
    let r = Daemon::builder(DaemonKind::Custom {
        name: "dying-daemon".into(),
        program: "/bin/sh".into(),
        args: vec!["-c".into(), "echo boom-from-daemon >&2; exit 3".into()],
    })
    .start();
    match r {
        Err(HarnessError::DaemonDied { status, log, .. }) => {
            assert!(status.contains('3'), "{status}");
            assert!(log.contains("boom-from-daemon"), "{log}");
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a daemon that exits cannot have started"),
    }
}

#[test]
fn start_deadline_is_enforced() {
    skip_unless_root!();
    let r = Daemon::builder(DaemonKind::Custom {
        name: "silent-daemon".into(),
        program: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            "echo never-listening >&2; exec tail -f /dev/null".into(),
        ],
    })
    .start_timeout(Duration::from_millis(300))
    .start();
    match r {
        Err(HarnessError::StartTimeout { log, .. }) => {
            assert!(log.contains("never-listening"), "{log}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a daemon without a socket cannot have started"),
    }
}

#[test]
fn command_timeout_kills_the_client() {
    skip_unless_root!();
    let d = Daemon::start_nix().expect("start");
    let r = d
        .cmd("sh")
        .args(["-c", "echo started; exec tail -f /dev/null"])
        .timeout(Duration::from_millis(200))
        .run();
    match r {
        Err(HarnessError::CommandTimeout { stdout, .. }) => assert_eq!(stdout, "started\n"),
        other => panic!("expected a timeout, got {other:?}"),
    }
}

/// Records the pids of an instance, including a stray process left in its namespace.
fn pids_of(d: &Daemon) -> Vec<i32> {
    let stray: i32 = d
        .run_ok(["sh", "-c", "tail -f /dev/null >/dev/null 2>&1 & echo $!"])
        .parse()
        .unwrap();
    assert!(process_alive(stray));
    vec![d.pid(), d.holder_pid().unwrap(), stray]
}

#[test]
fn drop_kills_everything_and_cleans_up() {
    skip_unless_root!();
    let d = Daemon::start_nix().expect("start");
    let pids = pids_of(&d);
    let base = d.base_dir().to_path_buf();
    assert!(pids.iter().all(|p| process_alive(*p)));
    drop(d);
    for p in &pids {
        assert!(!process_alive(*p), "pid {p} survived the drop");
    }
    assert!(!base.exists(), "{} was not removed", base.display());
}

#[test]
fn a_panicking_test_leaves_nothing_running() {
    skip_unless_root!();
    let seen: Arc<Mutex<(Vec<i32>, Option<std::path::PathBuf>)>> = Arc::default();
    let s2 = seen.clone();
    let r = std::panic::catch_unwind(move || {
        let d = Daemon::start_nix().expect("start");
        *s2.lock().unwrap() = (pids_of(&d), Some(d.base_dir().to_path_buf()));
        panic!("deliberate panic with a daemon running");
    });
    assert!(r.is_err());
    let (pids, base) = seen.lock().unwrap().clone();
    assert_eq!(pids.len(), 3);
    for p in &pids {
        assert!(!process_alive(*p), "pid {p} survived the panic");
    }
    assert!(!base.unwrap().exists());
}

#[test]
fn redirected_layout_with_an_unprivileged_daemon() {
    skip_unless_root!();
    let bob = ensure_user("st-bob").expect("create st-bob");
    let d = Daemon::builder(DaemonKind::Nix)
        .layout(Layout::Redirected)
        .run_as(&bob)
        .start()
        .expect("start nix-daemon as st-bob");
    let store = d.store_dir();
    assert!(store.starts_with(d.base_dir().to_str().unwrap()), "{store}");
    let f = d.write_work_file("bob.txt", b"bob's file\n");
    let p = d.run_as_ok(&bob, ["nix-store", "--add", f.to_str().unwrap()]);
    assert!(is_store_path(&p, &store), "{p}");
    let meta = fs::metadata(&p).unwrap();
    assert_eq!(
        meta.uid(),
        bob.uid,
        "the unprivileged daemon owns the store"
    );
    // The real /nix is hidden behind an empty read-only tmpfs in this layout.
    let o = d.cmd("ls").arg("/nix").output();
    assert!(o.success() && o.stdout.is_empty(), "{o}");
}

#[test]
fn stockade_binary_runs_or_says_why() {
    skip_unless_root!();
    // Until the daemon exists, `stockade daemon` exits at once; the harness must report that
    // with the program's own words. Once it serves clients, this adds a file through it.
    match Daemon::builder(DaemonKind::Stockade).start() {
        Ok(d) => {
            let f = d.write_work_file("s.txt", b"via stockade\n");
            let p = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
            assert!(is_store_path(&p, "/nix/store"), "{p}");
        }
        Err(HarnessError::DaemonDied { log, .. }) => {
            assert!(
                log.contains("stockade"),
                "the daemon's stderr is in the error: {log}"
            )
        }
        Err(HarnessError::NoDaemonBinary { reason, .. }) => {
            // Only acceptable outside CI: scripts/test.sh builds the binary first.
            assert!(
                std::env::var_os("CI").is_none(),
                "stockade binary not built: {reason}"
            );
            eprintln!("SKIPPED stockade_binary_runs_or_says_why: {reason}");
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn host_nix_untouched_by_a_session() {
    skip_unless_root!();
    let before = host_nix_fingerprint().unwrap();
    {
        let d = Daemon::start_nix().expect("start");
        let alice = ensure_user("st-alice").unwrap();
        let bb = d.add_busybox();
        d.build_ok(&busybox_derivation(&bb, "touch", "echo $out > $out"));
        let f = d.write_work_file("t", b"t\n");
        d.run_as_ok(&alice, ["nix-store", "--add", f.to_str().unwrap()]);
        d.run_ok(["nix-store", "--gc"]);
    }
    let after = host_nix_fingerprint().unwrap();
    assert_eq!(before, after, "the host's /nix changed");
}

/// The half of `harness_run_by_an_ordinary_user` that runs as st-bob.
fn as_ordinary_user() {
    assert!(!nix::unistd::Uid::effective().is_root());
    let d = Daemon::builder(DaemonKind::Nix)
        .layout(Layout::Redirected)
        .start()
        .expect("start nix-daemon without root");
    assert_eq!(d.holder_pid(), None, "no namespace without root");
    let f = d.write_work_file("x.txt", b"x\n");
    let p = d.run_ok(["nix-store", "--add", f.to_str().unwrap()]);
    assert!(is_store_path(&p, &d.store_dir()), "{p}");
    let stray: i32 = d
        .run_ok(["sh", "-c", "tail -f /dev/null >/dev/null 2>&1 & echo $!"])
        .parse()
        .unwrap();
    let pids = [d.pid(), stray];
    let base = d.base_dir().to_path_buf();
    drop(d);
    for p in pids {
        assert!(!process_alive(p), "pid {p} survived the drop");
    }
    assert!(!base.exists());
    println!("ORDINARY-USER-OK");
}

#[test]
fn harness_run_by_an_ordinary_user() {
    if std::env::var_os("STOCKADE_TEST_AS_ORDINARY_USER").is_some() {
        return as_ordinary_user();
    }
    skip_unless_root!();
    // Run this very test binary again as st-bob, from a copy it can read.
    let bob = ensure_user("st-bob").expect("create st-bob");
    let dir = tempfile::Builder::new()
        .prefix("stockade-ordinary-")
        .tempdir()
        .unwrap();
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let exe = dir.path().join("test-binary");
    // Copied by `cp`, not by us: a writable fd on the file in this process could leak into a
    // child that another test thread is forking, and exec would then fail with ETXTBSY.
    let cp = std::process::Command::new("cp")
        .arg(std::env::current_exe().unwrap())
        .arg(&exe)
        .status()
        .unwrap();
    assert!(cp.success());
    let tmp = dir.path().join("tmp");
    fs::create_dir(&tmp).unwrap();
    std::os::unix::fs::chown(&tmp, Some(bob.uid), Some(bob.gid)).unwrap();
    let out = std::process::Command::new(&exe)
        .args(["--exact", "harness_run_by_an_ordinary_user", "--nocapture"])
        .env_clear()
        .env("PATH", stockade_tests::SYSTEM_PATH)
        .env("HOME", &tmp)
        .env("TMPDIR", &tmp)
        .env("STOCKADE_TEST_AS_ORDINARY_USER", "1")
        .uid(bob.uid)
        .gid(bob.gid)
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("ORDINARY-USER-OK"),
        "{text}"
    );
}

/// nix-daemon 2.26 and its clients: the instance's clients run 2.26 by default, 2.8 on request,
/// and both talk to it; a build goes through it as well.
#[test]
fn newer_nix_daemon_and_clients() {
    stockade_tests::skip_unless_newer_nix!();
    let d = Daemon::builder(DaemonKind::NixNewer)
        .newer_clients()
        .start()
        .expect("start nix-daemon 2.26");
    let version = |newer: bool| d.cmd("nix-store").arg("--version").newer_nix(newer).ok();
    let new = version(true);
    assert!(new.starts_with("nix-store (Nix) 2.26."), "{new}");
    assert!(version(false).starts_with("nix-store (Nix) 2.8."));
    let info = d
        .cmd("nix")
        .args([
            "--extra-experimental-features",
            "nix-command",
            "store",
            "info",
        ])
        .output();
    assert!(info.success(), "{info}");
    assert!(
        info.stderr_str().contains("Version: 2.26."),
        "the daemon is 2.26: {info}"
    );
    let file = d.write_work_file("hello.txt", b"hello, newer\n");
    let path = d.run_ok(["nix-store", "--add", file.to_str().unwrap()]);
    assert!(is_store_path(&path, "/nix/store"), "{path}");
    let old = d
        .cmd("nix-store")
        .args(["-q", "--hash", &path])
        .newer_nix(false)
        .ok();
    assert!(
        old.starts_with("sha256:"),
        "a 2.8 client reads it too: {old}"
    );
    let bb = d.add_busybox();
    let out = d.build_ok(&busybox_derivation(&bb, "newer", "echo built > $out"));
    assert_eq!(fs::read(d.host_path(&out)).unwrap(), b"built\n");
}
