//! Formats and wire primitives shared by every Stockade process.
//!
//! Nothing here does privileged work: the crate is pure parsing, printing and hashing (plus the
//! thin fd-passing layer in [`ipc`]), so it can run in the unprivileged broker and be fuzzed.

// Test-only switches that turn a defence off (scripts/defences-off.sh). Never in a release
// build.
#[cfg(all(
    not(debug_assertions),
    any(
        feature = "without-a74",
        feature = "without-nar-names",
        feature = "without-nar-limits"
    )
))]
compile_error!("the without-* features switch defences off; they are for test builds only");

pub mod audit;
pub mod base32;
pub mod child;
pub mod conf;
pub mod content_address;
#[cfg(feature = "db")]
pub mod db;
pub mod derivation;
pub mod floor;
pub mod hash;
pub mod ipc;
pub mod lockdown;
pub mod nar;
pub mod narinfo;
pub mod refscan;
pub mod signature;
pub mod store_path;
pub mod worker;
