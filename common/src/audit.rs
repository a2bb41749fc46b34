//! Audit events: one line per event, to syslog and optionally to a second datagram socket.
//!
//! Every Stockade process opens an [`Audit`] handle before it locks itself down (the sockets
//! are connected while the paths are still reachable) and writes its own events through it,
//! tagged with the connection id the master assigned (DESIGN.md, "Audit").
//!
//! # Line format
//!
//! ```text
//! conn=<id> uid=<n> <kind> key=value key="value with spaces" …
//! ```
//!
//! `conn=` always comes first and `uid=` second, so a reader can split on the first two spaces.
//! Connection id 0 means "no connection" (start-up, shutdown). Keys and the kind are restricted
//! to `[A-Za-z0-9_.-]`; anything else becomes `_`. Values are escaped so that nothing a client
//! controls (store path names, setting values, URLs, user names from NSS) can end a line, start
//! a new one, move the terminal cursor or pass for another field (A65):
//!
//! - `\` → `\\`, `"` → `\"`, newline → `\n`, carriage return → `\r`, tab → `\t`;
//! - other ASCII and C1 control characters (`< 0x20`, `0x7f`, `0x80..=0x9f`) → `\xNN`;
//! - Unicode characters that reorder or hide text (bidi controls, zero-width marks, line and
//!   paragraph separators, the BOM) → `\u{XXXX}`;
//! - a value that is empty or contains a space, `=` or `"` is written in double quotes;
//! - a value longer than [`MAX_VALUE_CHARS`] characters is cut and marked `…[truncated]`.
//!
//! # Transport
//!
//! Syslog gets RFC 3164 datagrams `<PRI>IDENT[PID]: LINE` on `/dev/log` (what glibc's
//! `syslog(3)` sends, minus the timestamp, which the local daemon adds). Facility `daemon` for
//! ordinary events, `authpriv` for admission decisions ([`Facility`]). When `/dev/log` cannot be
//! reached, the line goes to standard error instead (`IDENT[PID]: audit: LINE`), so an event is
//! never silently lost. The optional `audit-socket` (stockade.conf) receives the same datagram.
//! Sends block at most [`SEND_TIMEOUT`] so a stuck syslog daemon cannot stall the caller
//! indefinitely; a send that fails falls back to standard error too.

use std::borrow::Cow;
use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// The local syslog socket.
pub const DEV_LOG: &str = "/dev/log";

/// Longest value (in characters, before escaping) written in full.
pub const MAX_VALUE_CHARS: usize = 1024;

/// How long one send may block.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Syslog facility of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Facility {
    /// `LOG_DAEMON` (3): everything but admission.
    Daemon,
    /// `LOG_AUTHPRIV` (10): connections accepted or refused.
    AuthPriv,
}

impl Facility {
    fn code(self) -> u8 {
        match self {
            Facility::Daemon => 3,
            Facility::AuthPriv => 10,
        }
    }
}

/// Syslog severity of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Err,
    Warning,
    Notice,
    Info,
}

impl Severity {
    fn code(self) -> u8 {
        match self {
            Severity::Err => 3,
            Severity::Warning => 4,
            Severity::Notice => 5,
            Severity::Info => 6,
        }
    }
}

/// The `<PRI>` value of a syslog message.
pub fn priority(facility: Facility, severity: Severity) -> u8 {
    facility.code() * 8 + severity.code()
}

/// A datagram destination, connected lazily and reconnected once after an error.
#[derive(Debug)]
struct Dest {
    path: PathBuf,
    sock: Mutex<Option<UnixDatagram>>,
    /// Making a socket was refused (a locked-down process may not make new ones): no use in
    /// trying again for every event.
    no_new_sockets: std::sync::atomic::AtomicBool,
}

impl Dest {
    fn open(path: &Path) -> Dest {
        let d = Dest {
            path: path.to_path_buf(),
            sock: Mutex::new(None),
            no_new_sockets: std::sync::atomic::AtomicBool::new(false),
        };
        if let Ok(mut guard) = d.sock.lock() {
            *guard = connect(path).ok();
        }
        d
    }

    fn is_connected(&self) -> bool {
        self.sock.lock().map(|g| g.is_some()).unwrap_or(false)
    }

