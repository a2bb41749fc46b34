//! The control run of `scripts/defences-off.sh`: against its shared build (every defence of
//! `scripts/defences.txt` off at once, except those marked `alone`), an untrusted user's
//! add and sandboxed build must still succeed. If a switch broke builds for everyone, each
//! build test listed there would fail for that reason alone and prove nothing about its own
//! defence. In the normal test run it is an ordinary (cheap) build test. Needs root; fails
//! loudly in CI without it.

use std::fs;

use stockade_tests::builddir::expr;
use stockade_tests::sec::stockade_with;
use stockade_tests::{ensure_user, skip_unless_root};

#[test]
fn an_untrusted_add_and_build_succeed() {
    skip_unless_root!();
    let d = stockade_with("")
        .conf_line("sandbox = true")
        .start()
        .expect("stockade");
    let mallory = ensure_user("st-mallory").expect("user st-mallory");
    let bb = d.add_busybox();

    let src = d.work_dir().join("control-src");
    fs::write(&src, b"defences-off control\n").unwrap();
    d.cmd("nix-store")
        .args(["--add", src.to_str().unwrap()])
        .as_user(&mallory)
        .ok();

    let e = expr(
        &bb,
        "defences-control",
        "mkdir $out && echo built > $out/result",
        "",
    );
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &e])
        .as_user(&mallory)
        .ok();
    let result = fs::read_to_string(d.host_path(&format!("{out}/result"))).unwrap();
    assert_eq!(result, "built\n");
}
