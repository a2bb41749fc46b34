//! What a builder sees and may do inside Stockade's sandbox, through a real `nix-build`: the
//! builder writes a report into its output and the test reads it. Each defence here is also
//! probed below the daemon, with a test-only switch showing the probe can fail
//! (builder-helper/tests/sandbox_probes.rs, scripts/defences.txt); this test shows the daemon
//! builds with all of them on. Needs root; fails loudly in CI without it.

use std::fs;
use std::os::linux::net::SocketAddrExt;

use stockade_tests::{skip_unless_root, Daemon, DaemonKind};

/// The probe: one line per check, into `$out`.
const PROBE: &str = r#"
exec > $out 2>&1
grep -E '^(CapEff|CapPrm|CapBnd|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status
echo "ifaces: $(awk -F: 'NR>2 { gsub(/ /, "", $1); print $1 }' /proc/net/dev | tr '\n' ' ')"
echo "store: $(ls /nix/store | sed -e 's/^[a-z0-9]*-//' | sort | tr '\n' ' ')"
touch $BB/new 2>/dev/null && echo "input: writable" || echo "input: read-only"
mknod /build/null c 1 3 2>/dev/null && echo "mknod: ok" || echo "mknod: refused"
echo x > /build/f; chmod 4755 /build/f 2>/dev/null && echo "setuid: ok" || echo "setuid: refused"
unshare -U true 2>/dev/null && echo "userns: ok" || echo "userns: refused"
echo "host: $(hostname) domain: $(cat /proc/sys/kernel/domainname)"
echo "uid: $(id -u) gid: $(id -g)"
echo planted > /nix/store/planted 2>/dev/null; echo "planted"
echo "home: $HOME tmp: $TMPDIR top: $NIX_BUILD_TOP pwd: $(pwd)"
"#;

fn expr(bb: &str, name: &str) -> String {
    format!(
        "let bb = builtins.storePath \"{bb}\"; in derivation {{ name = \"{name}\"; \
         system = builtins.currentSystem; builder = \"${{bb}}/bin/sh\"; \
         PATH = \"${{bb}}/bin\"; BB = bb; args = [ \"-c\" {probe} ]; }}",
        probe = stockade_tests::nix_string(PROBE),
    )
}

fn report(d: &Daemon) -> String {
    let bb = d.add_busybox();
    let out = d.build_ok(&expr(&bb, "probe"));
    fs::read_to_string(d.host_path(&out)).expect("the report")
}

#[test]

fn a_builder_is_confined() {
    skip_unless_root!();
    let d = Daemon::builder(DaemonKind::Stockade)
        .conf_line("sandbox = true")
        .conf_line("build-users-group = nixbld")
        .start()
        .expect("stockade");
    let r = report(&d);
    eprintln!("the builder reported:\n{r}");
    for line in [
        "CapEff:\t0000000000000000",
        "CapPrm:\t0000000000000000",
        "CapBnd:\t0000000000000000",
        "CapAmb:\t0000000000000000",
        "NoNewPrivs:\t1",
        "Seccomp:\t2",
        "ifaces: lo \n",
        "store: busybox probe \n",
        "input: read-only",
        "mknod: refused",
        "setuid: refused",
        "userns: refused",
        "host: localhost domain: (none)",
        "uid: 1000 gid: 100",
        "home: /homeless-shelter tmp: /build top: /build pwd: /build",
    ] {
        assert!(r.contains(line), "{line:?} missing from the report:\n{r}");
    }
    // What the builder planted in its view of the store stayed there.
    assert!(!d.host_path("/nix/store/planted").exists());
    let listed = d.run_ok(["sh", "-c", "ls /nix/store | grep -c planted || true"]);
    assert_eq!(listed, "0");
}