    /// Send one datagram; on failure reconnect once (the syslog daemon may have restarted)
    /// and retry.
    fn send(&self, msg: &[u8]) -> io::Result<()> {
        let mut guard = self
            .sock
            .lock()
            .map_err(|_| io::Error::other("audit socket lock poisoned"))?;
        if let Some(sock) = guard.as_ref() {
            match sock.send(msg) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Err(e),
                Err(_) => {}
            }
        }
        *guard = None;
        use std::sync::atomic::Ordering::Relaxed;
        if self.no_new_sockets.load(Relaxed) {
            return Err(io::Error::from_raw_os_error(nix::libc::EPERM));
        }
        let sock = UnixDatagram::unbound().inspect_err(|e| {
            if matches!(e.raw_os_error(), Some(nix::libc::EPERM | nix::libc::EACCES)) {
                self.no_new_sockets.store(true, Relaxed);
            }
        })?;
        let sock = connect_socket(sock, &self.path)?;
        let sent = sock.send(msg);
        *guard = Some(sock);
        sent.map(|_| ())
    }
}

fn connect(path: &Path) -> io::Result<UnixDatagram> {
    connect_socket(UnixDatagram::unbound()?, path)
}

fn connect_socket(sock: UnixDatagram, path: &Path) -> io::Result<UnixDatagram> {
    sock.connect(path)?;
    sock.set_write_timeout(Some(SEND_TIMEOUT))?;
    Ok(sock)
}

/// Where one process's audit events go. Cheap to share (`Send + Sync`).
#[derive(Debug)]
pub struct Audit {
    ident: String,
    pid: u32,
    syslog: Option<Dest>,
    extra: Option<Dest>,
}

impl Audit {
    /// Syslog on [`DEV_LOG`] plus `audit_socket` when given. Never fails: destinations that
    /// cannot be reached now are retried on each event, and standard error takes the lines
    /// syslog does not.
    pub fn open(ident: &str, audit_socket: Option<&Path>) -> Audit {
        Audit::open_at(ident, Some(Path::new(DEV_LOG)), audit_socket)
    }

    /// [`Audit::open`] with another syslog socket (`None`: standard error only).
    pub fn open_at(ident: &str, syslog: Option<&Path>, audit_socket: Option<&Path>) -> Audit {
        Audit {
            ident: clean_word(ident).into_owned(),
            pid: std::process::id(),
            syslog: syslog.map(Dest::open),
            // The same socket twice would log every line twice.
            extra: audit_socket.filter(|p| Some(*p) != syslog).map(Dest::open),
        }
    }

    /// Only standard error (tests, tools).
    pub fn stderr_only(ident: &str) -> Audit {
        Audit::open_at(ident, None, None)
    }

    /// Whether syslog was reachable when last tried (else lines go to standard error).
    pub fn syslog_connected(&self) -> bool {
        self.syslog.as_ref().is_some_and(Dest::is_connected)
    }

    /// An ordinary event: facility daemon, severity info.
    pub fn event(&self, conn_id: u64, uid: u32, kind: &str, fields: &[(&str, &str)]) {
        self.event_at(Facility::Daemon, Severity::Info, conn_id, uid, kind, fields);
    }

    /// An event with an explicit facility and severity.
    pub fn event_at(
        &self,
        facility: Facility,
        severity: Severity,
        conn_id: u64,
        uid: u32,
        kind: &str,
        fields: &[(&str, &str)],
    ) {
        let line = format_event(conn_id, uid, kind, fields);
        self.write_line(priority(facility, severity), &line);
    }

    fn write_line(&self, pri: u8, line: &str) {
        let msg = format!("<{pri}>{}[{}]: {line}", self.ident, self.pid);
        let mut logged = false;
        if let Some(d) = &self.syslog {
            logged = d.send(msg.as_bytes()).is_ok();
        }
        if !logged {
            // One write (stderr is unbuffered: `writeln!` would make one per piece), so lines
            // of concurrent writers never interleave. Nothing useful can be done if standard
            // error is gone too.
            let text = format!("{}[{}]: audit: {line}\n", self.ident, self.pid);
            let _ = io::stderr().write_all(text.as_bytes());
        }
        if let Some(d) = &self.extra {
            let _ = d.send(msg.as_bytes());
        }
    }
}

/// One audit line (without syslog framing): `conn=<id> uid=<n> <kind> key=value…`.
pub fn format_event(conn_id: u64, uid: u32, kind: &str, fields: &[(&str, &str)]) -> String {
    let mut line = format!("conn={conn_id} uid={uid} {}", clean_word(kind));
    for (key, value) in fields {
        line.push(' ');
        line.push_str(&clean_word(key));
        line.push('=');
        line.push_str(&escape_value(value));
    }
    line
}

/// A kind or key: `[A-Za-z0-9_.-]+`, anything else replaced by `_`.
fn clean_word(word: &str) -> Cow<'_, str> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if !word.is_empty() && word.chars().all(ok) {
        return Cow::Borrowed(word);
    }
    if word.is_empty() {
        return Cow::Borrowed("_");
    }
    Cow::Owned(word.chars().map(|c| if ok(c) { c } else { '_' }).collect())
}

