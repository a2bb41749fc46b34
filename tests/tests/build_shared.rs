//! Two clients asking for the same derivation at once get one build: the first build is held
//! open (its builder waits for a file the test creates) until the second client has asked,
//! then both get the output, and the audit shows one build and one wait. Needs root; fails
//! loudly in CI without it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{nix_string, skip_unless_root};

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn two_clients_one_build() {
    skip_unless_root!();
    let audit = AuditCollector::new();
    let gate = tempfile::Builder::new()
        .prefix("stockade-gate-")
        .tempdir()
        .expect("gate dir");
    fs::set_permissions(gate.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("sandbox = true")
        .conf_line("build-users-group = nixbld")
        .conf_line(&format!(
            "extra-sandbox-paths = /gate={}",
            gate.path().display()
        ))
        .start()
        .expect("stockade");
    let bb = d.add_busybox();
    let script = "while [ ! -e /gate/open ]; do sleep 0.02; done; echo built > $out";
    let expr = format!(
        "let bb = builtins.storePath \"{bb}\"; in derivation {{ name = \"shared\"; \
         system = builtins.currentSystem; builder = \"${{bb}}/bin/sh\"; \
         PATH = \"${{bb}}/bin\"; args = [ \"-c\" {} ]; }}",
        nix_string(script)
    );
    let drv = d.run_ok(["nix-instantiate", "-E", &expr]);
    let is = |event: &'static str| {
        let drv = drv.clone();
        move |l: &str| {
            let l = audit_line(l);
            l.contains(&format!(" {event} ")) && l.contains(&format!("drv={drv}"))
        }
    };
    let (a, b) = std::thread::scope(|s| {
        let first = s.spawn(|| d.cmd("nix-store").args(["--realise", &drv]).run());
        audit
            .wait_for(WAIT, is("build-start"))
            .expect("the first client's build started");
        let second = s.spawn(|| d.cmd("nix-store").args(["--realise", &drv]).run());
        audit
            .wait_for(WAIT, is("build-wait"))
            .expect("the second client waits for the first one's build");
        fs::write(gate.path().join("open"), b"").unwrap();
        (first.join().unwrap(), second.join().unwrap())
    });
    let (a, b) = (a.expect("first client"), b.expect("second client"));
    assert!(a.success() && b.success(), "{a}\n{b}");
    assert_eq!(a.stdout_str(), b.stdout_str());
    assert_eq!(
        fs::read_to_string(d.host_path(a.stdout_str().trim())).unwrap(),
        "built\n"
    );
    let starts = audit
        .lines()
        .iter()
        .filter(|l| is("build-start")(l))
        .count();
    assert_eq!(starts, 1, "one build, not two:\n{:#?}", audit.lines());
}
