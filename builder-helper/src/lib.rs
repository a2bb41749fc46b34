//! The builder-helper: runs builds in a sandbox of their own. [`sandbox`] describes and makes
//! that sandbox, [`build`] runs one derivation in it, [`service`] serves the master and the
//! brokers, [`builtin`] holds the `builtin:` builders that run as a sandboxed process.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod build;
pub mod builtin;
pub mod cgroup;
pub mod sandbox;
pub mod service;

// Test-only switches that turn one defence of the sandbox off, so its probe can be shown to
// fail (scripts/defences-off.sh). Never in a release build.
#[cfg(all(
    not(debug_assertions),
    any(
        feature = "without-caps",
        feature = "without-nnp",
        feature = "without-seccomp",
        feature = "without-landlock",
        feature = "without-netns",
        feature = "without-pidns",
        feature = "without-utsns",
        feature = "without-private-store",
        feature = "without-ro-inputs",
        feature = "without-pdeathsig",
        feature = "without-private-build-top",
        feature = "without-fd-delete",
        feature = "without-nofollow-keep",
        feature = "without-read-only-kept-dir",
        feature = "without-a54",
        feature = "without-a43",
        feature = "without-v11"
    )
))]
compile_error!("the without-* features switch defences off; they are for test builds only");
