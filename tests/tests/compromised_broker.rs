//! A compromised broker (SECURITY.md §4.8 A58–A64, §4.10 A68 and A74): Stockade started with
//! `stockade-evil-broker` (broker crate, test-only feature `evil`) in place of its broker. That
//! binary starts and locks down exactly as the real broker does, then runs the attacks its
//! client names, one per line, and answers `<name> <outcome>` (see its module docs). Every
//! attack must fail; the ones seccomp answers by killing the broker run one per connection,
//! and the daemon must go on serving afterwards.
//!
//! The evil binary is not built here: `STOCKADE_EVIL_BROKER` names it (scripts/test.sh builds
//! it; the harness is `stockade_tests::evil`). Without it the test fails in CI and is skipped
//! elsewhere. Needs root (namespaces,
//! useradd, a root-owned libexec directory).

use stockade_tests::evil::{evil_broker, field, libexec_with, Evil, WAIT};
use stockade_tests::sec::{assert_unchanged, audit_line, snapshot, stockade_with, AuditCollector};
use stockade_tests::{ensure_user, skip_unless_root, Daemon};

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

/// What the evil broker's `stderr-forge` writes at the start of a line: the master's audit
/// fallback on standard error.
const FORGED: &str = "stockade[1]: audit: conn=0 uid=0 accepted pid=1 user=root trusted=yes";
/// The master's bound on what one broker may write (master/src/daemon/relay.rs).
const RELAY_MAX_TOTAL: usize = 1 << 20;

/// The daemon's log once `pred` holds for it (or panics after `WAIT`).
fn log_when(d: &Daemon, what: &str, pred: impl Fn(&str) -> bool) -> String {
    d.wait_for_log(WAIT, pred)
        .unwrap_or_else(|| panic!("the daemon's log never showed {what}:\n{}", d.log_tail(40)))
}