/// CVE-2026-39860's shape: a fixed-output builder plants a symlink to a host file at its
/// output path, with the hash of that file's contents. Following the link would copy the
/// host's file into the store under a valid hash; the daemon must hash the link itself (flat:
/// not a regular file) and take nothing from outside the sandbox.
#[test]
fn a_planted_symlink_output_takes_nothing_from_the_host() {
    skip_unless_root!();
    let d = Daemon::builder(DaemonKind::Stockade)
        .conf_line("sandbox = true")
        .conf_line("build-users-group = nixbld")
        .start()
        .expect("stockade");
    let bb = d.add_busybox();
    let secret = d.write_work_file("secret.txt", b"host secret\n");
    let hash = d.run_ok([
        "nix-hash",
        "--type",
        "sha256",
        "--flat",
        secret.to_str().unwrap(),
    ]);
    for mode in ["flat", "recursive"] {
        let expr = format!(
            "let bb = builtins.storePath \"{bb}\"; in derivation {{ name = \"planted-{mode}\"; \
             system = builtins.currentSystem; builder = \"${{bb}}/bin/sh\"; \
             PATH = \"${{bb}}/bin\"; args = [ \"-c\" \"ln -s {secret} $out\" ]; \
             outputHashMode = \"{mode}\"; outputHashAlgo = \"sha256\"; outputHash = \"{hash}\"; }}",
            secret = secret.display()
        );
        let out = d
            .cmd("nix-build")
            .args(["--no-out-link", "-E", &expr])
            .fails();
        let err = out.stderr_str();
        assert!(
            err.contains("hash mismatch")
                || err.contains("should be a non-executable regular file"),
            "{mode}: {err}"
        );
    }
    // Nothing in the store holds the host file's contents.
    let leaked = d.run_ok([
        "sh",
        "-c",
        "grep -rl 'host secret' /nix/store 2>/dev/null | grep -v secret.txt || true",
    ]);
    assert_eq!(leaked, "", "the host's file reached the store");
}

/// A fixed-output builder shares the host's network namespace, yet cannot reach an abstract
/// unix socket bound on the host (Landlock's scoping): the static probe of
/// builder-helper/tests/probe/probe.c, run through nix-build, is refused and the host's
/// listener sees no connection.
#[test]
fn a_fixed_output_builder_cannot_reach_a_host_abstract_socket() {
    skip_unless_root!();
    let d = Daemon::builder(DaemonKind::Stockade)
        .conf_line("sandbox = true")
        .conf_line("build-users-group = nixbld")
        .start()
        .expect("stockade");
    let bb = d.add_busybox();
    let probe = d.add_static_probe();

    let name = format!("stockade-e2e-{}", std::process::id());
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let listener = std::os::unix::net::UnixListener::bind_addr(&addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    let script = format!("$PROBE/bin/probe connect-abstract {name}; echo > $out");
    let expr = format!(
        "let bb = builtins.storePath \"{bb}\"; in derivation {{ name = \"reach\"; \
         system = builtins.currentSystem; builder = \"${{bb}}/bin/sh\"; \
         PATH = \"${{bb}}/bin\"; PROBE = builtins.storePath \"{probe}\"; \
         args = [ \"-c\" {} ]; outputHashMode = \"flat\"; outputHashAlgo = \"sha256\"; \
         outputHash = \"0000000000000000000000000000000000000000000000000000\"; }}",
        stockade_tests::nix_string(&script)
    );
    // The hash is wrong on purpose: only the probe's line in the log matters.
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .fails();
    let err = out.stderr_str();
    assert!(
        err.contains("refused") && !err.lines().any(|l| l.trim() == "done"),
        "{err}"
    );
    assert!(
        listener.accept().is_err(),
        "the host's listener got a connection from the builder"
    );
}

/// V18/A48: `builtin:fetchurl` runs in the sandbox as the build user, never in a privileged
/// process: a `file://` URL naming a host file outside the input closure finds nothing, even
/// with that file's right hash (unsandboxed, it would be copied into the store).
#[test]
fn builtin_fetchurl_runs_in_the_sandbox() {
    skip_unless_root!();
    let d = Daemon::builder(DaemonKind::Stockade)
        .conf_line("sandbox = true")
        .start()
        .expect("stockade");
    let secret = d.write_work_file("host-secret.txt", b"a host file\n");
    let hash = d.run_ok([
        "nix-hash",
        "--type",
        "sha256",
        "--flat",
        secret.to_str().unwrap(),
    ]);
    let expr = format!(
        "import <nix/fetchurl.nix> {{ url = \"file://{}\"; sha256 = \"{hash}\"; }}",
        secret.display()
    );
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .fails();
    let err = out.stderr_str();
    assert!(err.contains("unable to download"), "{err}");
    let leaked = d.run_ok([
        "sh",
        "-c",
        "grep -rl 'a host file' /nix/store 2>/dev/null || true",
    ]);
    assert_eq!(leaked, "", "the host's file reached the store");
}
