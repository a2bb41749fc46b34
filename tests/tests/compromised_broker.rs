//! A compromised broker (SECURITY.md §4.8 A58–A64, §4.10 A68 and A74): Stockade started with
//! `stockade-evil-broker` (broker crate, test-only feature `evil`) in place of its broker. That
//! binary starts and locks down exactly as the real broker does, then runs the attacks its
//! client names, one per line, and answers `<name> <outcome>` (see its module docs). Every
//! attack must fail; the ones seccomp answers by killing the broker run one per connection,
//! and the daemon must go on serving afterwards.
//!
//! The evil binary is not built here: `STOCKADE_EVIL_BROKER` names it (scripts/test.sh builds
//! it). Without it the test fails in CI and is skipped elsewhere. Needs root (namespaces,
//! useradd, a root-owned libexec directory).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use stockade_tests::raw::connect_socket_as;
use stockade_tests::sec::{audit_line, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, stockade_bin, Daemon, User};

const WAIT: Duration = Duration::from_secs(60);

/// `$STOCKADE_EVIL_BROKER` (relative to the workspace root when relative), or `None` to skip.
fn evil_broker() -> Option<PathBuf> {
    let build =
        "cargo build --workspace --features stockade-broker/evil --bin stockade-evil-broker";
    match std::env::var_os("STOCKADE_EVIL_BROKER").filter(|v| !v.is_empty()) {
        Some(p) => {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let p = root.join(p);
            assert!(
                p.is_file(),
                "STOCKADE_EVIL_BROKER={} is not a file (build it: {build})",
                p.display()
            );
            Some(p)
        }
        None => {
            let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
            assert!(
                !ci,
                "STOCKADE_EVIL_BROKER is not set and CI is: build it with `{build}` and set it"
            );
            let _ = std::io::stderr().write_all(
                format!("SKIPPED compromised_broker: STOCKADE_EVIL_BROKER not set ({build})\n")
                    .as_bytes(),
            );
            None
        }
    }
}

