//! The roots-reader: a small process of its own that alone holds `CAP_SYS_PTRACE` (with
//! `CAP_DAC_READ_SEARCH`) to find the runtime GC roots of every process, which the
//! store-writer must not hold. It has no store access and answers one question over its
//! control channel from the master: which `(target, link)` pairs of `/proc` name paths under
//! the store directory ([`scan`]). The master relays the answer to the store-writer, which
//! checks every target is a valid store path.
//!
//! The library is the scan itself (also what the store-writer runs without a roots-reader) and
//! the control loop ([`serve`]); `main.rs` only takes the inherited descriptor.

pub mod scan;
pub mod serve;
