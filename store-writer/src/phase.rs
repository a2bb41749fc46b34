//! What a broker may ask in each phase of its session, as OpenSSH's monitor keeps a table of
//! the requests its unprivileged child may make at each point. [`permitted`] is the one place
//! that decides; it sees only the request's kind, read from its first bytes, so a request the
//! phase does not allow is refused before it is decoded (A68). Trust comes from the master's
//! `NewClient` and is judged by the `policy` crate, never by anything the broker says.

use stockade_common::ipc::msg::ReqKind;
use stockade_policy::ops::{op_allowed, Denied, Op};

/// Where a broker's session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Before the `Hello` exchange.
    BeforeHello,
    /// Ready for any request.
    Ready,
    /// At least one batch (AddMultipleToStore, ImportPaths) is open: only its own requests,
    /// queries and temp roots until it is committed or aborted.
    InBatch,
    /// A build of this session runs (the builder-helper's outputs arrive): filled in with builds.
    #[allow(dead_code)]
    Building,
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Decode it (within the kind's size limit) and handle it.
    Handle,
    /// Decode it and answer with this refusal (nix-daemon's words), audited.
    Refuse(Denied),
    /// The broker broke the protocol: close its channel without decoding.
    Violation(&'static str),
}

/// Whether a request of `kind` is permitted in `phase` for a client of this trust. Exhaustive
/// on purpose: a new request kind does not compile until every phase decides it.
pub fn permitted(phase: Phase, kind: ReqKind, trusted: bool) -> Verdict {
    use ReqKind as K;
    let trust = |op: Op| match op_allowed(op, trusted) {
        Ok(()) => Verdict::Handle,
        Err(d) => Verdict::Refuse(d),
    };
    match phase {
        Phase::BeforeHello => match kind {
            K::Hello => Verdict::Handle,
            K::IsValidPath
            | K::QueryValidPaths
            | K::QueryPathInfo
            | K::QueryReferrers
            | K::QueryValidDerivers
            | K::QueryDerivationOutputs
            | K::QueryPathFromHashPart
            | K::QueryAllValidPaths
            | K::AddToStore
            | K::AddToStoreInline
            | K::AddNar
            | K::CommitBatch
            | K::AbortBatch
            | K::AddTempRoot
            | K::AddIndirectRoot
            | K::AddPermRoot
            | K::FindRoots
            | K::AddSignatures
            | K::AddBuildLog
            | K::RegisterDrvOutput
            | K::QueryRealisation
            | K::VerifyStore
            | K::CollectGarbage
            | K::OptimiseStore
            | K::Audit => Verdict::Violation("request before Hello"),
        },
        Phase::Ready => match kind {
            K::Hello => Verdict::Violation("second Hello"),
            K::IsValidPath
            | K::QueryValidPaths
            | K::QueryPathInfo
            | K::QueryReferrers
            | K::QueryValidDerivers
            | K::QueryDerivationOutputs
            | K::QueryPathFromHashPart
            | K::QueryAllValidPaths
            | K::AddToStore
            | K::AddToStoreInline
            | K::AddNar
            | K::AddTempRoot
            | K::AddIndirectRoot
            | K::FindRoots
            | K::RegisterDrvOutput
            | K::QueryRealisation
            | K::VerifyStore
            | K::OptimiseStore
            | K::Audit => Verdict::Handle,
            // Deleting others' live paths is impossible for anyone; ignoring liveness is
            // refused by the broker and never reaches here.
            K::CollectGarbage => trust(Op::CollectGarbage {
                ignore_liveness: false,
            }),
            // No batch is open: the broker lost track of its own batches.
            K::CommitBatch | K::AbortBatch => Verdict::Violation("no batch is open"),
            K::AddPermRoot => trust(Op::AddPermRoot),
            K::AddSignatures => trust(Op::AddSignatures),
            K::AddBuildLog => trust(Op::AddBuildLog),
        },
        Phase::InBatch => match kind {
            K::IsValidPath
            | K::QueryValidPaths
            | K::QueryPathInfo
            | K::QueryReferrers
            | K::QueryValidDerivers
            | K::QueryDerivationOutputs
            | K::QueryPathFromHashPart
            | K::QueryAllValidPaths
            | K::AddNar
            | K::CommitBatch
            | K::AbortBatch
            | K::AddTempRoot
            | K::Audit => Verdict::Handle,
            K::Hello => Verdict::Violation("second Hello"),
            K::AddToStore
            | K::AddToStoreInline
            | K::AddIndirectRoot
            | K::AddPermRoot
            | K::FindRoots
            | K::AddSignatures
            | K::AddBuildLog
            | K::RegisterDrvOutput
            | K::QueryRealisation
            | K::VerifyStore
            | K::CollectGarbage
            | K::OptimiseStore => Verdict::Violation("request inside an open batch"),
        },
        Phase::Building => match kind {
            K::Hello => Verdict::Violation("second Hello"),
            K::IsValidPath
            | K::QueryValidPaths
            | K::QueryPathInfo
            | K::QueryReferrers
            | K::QueryValidDerivers
            | K::QueryDerivationOutputs
            | K::QueryPathFromHashPart
            | K::QueryAllValidPaths
            | K::AddTempRoot
            | K::AddBuildLog
            | K::Audit => Verdict::Handle,
            K::AddToStore
            | K::AddToStoreInline
            | K::AddNar
            | K::CommitBatch
            | K::AbortBatch
            | K::AddIndirectRoot
            | K::AddPermRoot
            | K::FindRoots
            | K::AddSignatures
            | K::RegisterDrvOutput
            | K::QueryRealisation
            | K::VerifyStore
            | K::CollectGarbage
            | K::OptimiseStore => Verdict::Violation("request while building"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trust_and_phases() {
        assert_eq!(
            permitted(Phase::BeforeHello, ReqKind::IsValidPath, true),
            Verdict::Violation("request before Hello")
        );
        assert_eq!(
            permitted(Phase::Ready, ReqKind::AddSignatures, true),
            Verdict::Handle
        );
        assert!(matches!(
            permitted(Phase::Ready, ReqKind::AddSignatures, false),
            Verdict::Refuse(Denied("you are not privileged to add signatures"))
        ));
        assert!(matches!(
            permitted(Phase::InBatch, ReqKind::AddSignatures, true),
            Verdict::Violation(_)
        ));
        assert!(matches!(
            permitted(Phase::Ready, ReqKind::CommitBatch, true),
            Verdict::Violation(_)
        ));
    }

    /// An add with its data inline is judged as AddToStore in every phase.
    #[test]
    fn inline_adds_are_judged_as_adds() {
        for phase in [
            Phase::BeforeHello,
            Phase::Ready,
            Phase::InBatch,
            Phase::Building,
        ] {
            for trusted in [false, true] {
                assert_eq!(
                    permitted(phase, ReqKind::AddToStoreInline, trusted),
                    permitted(phase, ReqKind::AddToStore, trusted),
                    "{phase:?}"
                );
            }
        }
        assert_eq!(
            permitted(Phase::BeforeHello, ReqKind::AddToStoreInline, true),
            Verdict::Violation("request before Hello")
        );
    }
}