/// A root-owned 0755 directory with the real store-writer and builder-helper (from the
/// `stockade` binary's directory) and `evil` as `stockade-broker`: the master's checks
/// (`check_program`) accept it.
fn libexec_with(evil: &Path) -> tempfile::TempDir {
    let real = stockade_bin().expect("the stockade binary");
    let bin_dir = real.parent().expect("its directory");
    let dir = tempfile::Builder::new()
        .prefix("stockade-evil-libexec-")
        .tempdir()
        .expect("libexec dir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    for (from, to) in [
        (
            bin_dir.join("stockade-store-writer"),
            "stockade-store-writer",
        ),
        (
            bin_dir.join("stockade-builder-helper"),
            "stockade-builder-helper",
        ),
        (evil.to_path_buf(), "stockade-broker"),
    ] {
        let dest = dir.path().join(to);
        std::fs::copy(&from, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", from.display()));
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

/// A connection to an evil broker.
struct Evil {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Its `conn=` id, from `whoami`.
    conn: String,
}

impl Evil {
    fn connect(d: &Daemon, user: &User) -> Evil {
        let s = connect_socket_as(&d.socket_path(), user).expect("connecting");
        s.set_read_timeout(Some(WAIT)).unwrap();
        let w = s.try_clone().unwrap();
        let mut e = Evil {
            r: BufReader::new(s),
            w,
            conn: String::new(),
        };
        let who = e.ask("whoami").expect("an answer to whoami");
        // A58: the identity is the master's, and the broker has no way to another.
        assert_eq!(
            who.split(' ').nth(1),
            Some(format!("uid={}", user.uid).as_str()),
            "{who}"
        );
        assert!(who.ends_with(" trusted=no"), "{who}");
        e.conn = who
            .split(' ')
            .next()
            .and_then(|w| w.strip_prefix("conn="))
            .expect("conn=")
            .to_string();
        e
    }

    /// The outcome of `attack`; `None` when the connection closed instead.
    fn ask(&mut self, attack: &str) -> Option<String> {
        writeln!(self.w, "{attack}").expect("sending an attack");
        let mut line = String::new();
        let n = self.r.read_line(&mut line).expect("reading an outcome");
        if n == 0 {
            return None;
        }
        let line = line.trim_end();
        let outcome = line
            .strip_prefix(attack)
            .and_then(|r| r.strip_prefix(' '))
            .unwrap_or_else(|| panic!("an answer to {attack}: {line:?}"));
        eprintln!("{attack}: {outcome}");
        Some(outcome.to_string())
    }

    /// The outcome of `attack`, which must be a refusal each of whose parts contains one of
    /// `reasons`: it reads `refused [label: ]<reason> | …`.
    fn refused(&mut self, attack: &str, reasons: &[&str]) -> String {
        let outcome = self
            .ask(attack)
            .unwrap_or_else(|| panic!("{attack}: the connection closed"));
        let details = outcome
            .strip_prefix("refused ")
            .unwrap_or_else(|| panic!("{attack} was not refused: {outcome}"));
        for part in details.split(" | ") {
            assert!(
                reasons.iter().any(|r| part.contains(r)),
                "{attack}: refused for an unexpected reason {part:?} ({outcome})"
            );
        }
        outcome
    }
}

/// The value of `key=` in an audit line (unquoted values only).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

#[test]
fn a_compromised_broker_gets_no_more_than_its_client() {
    skip_unless_root!();
    let Some(evil) = evil_broker() else {
        return;
    };
    let mallory = ensure_user("st-mallory").unwrap();
    let libexec = libexec_with(&evil);
    let audit = AuditCollector::new();
    let d = stockade_with(&format!("audit-socket = {}\n", audit.path().display()))
        .env("STOCKADE_LIBEXEC_DIR", libexec.path().to_str().unwrap())
        .start()
        .expect("stockade with the evil broker");

    let mut m = Evil::connect(&d, &mallory);
    // A64/A65: the store-writer writes the event under this connection, its words escaped.
    assert_eq!(m.ask("audit-forge").as_deref(), Some("sent"));
    let forged = audit
        .wait_for(WAIT, |l| l.contains(" op=x ") && l.contains("by=broker"))
        .unwrap_or_else(|| panic!("no line for the forged event: {:#?}", audit.lines()));
    let forged = audit_line(&forged);
    assert!(
        forged.starts_with(&format!("conn={} uid={} ", m.conn, mallory.uid)),
        "{forged}"
    );
    assert!(!forged.contains('\n'), "{forged:?}");
    assert!(
        forged.contains(r#"reason="forged\nconn=0 uid=0 accepted pid=1 user=root trusted=yes""#),
        "{forged}"
    );
    assert!(forged.contains("trusted=no"), "{forged}");
    // A59: no signature, and claims that do not match the data.
    let o = m.refused("add-unsigned", &["lacks a valid signature"]);
    assert!(o.ends_with(" valid=false"), "{o}");
    let o = m.refused("add-lying-hash", &["hash mismatch importing path"]);
    assert!(o.ends_with(" valid=false valid=false"), "{o}");
    // A60, A61: Landlock (and DAC) for files, seccomp for signals and addressed datagrams.
    m.refused("write-store", &["EACCES", "EPERM", "EROFS"]);
    m.refused("read-db", &["EACCES", "EPERM"]);
    m.refused("read-shadow", &["EACCES", "EPERM"]);
    m.refused("signal-master", &["EPERM"]);
    // A74: no socket, no datagram pair, no addressed send on the pairs a broker may make.
    m.refused("sendto-syslog", &["EPERM", "EACCES", "EISCONN"]);
    // A62: the helper reads the derivation from the store; a missing one builds nothing.
    let o = m.refused("build-missing-drv", &["evil-missing.drv"]);
    assert!(!o.contains("started"), "{o}");
    // A68: the store-writer closes this channel...
    assert_eq!(m.ask("oversized").as_deref(), Some("closed"));
    let closed = audit
        .wait_for(WAIT, |l| {
            l.contains(&format!("conn={} ", m.conn)) && l.contains("outcome=closed")
        })
        .unwrap_or_else(|| {
            panic!(
                "no audit line for the oversized request: {:#?}",
                audit.lines()
            )
        });
    assert!(closed.contains("op=protocol"), "{closed}");
    drop(m);

    // exec, namespaces, ptrace: seccomp kills the broker; one connection each.
    for attack in ["exec", "unshare", "ptrace"] {
        let mut c = Evil::connect(&d, &mallory);
        if let Some(outcome) = c.ask(attack) {
            assert!(outcome.starts_with("refused "), "{attack}: {outcome}");
            continue;
        }
        let line = audit
            .wait_for(WAIT, |l| {
                let l = audit_line(l);
                field(l, "conn") == Some(c.conn.as_str()) && l.contains(" closed ")
            })
            .unwrap_or_else(|| panic!("{attack}: no closed line: {:#?}", audit.lines()));
        assert_eq!(
            field(audit_line(&line), "signal"),
            Some("SIGSYS"),
            "{attack}: {line}"
        );
    }

    // ...and it, the master and the helper serve on.
    let mut after = Evil::connect(&d, &mallory);
    after.refused("add-unsigned", &["lacks a valid signature"]);
    after.refused("build-missing-drv", &["evil-missing.drv"]);
    assert!(
        !audit
            .lines()
            .iter()
            .any(|l| l.contains("store-writer-died")),
        "{:#?}",
        audit.lines()
    );
    assert!(stockade_tests::process_alive(d.pid()), "the master exited");
}
