//! Issue 20 / A28: collections in a loop while clients add paths and build. Each client roots
//! what it makes from the connection that made it (nix-instantiate --add-root, nix-build's
//! out-link), so everything a client was told exists must survive every collection: at the
//! end each root's closure is valid and its contents check. Each builder reads its input at
//! the end of its work and fails if it is gone, so a collection that deleted a build's input
//! mid-build fails the build.
//!
//! `STOCKADE_GC_STRESS_SCALE=<n>` multiplies the clients' work, for a run of minutes rather
//! than seconds.
//!
//! Needs root; fails loudly in CI without it.

use std::sync::atomic::{AtomicBool, Ordering};

use stockade_tests::{nix_string, skip_unless_root, Daemon, DaemonKind};

const ADDERS: usize = 3;
const ADDS: usize = 30;
const BUILDERS: usize = 2;
const BUILDS: usize = 8;

#[test]
fn collections_racing_adds_and_builds_lose_nothing() {
    skip_unless_root!();
    let d = Daemon::builder(DaemonKind::Stockade)
        .start()
        .expect("stockade");
    let roots = d.work_dir().join("roots");
    std::fs::create_dir_all(&roots).unwrap();
    let bb = d.add_busybox();
    let bb_root = roots.join("busybox").display().to_string();
    d.run_ok(["nix-store", "--add-root", &bb_root, "-r", &bb]);
    let scale: usize = std::env::var("STOCKADE_GC_STRESS_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let (adds, builds) = (ADDS * scale, BUILDS * scale);
    let stop = AtomicBool::new(false);
    let (collections, failures) = std::thread::scope(|s| {
        let gc = s.spawn(|| {
            let mut runs = 0usize;
            let mut failed = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let o = d
                    .cmd("nix-store")
                    .arg("--gc")
                    .run()
                    .expect("nix-store --gc");
                if !o.success() {
                    failed.push(o.to_string());
                }
                runs += 1;
            }
            (runs, failed)
        });
        let mut clients = Vec::new();
        for t in 0..ADDERS {
            let roots = &roots;
            let d = &d;
            clients.push(s.spawn(move || {
                let mut failed = Vec::new();
                for i in 0..adds {
                    let expr = format!(
                        "derivation {{ name = \"a-{t}-{i}\"; system = builtins.currentSystem; \
                         builder = \"/bin/sh\"; src = builtins.toFile \"s-{t}-{i}\" \"input {t} {i}\"; }}"
                    );
                    let link = roots.join(format!("a-{t}-{i}")).display().to_string();
                    let o = d
                        .cmd("nix-instantiate")
                        .args(["--add-root", &link, "-E", &expr])
                        .run()
                        .expect("nix-instantiate");
                    if !o.success() {
                        failed.push(o.to_string());
                    }
                }
                failed
            }));
        }
        for t in 0..BUILDERS {
            let (roots, d, bb) = (&roots, &d, &bb);
            clients.push(s.spawn(move || {
                let mut failed = Vec::new();
                for i in 0..builds {
                    // Busy for a while, then the input must still be there.
                    let script = "i=0; while [ $i -lt 3000 ]; do i=$((i+1)); done; \
                                  cat $src > $out || exit 1";
                    let expr = format!(
                        "derivation {{ name = \"b-{t}-{i}\"; system = builtins.currentSystem; \
                         builder = \"${{builtins.storePath {bb}}}/bin/sh\"; \
                         PATH = \"${{builtins.storePath {bb}}}/bin\"; \
                         src = builtins.toFile \"in-{t}-{i}\" \"build input {t} {i}\"; \
                         args = [ \"-c\" {script} ]; }}",
                        bb = nix_string(bb),
                        script = nix_string(script),
                    );
                    let link = roots.join(format!("b-{t}-{i}")).display().to_string();
                    let o = d
                        .cmd("nix-build")
                        .args(["--out-link", &link, "-E", &expr])
                        .run()
                        .expect("nix-build");
                    if !o.success() {
                        failed.push(o.to_string());
                    }
                }
                failed
            }));
        }
        let mut failures: Vec<String> = clients
            .into_iter()
            .flat_map(|c| c.join().expect("client thread"))
            .collect();
        stop.store(true, Ordering::SeqCst);
        let (runs, gc_failed) = gc.join().expect("gc thread");
        failures.extend(gc_failed);
        (runs, failures)
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(collections > 0);
    // Every root's closure is there, whole.
    let mut checked = 0;
    for e in std::fs::read_dir(&roots).unwrap() {
        let link = e.unwrap().path();
        let target = std::fs::read_link(&link).unwrap().display().to_string();
        let o = d
            .cmd("nix-store")
            .args(["-q", "--requisites", &target])
            .run()
            .unwrap();
        assert!(o.success(), "{}: {o}", link.display());
        for p in o.stdout_str().lines() {
            assert!(d.host_path(p).exists(), "{p} (closure of {target}) is gone");
        }
        checked += 1;
    }
    assert_eq!(checked, 1 + ADDERS * adds + BUILDERS * builds);
    let v = d
        .cmd("nix-store")
        .args(["--verify", "--check-contents"])
        .run()
        .unwrap();
    assert!(
        v.success() && v.stderr_str().lines().all(|l| !l.contains("error")),
        "{v}"
    );
    eprintln!("{collections} collections ran meanwhile");
}
