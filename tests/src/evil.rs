//! The harness of the compromised-broker tests (SECURITY.md §4.8): Stockade started with
//! `stockade-evil-broker` (broker crate, test-only feature `evil`) as its broker, and a client
//! that names attacks one per line and reads `<name> <outcome>` back (see that binary's module
//! docs). `STOCKADE_EVIL_BROKER` names the binary (scripts/test.sh builds it).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::raw::connect_socket_as;
use crate::{stockade_bin, Daemon, User};

/// How long an answer or an audit line may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// `$STOCKADE_EVIL_BROKER` (relative to the workspace root when relative), or `None` to skip.
pub fn evil_broker() -> Option<PathBuf> {
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
pub fn libexec_with(evil: &Path) -> tempfile::TempDir {
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
pub struct Evil {
    r: BufReader<UnixStream>,
    w: UnixStream,
    /// Its `conn=` id, from `whoami`.
    pub conn: String,
}

impl Evil {
    pub fn connect(d: &Daemon, user: &User) -> Evil {
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
    pub fn ask(&mut self, attack: &str) -> Option<String> {
        self.send(attack);
        self.answer(attack)
    }

    pub fn send(&mut self, attack: &str) {
        writeln!(self.w, "{attack}").expect("sending an attack");
    }

    /// The outcome of `attack`, sent before; `None` when the connection closed instead.
    pub fn answer(&mut self, attack: &str) -> Option<String> {
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
    pub fn refused(&mut self, attack: &str, reasons: &[&str]) -> String {
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
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split(' ')
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}
