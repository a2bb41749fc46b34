//! Nix worker protocol primitives (PROTOCOL.md §1–§4): constants, the hardened wire reader and
//! buffered writer, framed streams, the stderr/logger channel, the handshake and SetOptions.
//!
//! The primitives know nothing about stores, hashes or store-path syntax: paths are plain
//! strings there. [`request`] builds on them: each operation read whole, its store paths
//! validated. Every reader is bounded by [`Limits`] and never allocates from a length it has
//! not checked against a bound, so it is safe to feed hostile input (see
//! `fuzz/fuzz_targets/worker_wire.rs` and `worker_request.rs`).
//!
//! Version gating: everything compares against the *negotiated* minor
//! (`min(client, PROTOCOL_VERSION)`): the trust flag at 35 and the feature sets at 38 are
//! handshake steps, `BuildResult`'s CPU times at 37 are written by the broker; 36 changed
//! nothing on the wire that a daemon sends or reads.

/// Nix's highlighting of the arguments in error messages (`ANSI_WARNING` … `ANSI_NORMAL`, its
/// `hintfmt`); clients strip the escapes when their stderr is not a terminal, and tests compare
/// the exact bytes, so every process renders them alike.
pub fn hl(s: impl std::fmt::Display) -> String {
    format!("\x1b[35;1m{s}\x1b[0m")
}

mod framed;
mod handshake;
mod options;
pub mod request;
mod stderr;
mod wire;

#[cfg(test)]
mod real_client_tests;

pub use framed::{FramedReader, FramedWriter, DEFAULT_FRAME_CHUNK};
pub use handshake::{
    client_handshake, server_handshake, ClientInfo, DaemonInfo, TrustFlag, SUPPORTED_FEATURES,
};
pub use options::ClientOptions;
pub use request::{Request, RequestLimits};
pub use stderr::{ActivityType, ErrorInfo, Field, ResultType, StderrMsg, Verbosity};
pub use wire::{Limits, WireError, WireReader, WireWriter};

/// Sent by the client first (bytes `cxin` on the wire).
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// The server's answer to [`WORKER_MAGIC_1`] (bytes `oixd`).
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

/// The protocol version we advertise: 1.38, what Nix 2.24 to 2.26 speak.
pub const PROTOCOL_VERSION: u64 = protocol_version(1, 38);

/// Oldest client version a 2.8 daemon accepts (1.10).
pub const MIN_CLIENT_VERSION: u64 = 0x10a;

/// Version string sent to clients in handshake step 6 (minor ≥ 33); `nix store info` prints
/// it. The first Nix release that speaks our protocol version, then Stockade's own version as
/// semver build metadata: tools that compare Nix versions (split on dots, or semver) see
/// 2.24.0 and keep working, and a person reading it sees Stockade.
pub const DAEMON_VERSION: &str = concat!("2.24.0+stockade.", env!("CARGO_PKG_VERSION"));

/// Builds a wire version number from its parts.
pub const fn protocol_version(major: u8, minor: u8) -> u64 {
    ((major as u64) << 8) | minor as u64
}

/// Nix's `GET_PROTOCOL_MAJOR`: the major part *still shifted* (`v & 0xff00`, 1.x → `0x100`).
pub const fn get_major(version: u64) -> u64 {
    version & 0xff00
}

/// Nix's `GET_PROTOCOL_MINOR`: `v & 0xff`.
pub const fn get_minor(version: u64) -> u8 {
    (version & 0xff) as u8
}

/// Stderr channel message codes (PROTOCOL.md §3).
#[derive(Debug, Clone, Copy)]
pub struct StderrCode;

impl StderrCode {
    pub const NEXT: u64 = 0x6f6c_6d67;
    pub const READ: u64 = 0x6461_7461;
    pub const WRITE: u64 = 0x6461_7416;
    pub const LAST: u64 = 0x616c_7473;
    pub const ERROR: u64 = 0x6378_7470;
    pub const START_ACTIVITY: u64 = 0x5354_5254;
    pub const STOP_ACTIVITY: u64 = 0x5354_4f50;
    pub const RESULT: u64 = 0x5253_4c54;
}

/// Error for an op number that is not in the table; the text is what nix-daemon sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid operation {0}")]
pub struct InvalidOp(pub u64);

