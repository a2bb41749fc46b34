//! The store-writer: the only process that writes the Nix store and its database. A thin
//! `main` hands the control channel to [`control::serve`]; each broker channel is served by
//! [`session::serve`] on a thread of its own.

pub mod add;
pub mod audit;
pub mod build;
pub mod buildlog;
pub mod canon;
pub mod control;
pub mod cxx_order;
pub mod db;
pub mod dbbusy;
pub mod durable;
pub mod error;
pub mod gc;
pub mod gclink;
pub mod hashing;
pub mod lockdown;
pub mod optimise;
pub mod pathlocks;
pub mod phase;
pub mod quota;
pub mod rootbudget;
pub mod roots;
pub mod roots_runtime;
pub mod session;
pub mod store;
pub mod sys;
pub mod upload;
pub mod verify;

// Test-only switches that turn a defence off, so its security test can be shown to fail
// (scripts/defences-off.sh), and `test-gc-pause`, which lets a test stop a collection.
// Never in a release build.
#[cfg(all(
    not(debug_assertions),
    any(
        feature = "without-a68",
        feature = "without-a69",
        feature = "without-a70",
        feature = "without-a71",
        feature = "without-a72",
        feature = "without-a29",
        feature = "without-a75",
        feature = "without-nofollow",
        feature = "without-roots-reader",
        feature = "without-fod-copy",
        feature = "without-v16",
        feature = "without-drv-outputs-check",
        feature = "without-a43",
        feature = "without-a28",
        feature = "test-gc-pause"
    )
))]
compile_error!("the without-* and test-* features are for test builds only");