/// Characters that can reorder or hide the text around them when a line is displayed.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{200b}'..='\u{200f}'   // zero-width space/joiners, LRM, RLM
        | '\u{2028}' | '\u{2029}' // line and paragraph separators
        | '\u{202a}'..='\u{202e}' // bidi embeddings and overrides
        | '\u{2060}'..='\u{2064}' // word joiner, invisible operators
        | '\u{2066}'..='\u{2069}' // bidi isolates
        | '\u{feff}'              // BOM / zero-width no-break space
    )
}

/// Append `c` to `out` escaped as text that can neither end a line nor hide or reorder what is
/// around it: `\` as `\\`, newline, carriage return and tab as `\n`, `\r`, `\t`, other control
/// characters as `\xNN`, characters that reorder or hide text (bidi controls, zero-width marks,
/// line separators) as `\u{XXXX}`, anything else as itself. A value's quoting comes on top
/// ([`escape_value`]); the master uses it alone for the lines brokers write to standard error.
pub fn push_escaped(out: &mut String, c: char) {
    match c {
        '\\' => out.push_str("\\\\"),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        // Every control character is below U+00A0, so two hex digits suffice.
        c if c.is_control() => push_hex_byte(out, u32::from(c) as u8),
        c if is_invisible_format(c) => {
            use std::fmt::Write as _;
            let _ = write!(out, "\\u{{{:04x}}}", u32::from(c));
        }
        c => out.push(c),
    }
}

/// Append `\xNN` for a byte: a control character, or a byte that is not UTF-8.
pub fn push_hex_byte(out: &mut String, b: u8) {
    use std::fmt::Write as _;
    // Writing to a String cannot fail.
    let _ = write!(out, "\\x{b:02x}");
}

