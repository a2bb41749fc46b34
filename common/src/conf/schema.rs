//! What every settings struct shares: name lookup (aliases, `extra-`), setting by name,
//! printing, and applying parsed files. The structs themselves are declared with
//! [`define_settings!`](crate::conf::define_settings), one line per setting.

use super::error::{ConfError, Location, ValueError, Warning, WarningKind};
use super::parse::{self, FileSource};

/// Name, old names and shape of one setting.
#[derive(Debug, PartialEq, Eq)]
pub struct SettingDef {
    /// The canonical name (`nix show-config` prints only these).
    pub name: &'static str,
    /// Deprecated names that set the same setting.
    pub aliases: &'static [&'static str],
    /// Lists, sets and maps: `extra-NAME` appends instead of replacing.
    pub appendable: bool,
}

/// What a name given to `set` (or found in a file) stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub def: &'static SettingDef,
    /// Written `extra-NAME`: append to the setting.
    pub append: bool,
    /// The deprecated alias used, if one was (without any `extra-`).
    pub alias: Option<&'static str>,
}

/// Resolve as Nix's `Config::set`: a name or alias first; then, for `extra-X`, X (name or
/// alias) if it is a list/set/map setting. Anything else is unknown.
pub(crate) fn resolve(defs: &'static [SettingDef], name: &str) -> Option<Resolved> {
    let find = |n: &str| {
        defs.iter().find_map(|d| {
            if d.name == n {
                Some((d, None))
            } else {
                d.aliases.iter().find(|a| **a == n).map(|a| (d, Some(*a)))
            }
        })
    };
    if let Some((def, alias)) = find(name) {
        return Some(Resolved {
            def,
            append: false,
            alias,
        });
    }
    let (def, alias) = find(name.strip_prefix("extra-")?)?;
    def.appendable.then_some(Resolved {
        def,
        append: true,
        alias,
    })
}

