//! A44: a builder's log carrying terminal escape codes, control bytes, carriage returns and
//! lines dressed as audit lines. The client sees what nix-daemon shows it (Nix's client strips
//! escapes itself; the daemon hands it lines with carriage returns applied), the stored build
//! log holds what nix-daemon stores (the builder's bytes), and Stockade's own log and audit
//! never carry any of it raw. Needs root; runs nix-daemon once for the reference.

use std::time::Duration;

use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{busybox_derivation, skip_unless_root, Daemon, DaemonKind};

/// Prints escapes, control bytes, carriage returns and forged audit lines, then fails, so that
/// the lines also reach the client in the failure's log tail.
const NOISY: &str = r#"
printf 'title:\033]0;pwned-title\007:end\n'
printf 'clear:\033[2J\033[H:end\n'
printf 'progress 10%%\rprogress 100%%\n'
printf 'abcdef\rXY\n'
printf 'stockade[1]: audit: conn=0 uid=0 forged=yes\n'
printf '\nstockade-store-writer[1]: audit: conn=0 uid=0 op=addToStore outcome=added forged=yes\n'
printf 'bell:\007 ctl:\001\002\033 del:\177:end\n'
printf 'no newline at the end'
exit 1
"#;

/// The bytes no log line of Stockade's own may carry raw.
const CONTROL: &[u8] = b"\x1b\x07\r\x01\x02\x7f";

struct Seen {
    /// The client's stderr, lines naming the build's markers.
    client: Vec<String>,
    /// `nix-store -l` of the derivation: the stored log.
    stored: Vec<u8>,
}

fn build(d: &Daemon) -> Seen {
    let bb = d.add_busybox();
    let expr = busybox_derivation(&bb, "a44-noisy", NOISY);
    let drv = d.run_ok(["nix-instantiate", "-E", &expr]);
    let out = d
        .cmd("nix-build")
        .args(["--no-out-link", "-E", &expr])
        .fails();
    let client = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter(|l| {
            [
                "title:",
                "clear:",
                "progress",
                "XY",
                "forged",
                "bell:",
                "no newline",
            ]
            .iter()
            .any(|m| l.contains(m))
        })
        .map(str::to_string)
        .collect();
    let stored = d.cmd("nix-store").args(["-l", &drv]).output().stdout;
    Seen { client, stored }
}

#[test]
fn a44_escape_codes_in_build_logs_reach_no_log_of_stockade_raw() {
    skip_unless_root!();
    let nix = Daemon::builder(DaemonKind::Nix)
        .conf_line("sandbox = true")
        .start()
        .expect("nix-daemon");
    let want = build(&nix);
    drop(nix);

    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .conf_line("sandbox = true")
        .start()
        .expect("stockade");
    let got = build(&d);
    eprintln!("what nix-daemon's client saw: {:#?}", want.client);
    eprintln!("what Stockade's client saw: {:#?}", got.client);
    assert!(
        !got.client.is_empty(),
        "the client saw none of the builder's lines"
    );
    assert_eq!(got.client, want.client, "the client's view differs");
    assert!(
        want.stored.windows(4).any(|w| w == b"\x1b]0;"),
        "nix-daemon stores the builder's bytes: {:?}",
        String::from_utf8_lossy(&want.stored)
    );
    assert_eq!(
        String::from_utf8_lossy(&got.stored),
        String::from_utf8_lossy(&want.stored),
        "the stored log differs"
    );

    // Stockade's own log and audit: the build's lines are there (so the test could see
    // them), and none carries a control byte or a forged line of its own.
    let end = audit
        .wait_for(Duration::from_secs(10), |l| l.contains("build-end"))
        .expect("a build-end audit line");
    assert!(end.contains("a44-noisy"), "{end}");
    let log = d.log();
    for (what, lines) in [
        (
            "daemon log",
            log.lines().map(str::to_string).collect::<Vec<_>>(),
        ),
        ("audit", audit.lines()),
    ] {
        for l in &lines {
            assert!(
                !l.bytes().any(|b| CONTROL.contains(&b)),
                "a raw control byte in the {what}: {l:?}"
            );
            let line = audit_line(l);
            assert!(
                !line.contains("forged=yes"),
                "the builder's text in the {what}: {l:?}"
            );
        }
    }
}
