//! Trust rules (SECURITY.md §2, A1, A2, A26, A32, A52, A53) with the real Nix 2.8 client,
//! against Stockade and the real nix-daemon in the same setup: every step must end the same
//! way on both, and the way SECURITY.md says.
//!
//! Accounts: `st-alice` trusted, `st-bob` and `st-mallory` untrusted, `st-eve` not in
//! allowed-users, `st-nixbld-m` whose primary group is the build-users-group (refused although
//! listed in trusted-users).
//!
//! Needs root (namespaces, useradd); fails loudly in CI without it.

use std::collections::BTreeMap;

use stockade_common::signature::SecretKey;
use stockade_common::store_path::StoreDir;
use stockade_tests::raw::{
    export_stream, flat_nar, info_for, input_addressed_path, write_binary_cache,
};
use stockade_tests::sec::{builder, ensure_user_with_primary_group};
use stockade_tests::{ensure_user, skip_unless_root, Daemon, DaemonKind, RunOutput, User};

const CONF: &[&str] = &[
    "trusted-users = root st-alice st-nixbld-m",
    "allowed-users = root st-alice st-bob st-mallory st-nixbld-m",
    "build-users-group = st-nixbld",
];

struct Users {
    alice: User,
    bob: User,
    mallory: User,
    eve: User,
    nixbld: User,
}

fn users() -> Users {
    Users {
        alice: ensure_user("st-alice").unwrap(),
        bob: ensure_user("st-bob").unwrap(),
        mallory: ensure_user("st-mallory").unwrap(),
        eve: ensure_user("st-eve").unwrap(),
        nixbld: ensure_user_with_primary_group("st-nixbld-m", "st-nixbld").unwrap(),
    }
}

/// How a step's output is compared between the two daemons.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Compare {
    /// Exit status, stdout and stderr must be identical.
    Everything,
    /// Only the exit status and stdout (stderr depends on timing, e.g. where a refused
    /// connection is noticed).
    StatusAndStdout,
}

struct Step {
    label: &'static str,
    user: fn(&Users) -> &User,
    /// Run with `sh -c`; `$WORK`, `$EVIL`, `$CACHE` are set.
    cmd: &'static str,
    ok: bool,
    /// stdout or stderr (ANSI escapes removed) must contain this.
    output_has: Option<&'static str>,
    compare: Compare,
}

/// A path every step can use: added by bob (content-addressed, so anyone may add it).
const BOB_ADD: &str = "nix-store --add $WORK/bob.txt";

