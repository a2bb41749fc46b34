//! Whether a service may run with less confinement than it asked for (A76), and the options
//! the master hands each service for its lockdown.
//!
//! Fail closed: a service whose Landlock ruleset is not enforced at all, or whose seccomp
//! filter cannot be installed, refuses to start unless `stockade.conf` says
//! `allow-unconfined = true`. A Landlock ABI older than [`TARGET_ABI`](super::TARGET_ABI)
//! (partial enforcement: fewer rights handled) is accepted with a warning either way.

use serde::{Deserialize, Serialize};

use super::{Enforcement, LandlockStatus, LockdownError, Profile, SeccompMode};

/// What a service does when its confinement is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ConfinementPolicy {
    /// Refuse to start (the default).
    #[default]
    Required,
    /// Start anyway, with a warning (`allow-unconfined = true`).
    AllowUnconfined,
}

impl ConfinementPolicy {
    /// From the `allow-unconfined` setting.
    pub fn from_allow_unconfined(allow: bool) -> Self {
        if allow {
            ConfinementPolicy::AllowUnconfined
        } else {
            ConfinementPolicy::Required
        }
    }

    /// The word for the master's start-up audit line.
    pub fn audit_word(self) -> &'static str {
        match self {
            ConfinementPolicy::Required => "required",
            ConfinementPolicy::AllowUnconfined => "allowed-unconfined",
        }
    }
}

/// How a service locks itself down, decided by the master (stockade.conf and the command line,
/// never the environment) and sent in the service's start configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LockdownOptions {
    pub confinement: ConfinementPolicy,
    /// [`SeccompMode::Log`] only with `stockade daemon --debug-seccomp-log`.
    pub seccomp: SeccompMode,
}

/// Whether `profile` may go on with the Landlock status it got: not when nothing is enforced
/// and confinement is required.
pub fn landlock_ok(
    profile: Profile,
    landlock: &LandlockStatus,
    policy: ConfinementPolicy,
) -> Result<(), LockdownError> {
    match (landlock.enforcement, policy) {
        (Enforcement::None, ConfinementPolicy::Required) => Err(LockdownError::Unconfined {
            service: profile.name(),
            missing: format!("Landlock is not enforced ({landlock})"),
        }),
        _ => Ok(()),
    }
}

/// Whether `profile` may go on after installing its seccomp filters gave `installed`: `Ok(true)`
/// when they are in place, `Ok(false)` when they are not but that is allowed.
pub fn seccomp_ok(
    profile: Profile,
    installed: Result<(), LockdownError>,
    policy: ConfinementPolicy,
) -> Result<bool, LockdownError> {
    match (installed, policy) {
        (Ok(()), _) => Ok(true),
        (Err(e), ConfinementPolicy::Required) => Err(LockdownError::Unconfined {
            service: profile.name(),
            missing: format!("its seccomp filter cannot be installed ({e})"),
        }),
        (Err(e), ConfinementPolicy::AllowUnconfined) => {
            log::warn!(
                "the {} runs without its seccomp filter ({e}): allow-unconfined = true",
                profile.name()
            );
            Ok(false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(enforcement: Enforcement, abi: u32, note: Option<&'static str>) -> LandlockStatus {
        LandlockStatus {
            enforcement,
            abi,
            note,
        }
    }

    #[test]
    fn no_landlock_is_refused_unless_allowed() {
        let none = status(Enforcement::None, 0, Some("not-in-kernel"));
        let err = landlock_ok(Profile::StoreWriter, &none, ConfinementPolicy::Required)
            .expect_err("must refuse");
        assert_eq!(
            err.to_string(),
            "refusing to run the store-writer unconfined: Landlock is not enforced \
             (none(abi0:not-in-kernel)); set `allow-unconfined = true` in stockade.conf to \
             run it anyway"
        );
        // ABI 1 cannot allow the store-writer's renames: nothing is enforced, so the same.
        let abi1 = status(Enforcement::None, 1, Some("kernel-cannot-allow-renames"));
        assert!(landlock_ok(Profile::Broker, &abi1, ConfinementPolicy::Required).is_err());
        for s in [&none, &abi1] {
            landlock_ok(Profile::Broker, s, ConfinementPolicy::AllowUnconfined).expect("allowed");
        }
    }

    #[test]
    fn partial_and_full_landlock_are_accepted() {
        for s in [
            status(
                Enforcement::Partial,
                3,
                Some("kernel-abi-older-than-target"),
            ),
            status(Enforcement::Full, 7, None),
        ] {
            for policy in [
                ConfinementPolicy::Required,
                ConfinementPolicy::AllowUnconfined,
            ] {
                landlock_ok(Profile::StoreWriter, &s, policy).expect("accepted");
            }
        }
    }

    #[test]
    fn seccomp_failure_is_refused_unless_allowed() {
        let failed = || Err(LockdownError::Seccomp("Invalid argument".into()));
        let err = seccomp_ok(Profile::Broker, failed(), ConfinementPolicy::Required)
            .expect_err("must refuse");
        let msg = err.to_string();
        assert!(
            msg.starts_with("refusing to run the broker unconfined: its seccomp filter")
                && msg.contains("allow-unconfined = true"),
            "{msg}"
        );
        assert!(!seccomp_ok(
            Profile::Broker,
            failed(),
            ConfinementPolicy::AllowUnconfined
        )
        .expect("allowed"));
        assert!(seccomp_ok(Profile::Broker, Ok(()), ConfinementPolicy::Required).expect("ok"));
    }

    #[test]
    fn defaults_are_strict() {
        let o = LockdownOptions::default();
        assert_eq!(o.confinement, ConfinementPolicy::Required);
        assert_eq!(o.seccomp, SeccompMode::Enforce);
        assert_eq!(
            ConfinementPolicy::from_allow_unconfined(true).audit_word(),
            "allowed-unconfined"
        );
        assert_eq!(
            ConfinementPolicy::from_allow_unconfined(false).audit_word(),
            "required"
        );
    }
}
