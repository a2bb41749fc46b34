//! Audit events a broker reports (A74): brokers hold no syslog socket, so the store-writer
//! writes their lines, stamped with the connection id, uid, pid and trust the master gave this
//! session (never anything the broker claims). Refusals and builds are written as they come
//! and never dropped. Settings a client tried to override are gathered instead (A73): 4,096
//! overrides per SetOptions and SetOptions without end must not become as many lines and
//! push journald's rate limit over other users' `added` lines, so the session writes one
//! summary line when it ends, naming each setting once.

use std::collections::BTreeSet;

use stockade_common::ipc::writer::{BrokerEvent, AUDIT_OVERRIDES_MAX};

use super::Session;
use crate::audit::Severity;
use crate::error::ReqError;

/// Most distinct setting names a summary names; beyond that they are counted.
const NAMES_MAX: usize = 256;
/// Longest setting name kept in a summary (brokers cut them already).
const NAME_MAX: usize = stockade_common::ipc::writer::AUDIT_NAME_MAX;

/// The overrides a connection tried, over all its SetOptions.
#[derive(Debug, Default)]
pub(super) struct Overrides {
    calls: u64,
    tried: u64,
    allowed: BTreeSet<String>,
    ignored: BTreeSet<String>,
    unnamed: u64,
}

impl Overrides {
    fn note(&mut self, names: Vec<(String, bool)>) {
        self.calls += 1;
        for (mut name, applied) in names {
            self.tried += 1;
            if self.allowed.len() + self.ignored.len() >= NAMES_MAX {
                self.unnamed += 1;
                continue;
            }
            if name.len() > NAME_MAX {
                let mut end = NAME_MAX;
                while !name.is_char_boundary(end) {
                    end -= 1;
                }
                name.truncate(end);
            }
            if applied {
                self.allowed.insert(name);
            } else {
                self.ignored.insert(name);
            }
        }
    }
}

impl Session {
    /// Handles one [`BrokerEvent`].
    pub(super) fn broker_event(&mut self, event: BrokerEvent) -> Result<(), ReqError> {
        let audit = &self.store.audit;
        match event {
            BrokerEvent::Denied { op, reason } => audit.client_event(
                Severity::Warning,
                &self.client,
                &[
                    ("op", &op),
                    ("outcome", "denied"),
                    ("by", "broker"),
                    ("reason", &reason),
                ],
            ),
            BrokerEvent::Build { drv, result } => audit.client_event(
                Severity::Info,
                &self.client,
                &[
                    ("op", "build"),
                    ("drv", &self.store.full(&drv)),
                    ("result", &result),
                ],
            ),
            BrokerEvent::Repair { path, drv, result } => {
                let (path, drv) = (self.store.full(&path), drv.map(|d| self.store.full(&d)));
                let mut fields = vec![
                    ("op", "repairPath"),
                    ("path", path.as_str()),
                    ("result", result.as_str()),
                ];
                if let Some(d) = &drv {
                    fields.push(("drv", d));
                }
                let sev = if result == "repaired" {
                    Severity::Notice
                } else {
                    Severity::Warning
                };
                audit.client_event(sev, &self.client, &fields);
            }
            BrokerEvent::Overrides { names } => {
                if names.len() > AUDIT_OVERRIDES_MAX {
                    return Err(ReqError::Violation(
                        "too many overrides in one event".into(),
                    ));
                }
                self.overrides.note(names);
            }
            // The enum is non_exhaustive across crates.
            #[allow(unreachable_patterns)]
            _ => return Err(ReqError::Violation("unknown audit event".into())),
        }
        Ok(())
    }

    /// The connection's one line about the settings it tried to override, if it tried any.
    pub(super) fn audit_overrides(&self) {
        let o = &self.overrides;
        if o.calls == 0 || o.tried == 0 {
            return;
        }
        let join = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>().join(",");
        let (calls, tried, unnamed) = (
            o.calls.to_string(),
            o.tried.to_string(),
            o.unnamed.to_string(),
        );
        let (allowed, ignored) = (join(&o.allowed), join(&o.ignored));
        // A54: what only a trusted client may set (hooks, the sandbox, keys) is allowed as
        // nix-daemon allows it, and named in a warning.
        let restricted: BTreeSet<String> = o
            .allowed
            .iter()
            .filter(|n| restricted(n))
            .cloned()
            .collect();
        let restricted = join(&restricted);
        let mut fields = vec![
            ("op", "setOptions"),
            ("calls", calls.as_str()),
            ("tried", tried.as_str()),
            ("allowed", allowed.as_str()),
            ("ignored", ignored.as_str()),
        ];
        if !restricted.is_empty() {
            fields.push(("restricted", restricted.as_str()));
        }
        if o.unnamed > 0 {
            fields.push(("unnamed", unnamed.as_str()));
        }
        let sev = if o.ignored.is_empty() && restricted.is_empty() {
            Severity::Info
        } else {
            Severity::Warning
        };
        self.store.audit.client_event(sev, &self.client, &fields);
    }
}

/// Whether an untrusted client could not have set `name` (`policy`'s filter, nix-daemon's).
fn restricted(name: &str) -> bool {
    use stockade_policy::overrides::{filter_override, OverrideDecision, SubstituterPolicy};
    !matches!(
        filter_override(name, "", false, &SubstituterPolicy::default()),
        OverrideDecision::Apply { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_are_gathered_and_bounded() {
        let mut o = Overrides::default();
        o.note(vec![("sandbox".into(), false), ("cores".into(), true)]);
        o.note(vec![("sandbox".into(), false)]);
        assert_eq!((o.calls, o.tried, o.unnamed), (2, 3, 0));
        assert_eq!(o.ignored.len(), 1);
        for i in 0..1000 {
            o.note(vec![(format!("x{i}{}", "y".repeat(500)), false)]);
        }
        assert_eq!(o.allowed.len() + o.ignored.len(), NAMES_MAX);
        assert!(o.ignored.iter().all(|n| n.len() <= NAME_MAX));
        assert_eq!(o.tried, 1003);
        // Two names were known before the flood; the flood got the rest of the room.
        assert_eq!(o.unnamed, 1000 - (NAMES_MAX as u64 - 2));
    }

    #[test]
    fn only_what_untrusted_clients_may_not_set_is_restricted() {
        for name in [
            "post-build-hook",
            "sandbox",
            "trusted-public-keys",
            "max-silent-time",
        ] {
            assert!(restricted(name), "{name}");
        }
        for name in ["timeout", "repeat", "substituters", "builders"] {
            assert!(!restricted(name), "{name}");
        }
    }
}