macro_rules! ops {
    ($($name:ident = $n:literal,)*) => {
        /// Worker operations (PROTOCOL.md §4). Numbers 2, 15 and 17 do not exist; 24 and 25
        /// exist but a 2.8 daemon answers them with "invalid operation".
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u64)]
        pub enum Op {
            $($name = $n,)*
        }

        impl Op {
            /// Every op, in numeric order.
            pub const ALL: &'static [Op] = &[$(Op::$name,)*];

            /// The Nix name without the `wop` prefix, e.g. `"IsValidPath"`.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Op::$name => stringify!($name),)*
                }
            }
        }

        impl TryFrom<u64> for Op {
            type Error = InvalidOp;
            fn try_from(n: u64) -> Result<Self, InvalidOp> {
                match n {
                    $($n => Ok(Op::$name),)*
                    _ => Err(InvalidOp(n)),
                }
            }
        }
    };
}

ops! {
    IsValidPath = 1,
    HasSubstitutes = 3,
    QueryPathHash = 4,
    QueryReferences = 5,
    QueryReferrers = 6,
    AddToStore = 7,
    AddTextToStore = 8,
    BuildPaths = 9,
    EnsurePath = 10,
    AddTempRoot = 11,
    AddIndirectRoot = 12,
    SyncWithGC = 13,
    FindRoots = 14,
    ExportPath = 16,
    QueryDeriver = 18,
    SetOptions = 19,
    CollectGarbage = 20,
    QuerySubstitutablePathInfo = 21,
    QueryDerivationOutputs = 22,
    QueryAllValidPaths = 23,
    QueryFailedPaths = 24,
    ClearFailedPaths = 25,
    QueryPathInfo = 26,
    ImportPaths = 27,
    QueryDerivationOutputNames = 28,
    QueryPathFromHashPart = 29,
    QuerySubstitutablePathInfos = 30,
    QueryValidPaths = 31,
    QuerySubstitutablePaths = 32,
    QueryValidDerivers = 33,
    OptimiseStore = 34,
    VerifyStore = 35,
    BuildDerivation = 36,
    AddSignatures = 37,
    NarFromPath = 38,
    AddToStoreNar = 39,
    QueryMissing = 40,
    QueryDerivationOutputMap = 41,
    RegisterDrvOutput = 42,
    QueryRealisation = 43,
    AddMultipleToStore = 44,
    AddBuildLog = 45,
    BuildPathsWithResults = 46,
    AddPermRoot = 47,
}

impl From<Op> for u64 {
    fn from(op: Op) -> u64 {
        op as u64
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_are_the_documented_ascii() {
        assert_eq!(&WORKER_MAGIC_1.to_le_bytes()[..4], b"cxin");
        assert_eq!(&WORKER_MAGIC_2.to_le_bytes()[..4], b"oixd");
        assert_eq!(&StderrCode::LAST.to_le_bytes()[..4], b"stla");
        assert_eq!(&StderrCode::NEXT.to_le_bytes()[..4], b"gmlo");
    }

    #[test]
    fn version_helpers() {
        assert_eq!(PROTOCOL_VERSION, 0x126);
        assert_eq!(get_major(PROTOCOL_VERSION), 0x100);
        assert_eq!(get_minor(PROTOCOL_VERSION), 38);
        assert_eq!(get_minor(0x1ff), 255);
        assert_eq!(get_major(0xffff), 0xff00);
        assert_eq!(protocol_version(1, 10), MIN_CLIENT_VERSION);
        assert!(DAEMON_VERSION.starts_with("2.24.0+stockade."));
    }

    #[test]
    fn op_numbers_round_trip_and_gaps_are_rejected() {
        let mut known = 0;
        for n in 0..=64u64 {
            match Op::try_from(n) {
                Ok(op) => {
                    known += 1;
                    assert_eq!(u64::from(op), n);
                    assert!((1..=47).contains(&n));
                }
                Err(e) => {
                    assert!(matches!(n, 0 | 2 | 15 | 17) || n > 47, "{n}");
                    assert_eq!(e.to_string(), format!("invalid operation {n}"));
                }
            }
        }
        assert_eq!(known, 44);
        assert_eq!(Op::ALL.len(), 44);
        assert!(Op::ALL.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(Op::try_from(u64::MAX), Err(InvalidOp(u64::MAX)));
        assert_eq!(Op::try_from(1u64 << 32 | 1), Err(InvalidOp((1 << 32) | 1)));
        assert_eq!(Op::SetOptions as u64, 19);
        assert_eq!(Op::AddPermRoot as u64, 47);
        assert_eq!(Op::QueryPathInfo.to_string(), "QueryPathInfo");
    }
}