fn steps() -> Vec<Step> {
    use Compare::*;
    let s = |label, user, cmd, ok, output_has, compare| Step {
        label,
        user,
        cmd,
        ok,
        output_has,
        compare,
    };
    vec![
        s("A1 eve is not allowed", |u| &u.eve, "nix-store --add $WORK/eve.txt", false, None, StatusAndStdout),
        s(
            "A2 build-users-group member refused although trusted",
            |u| &u.nixbld,
            "nix-store --add $WORK/eve.txt",
            false,
            None,
            StatusAndStdout,
        ),
        s("untrusted add (content-addressed)", |u| &u.bob, BOB_ADD, true, None, Everything),
        s(
            "A26 untrusted import of an unsigned input-addressed path",
            |u| &u.bob,
            "nix-store --import < $WORK/unsigned.export",
            false,
            Some("lacks a valid signature"),
            Everything,
        ),
        s(
            "A26 untrusted nix copy of an unsigned input-addressed path",
            |u| &u.bob,
            "nix copy --from $CACHE $EVIL",
            false,
            Some("lacks a valid signature"),
            Everything,
        ),
        s(
            "A26 untrusted nix copy --no-check-sigs",
            |u| &u.mallory,
            "nix copy --no-check-sigs --from $CACHE $EVIL",
            false,
            Some("lacks a valid signature"),
            Everything,
        ),
        s(
            "A32 untrusted AddSignatures",
            |u| &u.bob,
            "nix store sign --key-file $WORK/key $(nix-store --add $WORK/bob.txt)",
            false,
            Some("you are not privileged to add signatures"),
            Everything,
        ),
        s(
            "A32 untrusted realise --repair",
            |u| &u.mallory,
            "nix-store -r --repair $(nix-store --add $WORK/bob.txt)",
            false,
            Some("repairing is not allowed because you are not in 'trusted-users'"),
            Everything,
        ),
        s(
            "A32 untrusted verify --repair",
            |u| &u.bob,
            "nix-store --verify --repair",
            false,
            Some("you are not privileged to repair paths"),
            Everything,
        ),
        s(
            "A52 untrusted sandbox=false is ignored (debug line only)",
            |u| &u.bob,
            "nix-store --add $WORK/bob.txt --option sandbox false --debug 2>&1 | grep -e 'ignoring' -e 'restricted' || true",
            true,
            Some("ignoring the client-specified setting 'sandbox', because it is a restricted setting and you are not a trusted user"),
            Everything,
        ),
        s(
            "A53 untrusted substituters=https://evil is ignored",
            |u| &u.bob,
            "nix-store --add $WORK/bob.txt --option substituters https://evil.example/",
            true,
            Some("ignoring untrusted substituter 'https://evil.example/'"),
            Everything,
        ),
        s(
            "trusted sandbox=false and substituters are taken silently",
            |u| &u.alice,
            "nix-store --add $WORK/bob.txt --option sandbox false --option substituters https://evil.example/ --debug 2>&1 | grep -e 'ignoring' -e 'restricted' || true",
            true,
            None,
            Everything,
        ),
        s(
            "trusted import of the unsigned path",
            |u| &u.alice,
            "nix-store --import < $WORK/unsigned.export",
            true,
            None,
            Everything,
        ),
        s(
            "trusted AddSignatures",
            |u| &u.alice,
            "nix store sign --key-file $WORK/key $(nix-store --add $WORK/bob.txt) && nix path-info --sigs $(nix-store --add $WORK/bob.txt)",
            true,
            None,
            Everything,
        ),
        s(
            "the signature is there for everyone",
            |u| &u.mallory,
            "nix path-info --sigs $(nix-store --add $WORK/bob.txt) | grep -c test-key-1:",
            true,
            None,
            Everything,
        ),
    ]
}

/// Files the steps use, identical for both daemons.
struct Inputs {
    key_text: String,
    evil: String,
}

fn prepare(d: &Daemon, inputs: &Inputs) -> String {
    let sd = StoreDir::new("/nix/store").unwrap();
    d.write_work_file("bob.txt", b"bob's file\n");
    d.write_work_file("eve.txt", b"eve's file\n");
    d.write_work_file("key", inputs.key_text.as_bytes());
    let nar = flat_nar(b"unsigned, input-addressed\n");
    let info = info_for(&inputs.evil, &sd, &nar);
    d.write_work_file("unsigned.export", &export_stream(&info, &sd, &nar));
    write_binary_cache(&d.work_dir().join("cache"), &info, &sd, &nar)
}

fn run_steps(d: &Daemon, u: &Users, inputs: &Inputs, steps: &[Step]) -> Vec<RunOutput> {
    let cache = prepare(d, inputs);
    steps
        .iter()
        .map(|s| {
            d.cmd("sh")
                .arg("-c")
                .arg(s.cmd)
                .as_user((s.user)(u))
                .env("WORK", d.work_dir())
                .env("EVIL", &inputs.evil)
                .env("CACHE", &cache)
                .env("NIX_CONFIG", "experimental-features = nix-command")
                .output()
        })
        .collect()
}

fn output_plain(o: &RunOutput) -> String {
    stockade_tests::raw::strip_ansi(&format!("{}{}", o.stdout_str(), o.stderr_str()))
}

