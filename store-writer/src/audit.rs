//! The store-writer's audit events, written through the shared [`stockade_common::audit`]
//! format so every Stockade process produces the same kind of line: `conn=<id> uid=<n>
//! store-writer key=value…`, fields escaped so a client cannot forge or split lines (A65).
//! The sockets are opened at start, before the process locks itself down.

use std::path::Path;

use stockade_common::audit::{self as common, Facility};
use stockade_common::ipc::msg::ClientIdentity;

const IDENT: &str = "stockade-store-writer";
/// The event kind on every line the store-writer writes; `op=` says what happened.
const KIND: &str = "store-writer";

pub use common::Severity;

/// Where audit lines go.
pub struct Audit(common::Audit);

impl Audit {
    /// Opens `/dev/log` (stderr is used when it is absent) and the optional extra datagram
    /// socket.
    pub fn open(audit_socket: Option<&str>) -> Audit {
        Audit(common::Audit::open(IDENT, audit_socket.map(Path::new)))
    }

    /// An audit sink that only writes to stderr (tests).
    pub fn stderr_only() -> Audit {
        Audit(common::Audit::open_at(IDENT, None, None))
    }

    /// One event about `client`: its pid and trust, then `fields`.
    pub fn client_event(&self, sev: Severity, client: &ClientIdentity, fields: &[(&str, &str)]) {
        let pid = client.pid.to_string();
        let mut all: Vec<(&str, &str)> = vec![
            ("pid", pid.as_str()),
            ("trusted", if client.trusted { "yes" } else { "no" }),
        ];
        all.extend_from_slice(fields);
        self.0.event_at(
            Facility::Daemon,
            sev,
            client.conn_id,
            client.uid,
            KIND,
            &all,
        );
    }

    /// An event that concerns no client (start-up, the control channel): connection 0, as the
    /// master writes its own.
    pub fn event(&self, sev: Severity, fields: &[(&str, &str)]) {
        let uid = nix::unistd::geteuid().as_raw();
        self.0.event_at(Facility::Daemon, sev, 0, uid, KIND, fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn lines_reach_the_extra_socket_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit");
        let server = UnixDatagram::bind(&path).unwrap();
        let audit = Audit(common::Audit::open_at(IDENT, None, Some(&path)));
        let client = ClientIdentity {
            conn_id: 7,
            uid: 1000,
            gid: 100,
            pid: 42,
            trusted: false,
            user_name: None,
        };
        audit.client_event(
            Severity::Notice,
            &client,
            &[("op", "add"), ("path", "x\nconn=0 uid=0")],
        );
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).unwrap();
        let line = std::str::from_utf8(&buf[..n]).unwrap();
        assert!(
            line.contains("conn=7 uid=1000 store-writer pid=42 trusted=no op=add path="),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
        assert!(!line.contains(" conn=0"), "{line}");
    }
}
