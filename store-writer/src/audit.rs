//! Audit lines: one event per line, `conn=<id> uid=<n>` first, every field escaped so a client
//! cannot forge or split lines (A65). Sent to syslog (`/dev/log`, facility daemon) and, when
//! configured, to an extra unix datagram socket. Both sockets are opened at start, before the
//! process locks itself down; a failed send is retried once after reconnecting.
//!
//! The few lines of datagram code are written here rather than pulled from the `syslog` crate:
//! we need one message format, no TCP/UDP transports, and control over reconnection.

use std::fmt::Write as _;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Mutex;

use stockade_common::ipc::msg::ClientIdentity;

const SYSLOG_PATH: &str = "/dev/log";
/// facility daemon (3) × 8 + severity.
const FACILITY_DAEMON: u8 = 3 << 3;
const SEV_WARNING: u8 = 4;
const SEV_NOTICE: u8 = 5;
const SEV_INFO: u8 = 6;
const TAG: &str = "stockade-store-writer";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Info,
    Notice,
    Warning,
}

impl Severity {
    fn code(self) -> u8 {
        match self {
            Severity::Info => SEV_INFO,
            Severity::Notice => SEV_NOTICE,
            Severity::Warning => SEV_WARNING,
        }
    }
}

struct Sink {
    path: PathBuf,
    sock: Option<UnixDatagram>,
}

impl Sink {
    fn open(path: PathBuf) -> Sink {
        let sock = connect(&path);
        Sink { path, sock }
    }

    /// Sends one datagram; reconnects once (syslog daemons restart) before giving up.
    fn send(&mut self, msg: &[u8]) -> bool {
        if let Some(s) = &self.sock {
            if s.send(msg).is_ok() {
                return true;
            }
        }
        self.sock = connect(&self.path);
        self.sock.as_ref().is_some_and(|s| s.send(msg).is_ok())
    }
}

fn connect(path: &PathBuf) -> Option<UnixDatagram> {
    let s = UnixDatagram::unbound().ok()?;
    s.connect(path).ok()?;
    Some(s)
}

/// Where audit lines go.
pub struct Audit {
    syslog: Mutex<Option<Sink>>,
    extra: Mutex<Option<Sink>>,
    pid: u32,
}

impl Audit {
    /// Opens `/dev/log` (stderr is used instead when it is absent) and the optional extra
    /// datagram socket.
    pub fn open(audit_socket: Option<&str>) -> Audit {
        let syslog = std::path::Path::new(SYSLOG_PATH)
            .exists()
            .then(|| Sink::open(PathBuf::from(SYSLOG_PATH)));
        let extra = audit_socket.map(|p| Sink::open(PathBuf::from(p)));
        Audit {
            syslog: Mutex::new(syslog),
            extra: Mutex::new(extra),
            pid: std::process::id(),
        }
    }

    /// An audit sink that only writes to stderr (tests).
    pub fn stderr_only() -> Audit {
        Audit {
            syslog: Mutex::new(None),
            extra: Mutex::new(None),
            pid: std::process::id(),
        }
    }

    /// Logs one event about `client`: `conn=<id> uid=<n> pid=<p> trusted=<0|1>` then `fields`.
    pub fn client_event(&self, sev: Severity, client: &ClientIdentity, fields: &[(&str, &str)]) {
        let mut line = format!(
            "conn={} uid={} pid={} trusted={}",
            client.conn_id,
            client.uid,
            client.pid,
            u8::from(client.trusted)
        );
        append_fields(&mut line, fields);
        self.emit(sev, &line);
    }

    /// Logs an event that concerns no client (start-up, the control channel).
    pub fn event(&self, sev: Severity, fields: &[(&str, &str)]) {
        let mut line = String::from("conn=- uid=-");
        append_fields(&mut line, fields);
        self.emit(sev, &line);
    }

    fn emit(&self, sev: Severity, line: &str) {
        let msg = format!(
            "<{}>{TAG}[{}]: {line}",
            FACILITY_DAEMON | sev.code(),
            self.pid
        );
        let mut sent = false;
        if let Ok(mut guard) = self.syslog.lock() {
            if let Some(sink) = guard.as_mut() {
                sent = sink.send(msg.as_bytes());
            }
        }
        if !sent {
            eprintln!("{TAG}: audit: {line}");
        }
        if let Ok(mut guard) = self.extra.lock() {
            if let Some(sink) = guard.as_mut() {
                if !sink.send(line.as_bytes()) {
                    eprintln!("{TAG}: cannot write to the audit socket");
                }
            }
        }
    }
}

fn append_fields(line: &mut String, fields: &[(&str, &str)]) {
    for (k, v) in fields {
        line.push(' ');
        line.push_str(k);
        line.push('=');
        line.push_str(&escape(v));
    }
}

/// Escapes a field value: control characters (newlines, ANSI escapes, DEL) and non-ASCII bytes
/// as `\n`, `\r`, `\t`, `\xNN`; a backslash as `\\`; values with spaces, quotes or `=` are
/// quoted, so every field stays one token and nothing can pose as another field.
pub fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    for b in v.bytes() {
        match b {
            b'\n' => out.push_str("\\n"),
            b'\r' => out.push_str("\\r"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(b as char),
            _ => {
                let _ = write!(out, "\\x{b:02x}");
            }
        }
    }
    if v.is_empty() || v.bytes().any(|b| b == b' ' || b == b'"' || b == b'=') {
        format!("\"{out}\"")
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_injection() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a\nconn=0 uid=0"), "\"a\\nconn=0 uid=0\"");
        assert_eq!(escape("\x1b[35;1mx\x1b[0m"), "\\x1b[35;1mx\\x1b[0m");
        assert_eq!(escape("é"), "\\xc3\\xa9");
        assert_eq!(escape(""), "\"\"");
        assert_eq!(escape("a\"b"), "\"a\\\"b\"");
        assert!(!escape("x\r\ny").contains('\n'));
    }

    #[test]
    fn lines_reach_the_extra_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit");
        let server = UnixDatagram::bind(&path).unwrap();
        let audit = Audit {
            syslog: Mutex::new(None),
            extra: Mutex::new(Some(Sink::open(path.clone()))),
            pid: 1,
        };
        let client = ClientIdentity {
            conn_id: 7,
            uid: 1000,
            gid: 100,
            pid: 42,
            trusted: false,
        };
        audit.client_event(
            Severity::Notice,
            &client,
            &[("op", "add"), ("path", "x\ny")],
        );
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).unwrap();
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert_eq!(line, "conn=7 uid=1000 pid=42 trusted=0 op=add path=x\\ny");
    }
}
