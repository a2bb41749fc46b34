//! SECURITY.md A50: where no user namespace can be made, nix-daemon 2.8 builds unsandboxed
//! (`sandbox-fallback`); Stockade refuses the build. The daemon runs under
//! `stockade-no-userns` (a seccomp filter its whole process tree inherits that fails
//! `clone`/`unshare` with `CLONE_NEWUSER`, as a kernel without user namespaces does). Needs
//! root; fails loudly in CI without it.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use stockade_tests::sec::private_broker_uids;
use stockade_tests::{
    busybox_derivation, skip_unless_root, stockade_bin, Daemon, DaemonBuilder, DaemonKind,
};

fn sandboxed(b: DaemonBuilder) -> DaemonBuilder {
    b.stockade_conf(&private_broker_uids())
        .conf_line("sandbox = true")
        .conf_line("sandbox-fallback = true")
        .conf_line("build-users-group = nixbld")
}

/// The builder leaves a mark in a directory every uid may write (the daemon's host view)
/// and makes its output.
fn marking_build(d: &Daemon, mark_dir: &std::path::Path, name: &str) -> String {
    let bb = d.add_busybox();
    let script = format!(
        "echo ran > {}/{name}; echo built > $out",
        mark_dir.display()
    );
    busybox_derivation(&bb, name, &script)
}

#[test]
fn a50_without_user_namespaces_the_build_is_refused() {
    skip_unless_root!();
    let no_userns = PathBuf::from(env!("CARGO_BIN_EXE_stockade-no-userns"));
    let stockade = stockade_bin().expect("stockade binary");
    let d = sandboxed(Daemon::builder(DaemonKind::Custom {
        name: "stockade".into(),
        program: no_userns,
        args: vec![stockade.display().to_string(), "daemon".into()],
    }))
    .start()
    .expect("stockade under stockade-no-userns");
    let mark_dir = d.work_dir().join("marks");
    std::fs::create_dir_all(&mark_dir).unwrap();
    std::fs::set_permissions(&mark_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let expr = marking_build(&d, &mark_dir, "a50-no-userns");
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .output();
    assert!(
        !out.success(),
        "the build succeeded without user namespaces: {out}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("while setting up the build environment"),
        "no clear error: {out}"
    );
    assert!(
        !mark_dir.join("a50-no-userns").exists(),
        "the builder ran (unsandboxed) although no sandbox could be made"
    );
    let drv = d.run_ok(["nix-instantiate", "-E", &expr]);
    let outputs = d.run_ok(["nix-store", "-q", "--outputs", &drv]);
    for o in outputs.lines() {
        assert_eq!(
            d.run_ok([
                "sh",
                "-c",
                "nix-store --check-validity \"$1\" 2>/dev/null && echo valid || echo invalid",
                "sh",
                o
            ]),
            "invalid",
            "{o} was registered"
        );
    }

    // The control: the same build, with user namespaces, runs in the sandbox.
    let d = sandboxed(Daemon::builder(DaemonKind::Stockade))
        .start()
        .expect("stockade");
    let mark_dir = d.work_dir().join("marks");
    std::fs::create_dir_all(&mark_dir).unwrap();
    std::fs::set_permissions(&mark_dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let out = d.build_ok(&marking_build(&d, &mark_dir, "a50-no-userns"));
    assert!(out.starts_with("/nix/store/"), "{out}");
    // Confined: the host directory was out of its reach.
    assert!(!mark_dir.join("a50-no-userns").exists());
}
