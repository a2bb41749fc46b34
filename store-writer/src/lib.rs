//! The store-writer: the only process that writes the Nix store and its database. A thin
//! `main` hands the control channel to [`control::serve`]; each broker channel is served by
//! [`session::serve`] on a thread of its own.

// `without-a71` switches the A71 defence off, to show its test can fail; never in a release.
#[cfg(all(feature = "without-a71", not(debug_assertions)))]
compile_error!("without-a71 switches a defence off; test builds only");

pub mod add;
pub mod audit;
pub mod buildlog;
pub mod canon;
pub mod control;
pub mod db;
pub mod error;
pub mod hashing;
pub mod lockdown;
pub mod roots;
pub mod session;
pub mod store;
pub mod sys;
pub mod verify;
