//! Pure decisions: who may connect, who is trusted, which settings and operations a client may use.
//!
//! Nothing here does I/O. The caller (the master) looks up the user and group database and the
//! configuration and passes the facts in; the verdicts are then handed to the store-writer and the
//! builder-helper, never taken from a broker.
//!
//! The rules reproduce Nix 2.8.0 (`src/nix/daemon.cc`: `matchUser` and the accept loop;
//! `src/libstore/daemon.cc`: `ClientSettings::apply` and the per-operation trust checks), with the
//! Stockade additions from SECURITY.md §2 marked where they occur.

pub mod admission;
pub mod limits;
pub mod ops;
pub mod overrides;

pub use admission::{
    admit, groups_listing, matches_user_list, referenced_groups, Admission, PeerFacts, RefuseCause,
    TrustOverride,
};
pub use limits::{clamp_cores, clamp_max_jobs};
pub use ops::{op_allowed, BuildMode, Denied, Op};
pub use overrides::{filter_override, OverrideDecision, SubstituterPolicy};
