//! What the builder-helper may ask at each point of its session, as `crate::phase` decides
//! for brokers. The session is before `Hello` or ready; each request about a build is judged
//! by that build's phase (never begun, or open between `BeginBuild` and `EndBuild`).
//! [`permitted`] is the one place that decides; anything it does not allow closes the channel.

use stockade_common::ipc::msg::BuilderToStoreWriter as Req;

/// The kind of a request, readable from its first byte (bincode's variant index) before
/// anything else is decoded, so the size limit is the kind's (A68).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hello,
    BeginBuild,
    RegisterOutputs,
    StoreBuildLog,
    EndBuild,
}

impl Kind {
    /// In wire order.
    const ALL: [Kind; 5] = [
        Kind::Hello,
        Kind::BeginBuild,
        Kind::RegisterOutputs,
        Kind::StoreBuildLog,
        Kind::EndBuild,
    ];

    pub fn from_head(head: &[u8]) -> Option<Kind> {
        // A variant index below 251 is that one byte.
        let tag = *head.first()?;
        Kind::ALL.get(usize::from(tag)).copied()
    }

    pub fn of(req: &Req) -> Option<Kind> {
        Some(match req {
            Req::Hello { .. } => Kind::Hello,
            Req::BeginBuild { .. } => Kind::BeginBuild,
            Req::RegisterOutputs { .. } => Kind::RegisterOutputs,
            Req::StoreBuildLog { .. } => Kind::StoreBuildLog,
            Req::EndBuild { .. } => Kind::EndBuild,
            // The enum is non_exhaustive across crates: a newer helper's request.
            #[allow(unreachable_patterns)]
            _ => return None,
        })
    }

    /// The most bytes an encoded request of this kind may have.
    pub fn max_bytes(self) -> usize {
        match self {
            Kind::Hello | Kind::RegisterOutputs | Kind::StoreBuildLog | Kind::EndBuild => 4 << 10,
            // Input paths and outputs of one derivation: tens of thousands of ~100-byte paths.
            Kind::BeginBuild => 8 << 20,
        }
    }
}

/// Where the session, and the build a request names, are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    BeforeHello,
    /// Ready; the build the request names has not begun (or has ended).
    NotBegun,
    /// Ready; the build the request names is open.
    Open,
}

/// Handle the request, or close the channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Handle,
    Violation(&'static str),
}

/// Whether a request of `kind` is permitted in `phase`. Exhaustive on purpose.
pub fn permitted(phase: Phase, kind: Kind) -> Verdict {
    use Kind as K;
    match phase {
        Phase::BeforeHello => match kind {
            K::Hello => Verdict::Handle,
            K::BeginBuild | K::RegisterOutputs | K::StoreBuildLog | K::EndBuild => {
                Verdict::Violation("request before Hello")
            }
        },
        Phase::NotBegun => match kind {
            K::Hello => Verdict::Violation("second Hello"),
            K::BeginBuild => Verdict::Handle,
            K::RegisterOutputs | K::StoreBuildLog | K::EndBuild => {
                Verdict::Violation("request about a build that was never begun")
            }
        },
        Phase::Open => match kind {
            K::Hello => Verdict::Violation("second Hello"),
            K::BeginBuild => Verdict::Violation("BeginBuild for a build that is open already"),
            K::RegisterOutputs | K::StoreBuildLog | K::EndBuild => Verdict::Handle,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stockade_common::ipc::builder::BuildKind;
    use stockade_common::ipc::msg::BuilderToStoreWriter as Req;

    /// The first byte of each encoded request names its kind, within its limit.
    #[test]
    fn kinds_follow_the_wire_order() {
        let p: stockade_common::store_path::StorePath =
            "hv2lxdwpbmd9zfj87n6n7z5wxhnswizx-x.drv".parse().unwrap();
        let all = [
            Req::Hello { version: 1 },
            Req::BeginBuild {
                build: 1,
                drv: p.clone(),
                inputs: vec![p.clone(); 1000],
                outputs: vec![p.clone()],
            },
            Req::RegisterOutputs {
                build: u64::MAX,
                build_uid: Some(u32::MAX),
                kind: BuildKind::Check,
            },
            Req::StoreBuildLog { build: 1 },
            Req::EndBuild { build: 1 },
        ];
        for (req, kind) in all.iter().zip(Kind::ALL) {
            let bytes = stockade_common::ipc::encode(req, 1 << 24).unwrap();
            assert_eq!(Kind::from_head(&bytes), Some(kind));
            assert_eq!(Kind::of(req), Some(kind));
            assert!(bytes.len() <= kind.max_bytes());
        }
        assert_eq!(Kind::from_head(&[5]), None);
        assert_eq!(Kind::from_head(&[]), None);
    }

    #[test]
    fn phases() {
        assert_eq!(permitted(Phase::BeforeHello, Kind::Hello), Verdict::Handle);
        assert!(matches!(
            permitted(Phase::BeforeHello, Kind::BeginBuild),
            Verdict::Violation(_)
        ));
        assert!(matches!(
            permitted(Phase::NotBegun, Kind::RegisterOutputs),
            Verdict::Violation(_)
        ));
        assert_eq!(
            permitted(Phase::NotBegun, Kind::BeginBuild),
            Verdict::Handle
        );
        assert!(matches!(
            permitted(Phase::Open, Kind::BeginBuild),
            Verdict::Violation(_)
        ));
        assert_eq!(permitted(Phase::Open, Kind::EndBuild), Verdict::Handle);
    }
}
