//! Which `SetOptions` overrides a client may make (Nix 2.8.0 `ClientSettings::apply` in
//! `src/libstore/daemon.cc`).
//!
//! In 2.8, in this order:
//! 1. `ssh-auth-sock`: ignored without a word.
//! 2. `experimental-features`: ignored; a debug line if it differs from the daemon's own value.
//! 3. A trusted client, or the names `timeout`, `repeat` (exactly; their aliases `build-timeout`
//!    and `build-repeat` do not count), `connect-timeout`, or `builders` with an empty value:
//!    applied. (`plugin-files` / `extra-plugin-files` then fail because plugins are already
//!    loaded, and the daemon prints a warning; Stockade returns that warning.)
//! 4. `substituters` or its alias `binary-caches`: each URI kept if it is in
//!    `trusted-substituters ∪ substituters`, or if it has no trailing `/` and adding one makes it
//!    so; every other URI is dropped with a warning. The filtered list is applied (even if empty).
//! 5. Anything else: ignored, with a *debug*-level line only (so a client at normal verbosity
//!    sees nothing).
//!
//! Value errors (a non-number for `timeout`, say) are the settings layer's business: 2.8 turns
//! them into a warning, not an error.

/// The daemon's own configured substituters, against which an untrusted client's list is filtered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubstituterPolicy {
    pub substituters: Vec<String>,
    pub trusted_substituters: Vec<String>,
}

impl SubstituterPolicy {
    fn contains(&self, uri: &str) -> bool {
        self.substituters.iter().any(|s| s == uri)
            || self.trusted_substituters.iter().any(|s| s == uri)
    }
}

/// What to do with one client override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverrideDecision {
    /// Set `name` to `value` for this connection, and show `warnings` to the client
    /// (warning level). For a filtered substituter list, `name` is `substituters` and `value`
    /// the kept URIs joined by spaces.
    Apply {
        name: String,
        value: String,
        warnings: Vec<String>,
    },
    /// Do not apply; show `warning` to the client (warning level).
    Ignore { warning: String },
    /// Do not apply; 2.8 logs `debug` at debug level only (visible to a client that asked for
    /// debug verbosity), or nothing.
    Silent { debug: Option<String> },
}

impl OverrideDecision {
    /// For the audit line (`allowed=yes|no`).
    pub fn is_applied(&self) -> bool {
        matches!(self, OverrideDecision::Apply { .. })
    }
}

/// Decide one override `name = value` from a client with the given trust.
pub fn filter_override(
    name: &str,
    value: &str,
    trusted: bool,
    policy: &SubstituterPolicy,
) -> OverrideDecision {
    let apply = |name: &str, value: &str| OverrideDecision::Apply {
        name: name.to_string(),
        value: value.to_string(),
        warnings: Vec::new(),
    };
    match name {
        "ssh-auth-sock" => return OverrideDecision::Silent { debug: None },
        "experimental-features" => {
            return OverrideDecision::Silent {
                debug: Some("Ignoring the client-specified experimental features".into()),
            }
        }
        _ => {}
    }
    if trusted {
        if name == "plugin-files" || name == "extra-plugin-files" {
            return OverrideDecision::Ignore {
                warning: "plugin-files set after plugins were loaded, you may need to move the \
                          flag before the subcommand"
                    .into(),
            };
        }
        return apply(name, value);
    }
    match name {
        "timeout" | "repeat" | "connect-timeout" => apply(name, value),
        "builders" if value.is_empty() => apply(name, value),
        "substituters" | "binary-caches" => filter_substituters(value, policy),
        _ => OverrideDecision::Silent {
            debug: Some(format!(
                "ignoring the client-specified setting '{name}', because it is a restricted \
                 setting and you are not a trusted user"
            )),
        },
    }
}

