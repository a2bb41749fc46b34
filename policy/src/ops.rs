//! Which worker operations an untrusted client may not perform (SECURITY.md §2; Nix 2.8.0
//! `performOp` in `src/libstore/daemon.cc`), and the flags it may not set.

/// BuildMode on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    Normal,
    Repair,
    Check,
}

impl BuildMode {
    pub fn from_wire(v: u64) -> Option<Self> {
        match v {
            0 => Some(BuildMode::Normal),
            1 => Some(BuildMode::Repair),
            2 => Some(BuildMode::Check),
            _ => None,
        }
    }
}

/// The part of a request that the trust rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// BuildPaths or BuildPathsWithResults.
    BuildPaths {
        mode: BuildMode,
    },
    /// BuildDerivation; `content_addressed` is the derivation's type as the server computed it
    /// (fixed-output or floating CA), never a client claim. 2.8 does not check `mode` here.
    BuildDerivation {
        content_addressed: bool,
    },
    VerifyStore {
        repair: bool,
    },
    AddSignatures,
    AddBuildLog,
    /// Protocol ≥ 1.36 only (a 2.8 client never sends it).
    AddPermRoot,
    CollectGarbage {
        ignore_liveness: bool,
    },
}

/// An operation refused; the text is what nix-daemon sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub &'static str);

/// Whether a client with this trust may perform `op`.
pub fn op_allowed(op: Op, trusted: bool) -> Result<(), Denied> {
    let deny = |text| if trusted { Ok(()) } else { Err(Denied(text)) };
    match op {
        Op::BuildPaths {
            mode: BuildMode::Repair,
        } => deny("repairing is not allowed because you are not in 'trusted-users'"),
        Op::BuildPaths { .. } => Ok(()),
        Op::BuildDerivation {
            content_addressed: false,
        } => deny("you are not privileged to build input-addressed derivations"),
        Op::BuildDerivation { .. } => Ok(()),
        Op::VerifyStore { repair: true } => deny("you are not privileged to repair paths"),
        Op::VerifyStore { .. } => Ok(()),
        Op::AddSignatures => deny("you are not privileged to add signatures"),
        Op::AddBuildLog => deny("you are not privileged to add logs"),
        Op::AddPermRoot => deny("you are not privileged to create perm roots"),
        // Refused for everyone, trusted or not.
        Op::CollectGarbage {
            ignore_liveness: true,
        } => Err(Denied("you are not allowed to ignore liveness")),
        Op::CollectGarbage { .. } => Ok(()),
    }
}

/// AddToStoreNar / AddMultipleToStore: the client's `dontCheckSigs` only counts when trusted.
pub fn effective_dont_check_sigs(requested: bool, trusted: bool) -> bool {
    requested && trusted
}

/// AddToStoreNar: the client's `ultimate` only counts when trusted.
pub fn effective_ultimate(requested: bool, trusted: bool) -> bool {
    requested && trusted
}

/// ImportPaths: signatures are checked for untrusted clients only.
pub fn import_checks_sigs(trusted: bool) -> bool {
    !trusted
}

/// FindRoots: untrusted clients see `{censored}` instead of runtime and temp root link names.
pub fn censor_roots(trusted: bool) -> bool {
    !trusted
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_table() {
        const OK: Option<&str> = None;
        #[rustfmt::skip]
        let cases: Vec<(Op, Option<&str>, Option<&str>)> = vec![
            // (op, untrusted result, trusted result)
            (Op::BuildPaths { mode: BuildMode::Normal }, OK, OK),
            (Op::BuildPaths { mode: BuildMode::Check }, OK, OK),
            (Op::BuildPaths { mode: BuildMode::Repair },
             Some("repairing is not allowed because you are not in 'trusted-users'"), OK),
            (Op::BuildDerivation { content_addressed: true }, OK, OK),
            (Op::BuildDerivation { content_addressed: false },
             Some("you are not privileged to build input-addressed derivations"), OK),
            (Op::VerifyStore { repair: false }, OK, OK),
            (Op::VerifyStore { repair: true }, Some("you are not privileged to repair paths"), OK),
            (Op::AddSignatures, Some("you are not privileged to add signatures"), OK),
            (Op::AddBuildLog, Some("you are not privileged to add logs"), OK),
            (Op::AddPermRoot, Some("you are not privileged to create perm roots"), OK),
            (Op::CollectGarbage { ignore_liveness: false }, OK, OK),
            (Op::CollectGarbage { ignore_liveness: true },
             Some("you are not allowed to ignore liveness"),
             Some("you are not allowed to ignore liveness")),
        ];
        for (op, untrusted, trusted) in cases {
            assert_eq!(
                op_allowed(op, false),
                untrusted.map_or(Ok(()), |t| Err(Denied(t))),
                "untrusted {op:?}"
            );
            assert_eq!(
                op_allowed(op, true),
                trusted.map_or(Ok(()), |t| Err(Denied(t))),
                "trusted {op:?}"
            );
        }
        assert_eq!(
            Denied("you are not privileged to add logs").to_string(),
            "you are not privileged to add logs"
        );
    }

    #[test]
    fn flags() {
        for (requested, trusted, want) in [
            (false, false, false),
            (true, false, false),
            (false, true, false),
            (true, true, true),
        ] {
            assert_eq!(effective_dont_check_sigs(requested, trusted), want);
            assert_eq!(effective_ultimate(requested, trusted), want);
        }
        assert!(import_checks_sigs(false));
        assert!(!import_checks_sigs(true));
        assert!(censor_roots(false));
        assert!(!censor_roots(true));
        assert_eq!(BuildMode::from_wire(0), Some(BuildMode::Normal));
        assert_eq!(BuildMode::from_wire(1), Some(BuildMode::Repair));
        assert_eq!(BuildMode::from_wire(2), Some(BuildMode::Check));
        assert_eq!(BuildMode::from_wire(3), None);
        assert_eq!(BuildMode::from_wire(u64::MAX), None);
    }
}