/// Escape one value as described in the module documentation.
pub fn escape_value(value: &str) -> String {
    let truncated = value.chars().nth(MAX_VALUE_CHARS).is_some();
    let mut out = String::with_capacity(value.len().min(4 * MAX_VALUE_CHARS) + 2);
    let mut quote = value.is_empty() || truncated;
    for c in value.chars().take(MAX_VALUE_CHARS) {
        match c {
            '"' => {
                quote = true;
                out.push_str("\\\"");
            }
            ' ' | '=' => {
                quote = true;
                out.push(c);
            }
            c => push_escaped(&mut out, c),
        }
    }
    if truncated {
        out.push_str("…[truncated]");
    }
    if quote {
        format!("\"{out}\"")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_layout() {
        assert_eq!(
            format_event(7, 1000, "accepted", &[("user", "alice"), ("trusted", "no")]),
            "conn=7 uid=1000 accepted user=alice trusted=no"
        );
        assert_eq!(format_event(0, 0, "start", &[]), "conn=0 uid=0 start");
    }

    #[test]
    fn escaping() {
        let cases = [
            ("plain", "plain"),
            ("", "\"\""),
            ("two words", "\"two words\""),
            ("a=b", "\"a=b\""),
            (
                "line\nconn=1 uid=0 accepted",
                "\"line\\nconn=1 uid=0 accepted\"",
            ),
            ("cr\rlf", "cr\\rlf"),
            ("tab\there", "tab\\there"),
            ("ansi\x1b[31mred", "ansi\\x1b[31mred"),
            ("nul\0x", "nul\\x00x"),
            ("del\x7f", "del\\x7f"),
            ("c1\u{85}nel", "c1\\x85nel"),
            ("back\\slash", "back\\\\slash"),
            ("say \"hi\"", "\"say \\\"hi\\\"\""),
            ("q\"", "\"q\\\"\""),
            ("bidi\u{202e}txt", "bidi\\u{202e}txt"),
            ("sep\u{2028}x", "sep\\u{2028}x"),
            ("zw\u{200b}j", "zw\\u{200b}j"),
            ("bom\u{feff}", "bom\\u{feff}"),
            ("ünïcødé-ok", "ünïcødé-ok"),
            ("/nix/store/abc-x", "/nix/store/abc-x"),
        ];
        for (input, want) in cases {
            assert_eq!(escape_value(input), want, "{input:?}");
        }
    }

    /// Whatever a value holds, the formatted line is one line of printable characters, and the
    /// only `conn=` / `uid=` at a field start are the real ones (A65).
    #[test]
    fn values_cannot_forge_lines_or_fields() {
        let hostile = [
            "x\nconn=1 uid=0 accepted trusted=yes",
            "x\r\nconn=1 uid=0 accepted",
            " uid=0",
            "\" uid=0 \"",
            "\\\" uid=0",
            "\u{2028}conn=9 uid=0",
            "\x1b[2K\x1b[1Gconn=1 uid=0",
        ];
        for h in hostile {
            let line = format_event(5, 1001, "setting", &[("name", h), ("value", h)]);
            assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
            assert!(!line.contains('\u{2028}'), "{line:?}");
            let tokens = split_fields(&line);
            assert_eq!(
                tokens.first().map(String::as_str),
                Some("conn=5"),
                "{line:?}"
            );
            assert_eq!(
                tokens.get(1).map(String::as_str),
                Some("uid=1001"),
                "{line:?}"
            );
            assert_eq!(tokens.len(), 5, "{line:?} → {tokens:?}");
            assert!(tokens.iter().skip(2).all(|t| !t.starts_with("uid=")));
        }
    }

    /// A reader's split of a line into fields: spaces outside quotes, `\` escapes the next
    /// character.
    fn split_fields(line: &str) -> Vec<String> {
        let mut out = vec![String::new()];
        let (mut quoted, mut escaped) = (false, false);
        for c in line.chars() {
            let cur = out.last_mut().expect("never empty");
            if escaped {
                cur.push(c);
                escaped = false;
            } else if c == '\\' {
                cur.push(c);
                escaped = true;
            } else if c == '"' {
                cur.push(c);
                quoted = !quoted;
            } else if c == ' ' && !quoted {
                out.push(String::new());
            } else {
                cur.push(c);
            }
        }
        out
    }

    #[test]
    fn long_values_are_cut() {
        let long = "a".repeat(MAX_VALUE_CHARS + 10);
        let e = escape_value(&long);
        assert!(e.starts_with('"') && e.ends_with("…[truncated]\""));
        let body = e.trim_start_matches('"').trim_end_matches("…[truncated]\"");
        assert_eq!(body, "a".repeat(MAX_VALUE_CHARS));
        let exact = "b".repeat(MAX_VALUE_CHARS);
        assert_eq!(escape_value(&exact), exact);
    }

    #[test]
    fn keys_and_kinds_are_words() {
        assert_eq!(
            format_event(1, 2, "bad kind\n", &[("k ey=", "v"), ("", "w")]),
            "conn=1 uid=2 bad_kind_ k_ey_=v _=w"
        );
    }

    #[test]
    fn priorities() {
        assert_eq!(priority(Facility::Daemon, Severity::Info), 30);
        assert_eq!(priority(Facility::AuthPriv, Severity::Notice), 85);
        assert_eq!(priority(Facility::AuthPriv, Severity::Warning), 84);
        assert_eq!(priority(Facility::Daemon, Severity::Err), 27);
    }

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = vec![0u8; 65536];
        let n = sock.recv(&mut buf).expect("recv");
        String::from_utf8(buf.get(..n).expect("len").to_vec()).expect("utf8")
    }

    #[test]
    fn syslog_and_audit_socket_get_rfc3164_datagrams() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("log");
        let extra_path = dir.path().join("audit");
        let log = UnixDatagram::bind(&log_path).expect("bind log");
        let extra = UnixDatagram::bind(&extra_path).expect("bind audit");
        let audit = Audit::open_at("stockade", Some(&log_path), Some(&extra_path));
        assert!(audit.syslog_connected());
        audit.event_at(
            Facility::AuthPriv,
            Severity::Notice,
            3,
            1002,
            "refused",
            &[("user", "eve\nconn=3 uid=0 accepted")],
        );
        let pid = std::process::id();
        let want = format!(
            "<85>stockade[{pid}]: conn=3 uid=1002 refused user=\"eve\\nconn=3 uid=0 accepted\""
        );
        assert_eq!(recv(&log), want);
        assert_eq!(recv(&extra), want);
        audit.event(0, 0, "start", &[]);
        assert_eq!(
            recv(&log),
            format!("<30>stockade[{pid}]: conn=0 uid=0 start")
        );
    }

    #[test]
    fn reconnects_after_syslog_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log_path = dir.path().join("log");
        let log = UnixDatagram::bind(&log_path).expect("bind");
        let audit = Audit::open_at("t", Some(&log_path), None);
        audit.event(1, 1, "one", &[]);
        assert!(recv(&log).ends_with("conn=1 uid=1 one"));
        drop(log);
        std::fs::remove_file(&log_path).expect("rm");
        let log = UnixDatagram::bind(&log_path).expect("rebind");
        audit.event(2, 2, "two", &[]);
        assert!(recv(&log).ends_with("conn=2 uid=2 two"));
    }

    #[test]
    fn missing_syslog_does_not_fail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let audit = Audit::open_at("t", Some(&dir.path().join("none")), None);
        assert!(!audit.syslog_connected());
        // Goes to standard error; must not panic.
        audit.event(1, 2, "x", &[("k", "v")]);
    }
}
