//! Test harness: starts a daemon (Stockade or nix-daemon) in a private mount namespace.
