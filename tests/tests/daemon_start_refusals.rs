//! Settings of the host or the configuration that Stockade refuses to run with (SECURITY.md
//! A33, V13): the daemon exits before listening, with one clear line. The host's own settings
//! are never changed: a file is bind-mounted over the `/proc/sys` entry inside the instance's
//! private mount namespace. Needs root; fails loudly in CI without it.

use stockade_tests::sec::stockade_with;
use stockade_tests::{skip_unless_root, DaemonBuilder, HarnessError};

/// Starts `b`; the daemon must exit before listening. Returns its output.
fn refused_start(b: DaemonBuilder, what: &str) -> String {
    match b.start() {
        Err(HarnessError::DaemonDied { status, log, .. }) => {
            assert!(!status.contains("signal"), "{what}: {status}\n{log}");
            log
        }
        Ok(d) => panic!("{what}: the daemon started:\n{}", d.log_tail(20)),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// `fs.protected_hardlinks` as the instance's namespace shows it: `value` in a file
/// bind-mounted over the real entry.
fn with_protected_hardlinks(dir: &tempfile::TempDir, value: &str) -> DaemonBuilder {
    let f = dir.path().join(format!("protected_hardlinks-{value}"));
    std::fs::write(&f, format!("{value}\n")).unwrap();
    stockade_with("").ns_bind(f, "/proc/sys/fs/protected_hardlinks")
}

/// A33: with `fs.protected_hardlinks = 0` (users may hard-link files they do not own, store
/// files included) the daemon refuses to start; with `1` in the same place it starts.
#[test]
fn a33_no_protected_hardlinks_refuses_to_start() {
    skip_unless_root!();
    let dir = tempfile::tempdir().unwrap();
    let log = refused_start(
        with_protected_hardlinks(&dir, "0"),
        "fs.protected_hardlinks = 0",
    );
    let line = log
        .lines()
        .find(|l| l.contains("fs.protected_hardlinks is 0"))
        .unwrap_or_else(|| panic!("no clear error:\n{log}"));
    assert!(line.contains("sysctl fs.protected_hardlinks=1"), "{line}");
    let d = with_protected_hardlinks(&dir, "1")
        .start()
        .expect("fs.protected_hardlinks = 1: the daemon should start");
    assert!(!d.log().contains("protected_hardlinks"), "{}", d.log());
}

/// V13: a configuration that enables recursive Nix (in nix.conf, as an extra feature, or on
/// the command line) is refused at start with one clear line.
#[test]
fn v13_recursive_nix_refuses_to_start() {
    skip_unless_root!();
    let cases = [
        (
            "experimental-features in nix.conf",
            stockade_with("").conf_line("experimental-features = nix-command recursive-nix"),
        ),
        (
            "extra-experimental-features in nix.conf",
            stockade_with("").conf_line("extra-experimental-features = recursive-nix"),
        ),
        (
            "--option",
            stockade_with("")
                .arg("--option")
                .arg("experimental-features")
                .arg("recursive-nix"),
        ),
    ];
    for (what, b) in cases {
        let log = refused_start(b, what);
        assert!(
            log.lines()
                .any(|l| l
                    .contains("experimental feature 'recursive-nix' is not supported by Stockade")),
            "{what}: no clear error:\n{log}"
        );
    }
    // The control: without it the same daemon starts.
    stockade_with("")
        .conf_line("experimental-features = nix-command")
        .start()
        .expect("without recursive-nix the daemon should start");
}
