//! Formats and wire primitives shared by every Stockade process.
//!
//! Nothing here does privileged work: the crate is pure parsing, printing and hashing (plus the
//! thin fd-passing layer in [`ipc`]), so it can run in the unprivileged broker and be fuzzed.

pub mod audit;
pub mod base32;
pub mod conf;
pub mod content_address;
#[cfg(feature = "db")]
pub mod db;
pub mod derivation;
pub mod hash;
pub mod ipc;
pub mod lockdown;
pub mod nar;
pub mod narinfo;
pub mod refscan;
pub mod signature;
pub mod store_path;
pub mod worker;