/// Runs `steps` on both daemons (started with `conf`), checks each against its expectation
/// and against nix-daemon; returns both daemons for further checks.
fn compare_daemons(conf: &[&str], steps: &[Step]) -> (Daemon, Daemon) {
    let u = users();
    let key = SecretKey::generate("test-key-1").unwrap();
    let inputs = Inputs {
        key_text: key.to_text().to_string(),
        evil: input_addressed_path(&StoreDir::new("/nix/store").unwrap(), "evil", "evil"),
    };
    let start = |kind| {
        let mut b = builder(kind);
        for l in conf {
            b = b.conf_line(l);
        }
        b.start().expect("daemon")
    };
    let nix = start(DaemonKind::Nix);
    let stockade = start(DaemonKind::Stockade);
    let a = run_steps(&nix, &u, &inputs, steps);
    let b = run_steps(&stockade, &u, &inputs, steps);
    let mut problems = BTreeMap::new();
    for (i, (s, (x, y))) in steps.iter().zip(a.iter().zip(b.iter())).enumerate() {
        let key = format!("{i:02} {}", s.label);
        let mut p = Vec::new();
        for (name, o) in [("nix-daemon", x), ("stockade", y)] {
            if o.success() != s.ok {
                p.push(format!("{name}: expected success={}", s.ok));
            }
            if let Some(want) = s.output_has {
                if !output_plain(o).contains(want) {
                    p.push(format!("{name}: the output lacks {want:?}"));
                }
            }
        }
        // Each instance has its own directory; that is the one legitimate difference.
        let norm = |d: &Daemon, b: &[u8]| {
            String::from_utf8_lossy(b).replace(&d.base_dir().display().to_string(), "$BASE")
        };
        let same_out = norm(&nix, &x.stdout) == norm(&stockade, &y.stdout);
        let same_err = norm(&nix, &x.stderr) == norm(&stockade, &y.stderr);
        let same = x.status.code() == y.status.code()
            && same_out
            && (same_err || s.compare == Compare::StatusAndStdout);
        if !same {
            p.push("the daemons answer differently".into());
        }
        if !p.is_empty() {
            problems.insert(
                key,
                format!(
                    "{}\n--- nix-daemon:\n{x}\n--- stockade:\n{y}\n",
                    p.join("; ")
                ),
            );
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} steps failed:\n\n{}",
        problems.len(),
        steps.len(),
        problems
            .iter()
            .map(|(k, v)| format!("=== {k}: {v}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    (nix, stockade)
}

#[test]
fn trust_rules_match_nix_daemon() {
    skip_unless_root!();
    let (nix, stockade) = compare_daemons(CONF, &steps());
    // Both daemons name the refused accounts, with nix-daemon's words, in their logs.
    for d in [&nix, &stockade] {
        for user in ["st-eve", "st-nixbld-m"] {
            let want = format!("user '{user}' is not allowed to connect to the Nix daemon");
            assert!(
                d.log().contains(&want),
                "{}'s log lacks {want:?}:\n{}",
                d.kind().name(),
                d.log_tail(40)
            );
        }
    }
}

#[test]
fn unsigned_import_is_accepted_without_require_sigs() {
    skip_unless_root!();
    let mut conf = CONF.to_vec();
    conf.push("require-sigs = false");
    let s = |label, cmd, ok| Step {
        label,
        user: |u: &Users| &u.bob,
        cmd,
        ok,
        output_has: None,
        compare: Compare::Everything,
    };
    compare_daemons(
        &conf,
        &[
            s(
                "untrusted import, require-sigs = false",
                "nix-store --import < $WORK/unsigned.export",
                true,
            ),
            s(
                "now valid",
                "nix-store --check-validity $EVIL && nix path-info $EVIL",
                true,
            ),
            s(
                "AddSignatures is still refused",
                "nix store sign --key-file $WORK/key $EVIL",
                false,
            ),
        ],
    );
}

#[test]
fn trusted_repair_behaves_as_nix_daemon() {
    skip_unless_root!();
    compare_daemons(
        CONF,
        &[Step {
            label: "trusted realise --repair of a valid path (no substituters)",
            user: |u: &Users| &u.alice,
            cmd: "nix-store -r --repair $(nix-store --add $WORK/bob.txt)",
            ok: false,
            output_has: Some("build of '/nix/store/"),
            compare: Compare::Everything,
        }],
    );
}

#[test]
/// `nix copy` of a path the store already has (an AddMultipleToStore with no entry).
fn copy_of_an_already_valid_path_succeeds() {
    skip_unless_root!();
    let mut conf = CONF.to_vec();
    conf.push("require-sigs = false");
    let s = |label, cmd| Step {
        label,
        user: |u: &Users| &u.bob,
        cmd,
        ok: true,
        output_has: None,
        compare: Compare::Everything,
    };
    compare_daemons(
        &conf,
        &[
            s("import", "nix-store --import < $WORK/unsigned.export"),
            s(
                "nix copy of the now valid path copies nothing",
                "nix copy --from $CACHE $EVIL",
            ),
        ],
    );
}
