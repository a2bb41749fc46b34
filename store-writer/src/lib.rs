//! The store-writer: the only process that writes the Nix store and its database. A thin
//! `main` hands the control channel to [`control::serve`]; each broker channel is served by
//! [`session::serve`] on a thread of its own.

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