/// A compromised broker's standard output and error reach the daemon's log only through the
/// master: each line prefixed with the broker's pid and connection and escaped (no forged
/// line, no raw escape), long lines in marked pieces, and no more than the bound in all, after
/// which one line of the master's says it was cut. Its flood blocks neither it nor the master,
/// which serves another client meanwhile.
#[test]
fn a_broker_reaches_the_log_only_prefixed_escaped_and_bounded() {
    skip_unless_root!();
    let Some(evil) = evil_broker() else {
        return;
    };
    let mallory = ensure_user("st-mallory").unwrap();
    let libexec = libexec_with(&evil);
    let d = stockade_with("")
        .env("STOCKADE_LIBEXEC_DIR", libexec.path().to_str().unwrap())
        .start()
        .expect("stockade with the evil broker");

    let mut m = Evil::connect(&d, &mallory);
    let sent = m.ask("stderr-forge").expect("an answer to stderr-forge");
    let pid = sent
        .strip_prefix("sent pid=")
        .unwrap_or_else(|| panic!("stderr-forge: {sent}"))
        .to_string();
    let prefix = format!("stockade-broker[{pid}] conn={}: ", m.conn);
    let log = log_when(&d, "the forged lines", |l| l.contains("evil-long LLL"));
    let raw: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(['\x1b', '\r', '\u{85}', '\u{2028}']))
        .collect();
    assert!(
        raw.is_empty(),
        "raw control characters in the log: {raw:#?}"
    );
    for line in log.lines() {
        assert!(!line.starts_with("stockade[1]:"), "a forged line: {line:?}");
        if ["evil-", "harmless", "stockade[1]"]
            .iter()
            .any(|w| line.contains(w))
        {
            assert!(
                line.starts_with(&prefix),
                "not the broker's prefix: {line:?}"
            );
            assert!(line.len() < 4096, "{} bytes: {line:.80}…", line.len());
        }
    }
    let mine: Vec<&str> = log
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .collect();
    for want in [
        FORGED.to_string(),
        format!("{FORGED} via-stdout"),
        format!(r"evil-escape \x1b[2K\x1b[1G\r{FORGED} via-cr"),
        format!(r"evil-nel \x85{FORGED} via-nel\u{{2028}}{FORGED} via-ls"),
        r"evil-bytes \xff\xfe\xc3".to_string(),
    ] {
        assert!(
            mine.contains(&want.as_str()),
            "no line {want:?} in {mine:#?}"
        );
    }
    // The 6,000-byte line, in pieces each marked but the last.
    let start = mine
        .iter()
        .position(|l| l.starts_with("evil-long "))
        .expect("the long line");
    let mut long = String::new();
    for piece in mine.iter().skip(start) {
        match piece.strip_suffix(" …[continued]") {
            Some(p) => long.push_str(p),
            None => {
                long.push_str(piece);
                break;
            }
        }
    }
    assert_eq!(long, format!("evil-long {}", "L".repeat(6000)));

    // A flood: cut at the bound, and the master serves on.
    m.send("stderr-flood");
    let notice = format!(
        "warning: the broker of connection {} (pid {pid}) wrote more than {RELAY_MAX_TOTAL} bytes",
        m.conn
    );
    log_when(&d, "the notice of the cut", |l| l.contains(&notice));
    let mut other = Evil::connect(&d, &mallory);
    // Stops the flood, which was still going on while `other` was served.
    m.send("stop");
    let flood = m.answer("stderr-flood").expect("an answer to stderr-flood");
    assert!(flood.starts_with("stopped "), "{flood}");
    assert_eq!(m.answer("stop").as_deref(), Some("stopped"));
    let written: usize = field(&flood, "lines")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{flood}"));
    assert_eq!(other.ask("stop").as_deref(), Some("stopped"));
    drop(other);
    drop(m);

    let log = d.log();
    let relayed: Vec<usize> = log
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|l| l.strip_prefix("evil-flood "))
        .map(|l| {
            l.split(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .expect("a number")
        })
        .collect();
    assert!(!relayed.is_empty(), "no flood line relayed");
    assert!(
        relayed.iter().enumerate().all(|(i, n)| i == *n),
        "flood lines out of order or missing"
    );
    // Each flood line is 122 bytes; the bound is what the broker wrote, the forged lines too.
    assert!(relayed.len() * 122 <= RELAY_MAX_TOTAL, "{}", relayed.len());
    assert!(
        relayed.len() * 122 > RELAY_MAX_TOTAL / 2,
        "{}",
        relayed.len()
    );
    assert!(written > 2 * relayed.len(), "{written} lines written");
    assert_eq!(log.matches(&notice).count(), 1, "{}", d.log_tail(20));
    assert!(stockade_tests::process_alive(d.pid()), "the master exited");
}

/// A62, the input-addressed half: a compromised broker of mallory gets no input-addressed
/// derivation built as a trusted client's would be. A copy of a stored `.drv` whose `out` is a
/// path of its choosing (what an inline BuildDerivation would claim) is not added and so not
/// built; the stored one in repair mode and a store path that is not a derivation are refused
/// by the helper. Nothing is built or registered, and the refusals are audited.
#[test]
fn a62_a_compromised_broker_gets_no_input_addressed_build_as_if_trusted() {
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
    let bb = d.add_busybox();
    let expr = stockade_tests::busybox_derivation(&bb, "a62", "echo built > $out");
    let drv = d
        .run_ok(["nix-instantiate", "-E", &expr])
        .trim()
        .to_string();
    let out = d
        .run_ok(["nix-store", "-q", "--outputs", &drv])
        .trim()
        .to_string();
    let before = snapshot(&d);

    let mut m = Evil::connect(&d, &mallory);
    let o = m
        .ask(&format!("a62-ia {drv}"))
        .expect("an answer to a62-ia");
    let details = o
        .strip_prefix("refused ")
        .unwrap_or_else(|| panic!("not refused: {o}"));
    for (part, words) in [
        ("add-lying: ", "has incorrect output"),
        ("build-lying: ", "from the store"),
        ("repair: ", "repairing is not allowed"),
        ("not-a-drv: ", "is not a derivation"),
    ] {
        assert!(
            details
                .split(" | ")
                .any(|p| p.starts_with(part) && p.contains(words)),
            "{part}{words}: {o}"
        );
    }
    assert!(o.ends_with(" chosen-valid=false drv-valid=false"), "{o}");
    assert!(!d.host_path(&out).exists(), "{out} was built");
    assert_unchanged(&d, &before, "a62-ia");
    audit
        .wait_for(WAIT, |l| {
            let l = audit_line(l);
            field(l, "conn") == Some(m.conn.as_str()) && l.contains("build-refused")
        })
        .unwrap_or_else(|| panic!("the repair was not audited: {:#?}", audit.lines()));
}