fn filter_substituters(value: &str, policy: &SubstituterPolicy) -> OverrideDecision {
    let mut kept: Vec<String> = Vec::new();
    let mut warnings = Vec::new();
    // Nix's tokenizeString separators.
    for uri in value
        .split([' ', '\t', '\n', '\r'])
        .filter(|t| !t.is_empty())
    {
        if policy.contains(uri) {
            kept.push(uri.to_string());
        } else if !uri.ends_with('/') && policy.contains(&format!("{uri}/")) {
            kept.push(format!("{uri}/"));
        } else {
            warnings.push(format!("ignoring untrusted substituter '{uri}'"));
        }
    }
    OverrideDecision::Apply {
        name: "substituters".into(),
        value: kept.join(" "),
        warnings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SubstituterPolicy {
        SubstituterPolicy {
            substituters: vec![
                "https://cache.nixos.org/".into(),
                "file:///srv/cache".into(),
            ],
            trusted_substituters: vec!["https://trusted.example".into()],
        }
    }

    fn restricted(name: &str) -> OverrideDecision {
        OverrideDecision::Silent {
            debug: Some(format!(
                "ignoring the client-specified setting '{name}', because it is a restricted \
                 setting and you are not a trusted user"
            )),
        }
    }

    fn apply(name: &str, value: &str, warnings: &[&str]) -> OverrideDecision {
        OverrideDecision::Apply {
            name: name.into(),
            value: value.into(),
            warnings: warnings.iter().map(|w| w.to_string()).collect(),
        }
    }

    fn untrusted(uri: &str) -> String {
        format!("ignoring untrusted substituter '{uri}'")
    }

    #[test]
    fn untrusted_table() {
        let experimental = OverrideDecision::Silent {
            debug: Some("Ignoring the client-specified experimental features".into()),
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, &str, OverrideDecision)> = vec![
            ("timeout", "10", apply("timeout", "10", &[])),
            ("repeat", "2", apply("repeat", "2", &[])),
            ("connect-timeout", "5", apply("connect-timeout", "5", &[])),
            ("builders", "", apply("builders", "", &[])),
            // 2.8 compares the canonical names only, not the aliases.
            ("build-timeout", "10", restricted("build-timeout")),
            ("build-repeat", "1", restricted("build-repeat")),
            ("builders", "ssh://evil x86_64-linux", restricted("builders")),
            ("builders", " ", restricted("builders")),
            ("max-silent-time", "0", restricted("max-silent-time")),
            ("poll-interval", "1", restricted("poll-interval")),
            // A52
            ("sandbox", "false", restricted("sandbox")),
            ("build-users-group", "", restricted("build-users-group")),
            ("sandbox-paths", "/etc", restricted("sandbox-paths")),
            ("extra-sandbox-paths", "/etc", restricted("extra-sandbox-paths")),
            ("post-build-hook", "/tmp/x", restricted("post-build-hook")),
            ("pre-build-hook", "/tmp/x", restricted("pre-build-hook")),
            ("diff-hook", "/tmp/x", restricted("diff-hook")),
            ("run-diff-hook", "true", restricted("run-diff-hook")),
            ("trusted-public-keys", "k:AAAA", restricted("trusted-public-keys")),
            ("require-sigs", "false", restricted("require-sigs")),
            ("secret-key-files", "/x", restricted("secret-key-files")),
            ("netrc-file", "/x", restricted("netrc-file")),
            ("filter-syscalls", "false", restricted("filter-syscalls")),
            ("allow-new-privileges", "true", restricted("allow-new-privileges")),
            ("trusted-substituters", "https://evil/", restricted("trusted-substituters")),
            ("extra-substituters", "https://evil/", restricted("extra-substituters")),
            ("extra-experimental-features", "flakes", restricted("extra-experimental-features")),
            ("plugin-files", "/tmp/evil.so", restricted("plugin-files")),
            ("", "", restricted("")),
            ("no-such-setting", "1", restricted("no-such-setting")),
            // Ignored for everyone.
            ("ssh-auth-sock", "/tmp/agent", OverrideDecision::Silent { debug: None }),
            ("experimental-features", "nix-command", experimental.clone()),
            // Substituters (A53).
            ("substituters", "https://cache.nixos.org/", apply("substituters", "https://cache.nixos.org/", &[])),
            ("substituters", "https://cache.nixos.org", apply("substituters", "https://cache.nixos.org/", &[])),
            ("binary-caches", "https://trusted.example", apply("substituters", "https://trusted.example", &[])),
            // Only a missing slash is tolerated, not an extra one.
            ("substituters", "https://trusted.example/", apply("substituters", "", &[&untrusted("https://trusted.example/")])),
            ("substituters", "https://evil/", apply("substituters", "", &[&untrusted("https://evil/")])),
            ("substituters", "https://cache.nixos.org//", apply("substituters", "", &[&untrusted("https://cache.nixos.org//")])),
            ("substituters", "HTTPS://cache.nixos.org/", apply("substituters", "", &[&untrusted("HTTPS://cache.nixos.org/")])),
            ("substituters", "", apply("substituters", "", &[])),
            ("substituters",
             "https://evil/\thttps://trusted.example\n\n file:///srv/cache  https://cache.nixos.org\rhttps://x",
             apply("substituters", "https://trusted.example file:///srv/cache https://cache.nixos.org/",
                   &[&untrusted("https://evil/"), &untrusted("https://x")])),
            ("substituters", "https://cache.nixos.org/ https://cache.nixos.org/",
             apply("substituters", "https://cache.nixos.org/ https://cache.nixos.org/", &[])),
        ];
        for (name, value, want) in cases {
            let got = filter_override(name, value, false, &policy());
            assert_eq!(got, want, "untrusted {name} = {value:?}");
        }
    }

    #[test]
    fn trusted_table() {
        #[rustfmt::skip]
        let cases: Vec<(&str, &str, OverrideDecision)> = vec![
            ("sandbox", "false", apply("sandbox", "false", &[])),
            ("post-build-hook", "/x", apply("post-build-hook", "/x", &[])),
            ("build-timeout", "3", apply("build-timeout", "3", &[])),
            ("builders", "ssh://b x86_64-linux", apply("builders", "ssh://b x86_64-linux", &[])),
            // Trusted substituters are not filtered.
            ("substituters", "https://evil/", apply("substituters", "https://evil/", &[])),
            ("binary-caches", "https://evil/", apply("binary-caches", "https://evil/", &[])),
            ("extra-substituters", "https://evil/", apply("extra-substituters", "https://evil/", &[])),
            // 2.8 lets the extra- form through for trusted clients.
            ("extra-experimental-features", "flakes", apply("extra-experimental-features", "flakes", &[])),
            ("ssh-auth-sock", "/tmp/agent", OverrideDecision::Silent { debug: None }),
            ("experimental-features", "flakes", OverrideDecision::Silent {
                debug: Some("Ignoring the client-specified experimental features".into()) }),
            ("plugin-files", "/x.so", OverrideDecision::Ignore { warning:
                "plugin-files set after plugins were loaded, you may need to move the flag before the subcommand".into() }),
            ("extra-plugin-files", "/x.so", OverrideDecision::Ignore { warning:
                "plugin-files set after plugins were loaded, you may need to move the flag before the subcommand".into() }),
        ];
        for (name, value, want) in cases {
            let got = filter_override(name, value, true, &policy());
            assert_eq!(got, want, "trusted {name} = {value:?}");
        }
    }

    #[test]
    fn empty_policy_drops_every_substituter() {
        let got = filter_override(
            "substituters",
            "https://cache.nixos.org/",
            false,
            &SubstituterPolicy::default(),
        );
        assert_eq!(
            got,
            apply(
                "substituters",
                "",
                &[&untrusted("https://cache.nixos.org/")]
            )
        );
        assert!(got.is_applied());
        assert!(!filter_override("sandbox", "false", false, &policy()).is_applied());
    }
}
