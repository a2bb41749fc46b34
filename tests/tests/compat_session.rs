//! The same scripted client session against the real nix-daemon and against Stockade, each in
//! its own namespace over a fresh /nix: every command must print the same thing.
//!
//! Needs root (namespaces, bind mounts); fails loudly in CI without it.

use stockade_tests::session::{compare, failing, known, prepare_files, run_steps, step, Step};
use stockade_tests::{skip_unless_root, Daemon, DaemonKind};

fn session() -> Vec<Step> {
    let w = "$WORK";
    vec![
        step(format!("nix-store --add {w}/tree")),
        step(format!("nix-store --add {w}/flat.txt")),
        step(format!("nix-store --add-fixed sha256 {w}/flat.txt")),
        step(format!("nix-store --add-fixed sha1 {w}/flat.txt")),
        step(format!("nix-store --add-fixed md5 {w}/flat.txt")),
        step(format!("nix-store --add-fixed --recursive sha512 {w}/tree")),
        step(format!("nix-store --add-fixed --recursive sha256 {w}/tree")),
        step(format!(
            "TREE=$(nix-store --add {w}/tree) nix-instantiate {w}/expr.nix"
        )),
        step("nix-store -q --hash $(nix-store --add $WORK/tree)"),
        step("nix-store -q --size $(nix-store --add $WORK/tree)"),
        step("nix-store -q --references $DRV"),
        step("nix-store -q --referrers $(nix-store --add $WORK/tree)"),
        step("nix-store -q --referrers-closure $(nix-store --add $WORK/tree)"),
        step("nix-store -q --requisites $DRV"),
        step("nix-store -q --tree $DRV"),
        step("nix-store -q --graph $DRV"),
        step("nix-store -q --outputs $DRV"),
        step("nix-store -q --deriver $(nix-store --add $WORK/tree)"),
        step("nix-store -q --binding name $DRV"),
        step("nix-store -q --hash $DRV"),
        step("nix-store --dump $(nix-store --add $WORK/tree) | sha256sum"),
        step("nix-store --dump $(nix-store --add $WORK/flat.txt) | sha256sum"),
        step("nix-store --export $(nix-store -q --requisites $DRV) > $WORK/export.nar && sha256sum < $WORK/export.nar"),
        step("nix-store --import < $WORK/export.nar"),
        step("nix-store --check-validity $DRV $(nix-store --add $WORK/tree)"),
        failing("nix-store --check-validity /nix/store/00000000000000000000000000000000-nope"),
        failing("nix-store -q --hash /nix/store/00000000000000000000000000000000-nope"),
        failing("nix-store -q --hash /etc/passwd"),
        step("nix-store --verify"),
        step("nix-store --verify --check-contents"),
        step("nix-store -r $(nix-store --add $WORK/tree)"),
        step("nix path-info --json -r $DRV | sed -e 's/\"registrationTime\":[0-9]*,//g'"),
        step("nix path-info -r --size --closure-size $(nix-store -q --references $DRV)"),
        step("nix store ls -lR $(nix-store --add $WORK/tree)"),
        step("nix store cat $(nix-store --add $WORK/tree)/a.txt"),
        step("nix store cat $(nix-store --add $WORK/tree)/sub/deeper/ä-unicode"),
        failing("nix store cat $(nix-store --add $WORK/tree)/nope"),
        known(
            "nix-store -q --roots $(nix-store --add $WORK/tree) | sed -e s,/proc/[0-9]*/,/proc/PID/, | sort",
            "runtime roots are whatever processes on the machine hold the path at that moment \
             (another test instance may hold the same one)",
        ),
        step("nix-store -q --roots $(nix-store --add $WORK/tree) | grep -v ^/proc/ || true"),
    ]
}

/// Runs the session.
fn run_session(d: &Daemon) -> Vec<stockade_tests::session::StepRun> {
    prepare_files(d);
    let tree = d.run_ok([
        "nix-store",
        "--add",
        d.work_dir().join("tree").to_str().unwrap(),
    ]);
    let drv = d
        .cmd("nix-instantiate")
        .arg(d.work_dir().join("expr.nix"))
        .env("TREE", &tree)
        .ok();
    let env = [
        ("WORK", d.work_dir().display().to_string()),
        ("DRV", drv),
        (
            "NIX_CONFIG",
            "experimental-features = nix-command".to_string(),
        ),
    ];
    run_steps(d, &session(), &env)
}

#[test]
fn same_session_same_output() {
    skip_unless_root!();
    let nix = Daemon::builder(DaemonKind::Nix)
        .start()
        .expect("nix-daemon");
    let stockade = Daemon::builder(DaemonKind::Stockade)
        .start()
        .expect("stockade");
    let a = run_session(&nix);
    let b = run_session(&stockade);
    let same = |s: &str| s.to_string();
    if let Err(report) = compare(&a, &b, &same, &same) {
        panic!("{report}");
    }
}