/// A61: a daemon with a real signing key (`secret-key-files`, read by the store-writer alone,
/// before its lockdown); a compromised broker of mallory tries the key file by its path and
/// through the store-writer's, the master's and the helper's `/proc/<pid>` (`root`, every
/// descriptor number, `environ`, `mem`): every attempt is refused and nothing of the key
/// comes back.
#[test]
fn a61_a_compromised_broker_cannot_read_the_signing_key() {
    use std::os::unix::fs::PermissionsExt;
    skip_unless_root!();
    let Some(evil) = evil_broker() else {
        return;
    };
    let mallory = ensure_user("st-mallory").unwrap();
    let keys = tempfile::Builder::new()
        .prefix("stockade-a61-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(keys.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let (secret, public) = (keys.path().join("sec"), keys.path().join("pub"));
    // Nix opens its state even to make a key: give it a throw-away one, never the host's /nix.
    let state = keys.path().join("nix-state");
    let made = std::process::Command::new("nix-store")
        .env("NIX_REMOTE", "dummy://")
        .env("NIX_STATE_DIR", &state)
        .env("NIX_LOG_DIR", state.join("log"))
        .env("NIX_STORE_DIR", state.join("store"))
        .arg("--generate-binary-cache-key")
        .arg("a61.example.org-1")
        .args([&secret, &public])
        .output()
        .expect("nix-store --generate-binary-cache-key");
    assert!(made.status.success(), "{made:?}");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let key = std::fs::read_to_string(&secret).unwrap();
    let key_b64 = key.trim().split_once(':').expect("name:key").1.to_string();

    let libexec = libexec_with(&evil);
    // The store-writer refuses to start without a key it can read and parse.
    let d = stockade_with("")
        .conf_line(&format!("secret-key-files = {}", secret.display()))
        .env("STOCKADE_LIBEXEC_DIR", libexec.path().to_str().unwrap())
        .start()
        .expect("stockade with a signing key and the evil broker");
    let pids: Vec<String> = stockade_tests::sec::instance_processes(&d, "stockade")
        .into_iter()
        .filter(|p| p.exe != "stockade-broker")
        .map(|p| p.pid.to_string())
        .collect();
    let writer = stockade_tests::sec::instance_processes(&d, "stockade-store-writer");
    assert_eq!(writer.len(), 1, "the store-writer: {writer:?}");
    assert!(pids.len() >= 3, "master, store-writer, helper: {pids:?}");

    let mut m = Evil::connect(&d, &mallory);
    let attack = format!("read-secret {} {}", secret.display(), pids.join(" "));
    let o = m.refused(&attack, &["EACCES", "EPERM", "ENOENT"]);
    let by_path = o
        .strip_prefix("refused path: ")
        .and_then(|r| r.split(" | ").next())
        .unwrap_or_else(|| panic!("{o}"));
    assert!(matches!(by_path, "EACCES" | "EPERM"), "{o}");
    for pid in &pids {
        assert!(o.contains(&format!("root-{pid}: ")), "{pid} not tried: {o}");
    }
    assert!(!o.contains(&key_b64), "{o}");
}