/// Implemented by [`define_settings!`](crate::conf::define_settings).
pub(crate) trait Schema: Clone {
    fn definitions() -> &'static [SettingDef];
    /// Set the canonical setting `name`; unknown names are ignored (callers resolve first).
    fn assign_value(
        &mut self,
        name: &str,
        text: &str,
        append: bool,
        warnings: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError>;
    fn render_value(&self, name: &str) -> Option<String>;
}

pub(crate) fn set_named<S: Schema>(
    settings: &mut S,
    name: &str,
    value: &str,
    location: Option<&Location>,
) -> Result<Vec<Warning>, ConfError> {
    let mut kinds = vec![];
    match resolve(S::definitions(), name) {
        None => kinds.push(WarningKind::UnknownSetting(name.to_owned())),
        Some(r) => {
            if let Some(alias) = r.alias {
                kinds.push(WarningKind::DeprecatedAlias {
                    alias: alias.to_owned(),
                    canonical: r.def.name,
                });
            }
            settings
                .assign_value(r.def.name, value, r.append, &mut kinds)
                .map_err(|e| ConfError {
                    location: location.cloned(),
                    kind: e.into(),
                })?;
        }
    }
    Ok(kinds
        .into_iter()
        .map(|kind| Warning {
            location: location.cloned(),
            kind,
        })
        .collect())
}

pub(crate) fn get_named<S: Schema>(settings: &S, name: &str) -> Option<String> {
    let r = resolve(S::definitions(), name).filter(|r| !r.append)?;
    settings.render_value(r.def.name)
}

pub(crate) fn key_values<S: Schema>(settings: &S) -> Vec<(&'static str, String)> {
    let mut all: Vec<_> = S::definitions()
        .iter()
        .map(|d| (d.name, settings.render_value(d.name).unwrap_or_default()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    all
}

pub(crate) fn show_config<S: Schema>(settings: &S) -> String {
    let mut out = String::new();
    for (name, value) in key_values(settings) {
        out.push_str(name);
        out.push_str(" = ");
        out.push_str(&value);
        out.push('\n');
    }
    out
}

/// Apply text to a copy and keep it only if all of it applied.
pub(crate) fn apply_text<S: Schema>(
    settings: &mut S,
    contents: &[u8],
    path: &str,
    source: &mut dyn FileSource,
) -> Result<Vec<Warning>, ConfError> {
    let mut next = settings.clone();
    let mut warnings = vec![];
    parse::parse(contents, path, source, &mut |e| {
        warnings.extend(set_named(&mut next, &e.name, &e.value, Some(&e.location))?);
        Ok(())
    })?;
    *settings = next;
    Ok(warnings)
}

/// Like [`apply_text`] for a file; `Ok(None)` when it does not exist.
pub(crate) fn apply_file<S: Schema>(
    settings: &mut S,
    path: &str,
    source: &mut dyn FileSource,
) -> Result<Option<Vec<Warning>>, ConfError> {
    let mut next = settings.clone();
    let mut warnings = vec![];
    let found = parse::parse_file(path, source, &mut |e| {
        warnings.extend(set_named(&mut next, &e.name, &e.value, Some(&e.location))?);
        Ok(())
    })?;
    *settings = next;
    Ok(found.then_some(warnings))
}

/// Declare a settings struct: one public field per setting with its name, aliases and default,
/// private fields, a `defaults(..)` constructor, and the name-based API.
macro_rules! define_settings {
    (
        $(#[$meta:meta])*
        pub struct $S:ident;
        fn defaults($($p:ident : $pt:ty),* $(,)?);
        private { $($pf:ident : $pft:ty = $pdef:expr),* $(,)? }
        settings {
            $(
                $(#[$fmeta:meta])*
                $field:ident : $ty:ty = $key:literal $(| $alias:literal)* => $default:expr;
            )*
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct $S {
            $( $(#[$fmeta])* pub $field: $ty, )*
            $( $pf: $pft, )*
        }

        impl $S {
            /// Every setting's name, aliases and whether `extra-NAME` appends, in declaration
            /// order.
            pub const DEFINITIONS: &'static [$crate::conf::SettingDef] = &[$(
                $crate::conf::SettingDef {
                    name: $key,
                    aliases: &[$($alias),*],
                    appendable: <$ty as $crate::conf::value::SettingValue>::APPENDABLE,
                },
            )*];

            /// Every setting at its built-in default.
            pub fn defaults($($p: $pt),*) -> Self {
                $S { $($field: $default,)* $($pf: $pdef,)* }
            }

            /// What `name` refers to: a setting (by name or deprecated alias), possibly with
            /// `extra-`. `None` for unknown names.
            pub fn resolve(name: &str) -> Option<$crate::conf::Resolved> {
                $crate::conf::schema::resolve(Self::DEFINITIONS, name)
            }

            /// Set one setting the way `--option NAME VALUE` and a trusted client's SetOptions
            /// override do (and a `NAME = VALUE` line, minus the file): aliases and `extra-`
            /// work; an unknown name is only a warning. A bad value is an error and leaves the
            /// setting unchanged.
            pub fn set(
                &mut self,
                name: &str,
                value: &str,
            ) -> Result<Vec<$crate::conf::Warning>, $crate::conf::ConfError> {
                $crate::conf::schema::set_named(self, name, value, None)
            }

            /// The value as `nix show-config` prints it, by name or alias.
            pub fn get(&self, name: &str) -> Option<String> {
                $crate::conf::schema::get_named(self, name)
            }

            /// All `(name, value)` pairs, sorted by name.
            pub fn key_values(&self) -> Vec<(&'static str, String)> {
                $crate::conf::schema::key_values(self)
            }

            /// `nix show-config` output: `name = value` lines sorted by name.
            pub fn show_config(&self) -> String {
                $crate::conf::schema::show_config(self)
            }

            /// Apply configuration text (named `path`, which anchors relative includes, read
            /// from `source`). All or nothing: on error `self` is unchanged.
            pub fn apply_text(
                &mut self,
                contents: &[u8],
                path: &str,
                source: &mut dyn $crate::conf::FileSource,
            ) -> Result<Vec<$crate::conf::Warning>, $crate::conf::ConfError> {
                $crate::conf::schema::apply_text(self, contents, path, source)
            }

            /// Apply the file at absolute `path`; `Ok(None)` (and no change) when it does not
            /// exist. All or nothing.
            pub fn apply_file(
                &mut self,
                path: &str,
                source: &mut dyn $crate::conf::FileSource,
            ) -> Result<Option<Vec<$crate::conf::Warning>>, $crate::conf::ConfError> {
                $crate::conf::schema::apply_file(self, path, source)
            }
        }

        impl $crate::conf::schema::Schema for $S {
            fn definitions() -> &'static [$crate::conf::SettingDef] {
                Self::DEFINITIONS
            }

            fn assign_value(
                &mut self,
                name: &str,
                text: &str,
                append: bool,
                warnings: &mut Vec<$crate::conf::WarningKind>,
            ) -> Result<(), $crate::conf::ValueError> {
                let ctx = self.value_ctx();
                match name {
                    $( $key => $crate::conf::value::SettingValue::assign(
                        &mut self.$field, $key, text, append, ctx, warnings), )*
                    _ => Ok(()),
                }
            }

            fn render_value(&self, name: &str) -> Option<String> {
                match name {
                    $( $key => Some($crate::conf::value::SettingValue::render(&self.$field)), )*
                    _ => None,
                }
            }
        }
    };
}
pub(crate) use define_settings;
