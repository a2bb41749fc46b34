//! Nix's `builtin:` builders that run as a process of their own inside the build sandbox: the
//! builder-helper execs its own binary as `stockade-builder-helper --builtin NAME ...` with the
//! derivation's environment, and the builder's code lives here.
//!
//! - [`fetchurl`]: `builtin:fetchurl`, the downloader of `import <nix/fetchurl.nix>`.
//! - [`unpack_channel`]: `builtin:unpack-channel`, what `nix-channel --update` builds to unpack
//!   a channel tarball.

pub mod fetchurl;
mod transfer;
pub mod unpack_channel;
