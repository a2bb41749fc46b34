//! Setting value types and how Nix 2.8 parses and prints each (`BaseSetting<T>::set` /
//! `to_string` in `libutil/config.cc`, `libstore/globals.cc`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::error::{ValueError, WarningKind};
use super::parse::{canon_path, tokenize};

/// What a value parser may need to know about the machine.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ctx {
    /// For `max-jobs = auto`.
    pub cpus: u32,
}

/// A type a setting can have.
pub(crate) trait SettingValue {
    /// Whether `extra-NAME` appends (list, set and map types only, as in Nix).
    const APPENDABLE: bool = false;
    /// Replace (or, when `append`, extend) the value from its text.
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        append: bool,
        ctx: Ctx,
        warnings: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError>;
    /// The text `nix show-config` prints.
    fn render(&self) -> String;
}

/// `true`/`yes`/`1` and `false`/`no`/`0`, nothing else (not even other case); prints
/// `true`/`false`.
impl SettingValue for bool {
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        _: bool,
        _: Ctx,
        _: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        *self = match text {
            "true" | "yes" | "1" => true,
            "false" | "no" | "0" => false,
            _ => {
                return Err(ValueError::InvalidBool {
                    name,
                    value: text.into(),
                })
            }
        };
        Ok(())
    }
    fn render(&self) -> String {
        if *self { "true" } else { "false" }.into()
    }
}

// Nix's `string2Int`: decimal with an optional sign, no blanks, no unit suffixes (in 2.8 those
// exist only for some command-line flags), a `-` refused for unsigned types, overflow refused.
// Rust's `from_str` accepts exactly that, `+` included, once the unsigned `-` case is ruled out.
macro_rules! integer_setting {
    ($($t:ty),*) => {$(
        impl SettingValue for $t {
            fn assign(
                &mut self,
                name: &'static str,
                text: &str,
                _: bool,
                _: Ctx,
                _: &mut Vec<WarningKind>,
            ) -> Result<(), ValueError> {
                let unsigned_negative = <$t>::MIN == 0 && text.starts_with('-');
                match text.parse::<$t>() {
                    Ok(n) if !unsigned_negative => {
                        *self = n;
                        Ok(())
                    }
                    _ => Err(ValueError::InvalidInteger { name, value: text.into() }),
                }
            }
            fn render(&self) -> String {
                self.to_string()
            }
        }
    )*};
}
integer_setting!(u32, u64, i64);

/// Taken verbatim (no trimming), also empty.
impl SettingValue for String {
    fn assign(
        &mut self,
        _: &'static str,
        text: &str,
        _: bool,
        _: Ctx,
        _: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        text.clone_into(self);
        Ok(())
    }
    fn render(&self) -> String {
        self.clone()
    }
}

/// Nix `Strings`: words in order, duplicates kept.
impl SettingValue for Vec<String> {
    const APPENDABLE: bool = true;
    fn assign(
        &mut self,
        _: &'static str,
        text: &str,
        append: bool,
        _: Ctx,
        _: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        if !append {
            self.clear();
        }
        self.extend(tokenize(text).map(str::to_owned));
        Ok(())
    }
    fn render(&self) -> String {
        self.join(" ")
    }
}

/// Nix `StringSet`: sorted, without duplicates.
impl SettingValue for BTreeSet<String> {
    const APPENDABLE: bool = true;
    fn assign(
        &mut self,
        _: &'static str,
        text: &str,
        append: bool,
        _: Ctx,
        _: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        if !append {
            self.clear();
        }
        self.extend(tokenize(text).map(str::to_owned));
        Ok(())
    }
    fn render(&self) -> String {
        join(self.iter())
    }
}

/// `access-tokens`: Nix's `StringMap` of `host=token`. `Debug` shows only the hosts, so the
/// tokens stay out of logs; `nix show-config` (and `Settings::show_config`) prints them, as Nix
/// does.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessTokens(pub BTreeMap<String, String>);

impl fmt::Debug for AccessTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "<redacted>")))
            .finish()
    }
}

/// Words `key=value` split at the first `=`; a key already present keeps its first value (also
/// against `extra-`); words without `=` are dropped.
impl SettingValue for AccessTokens {
    const APPENDABLE: bool = true;
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        append: bool,
        _: Ctx,
        warnings: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        if !append {
            self.0.clear();
        }
        for word in tokenize(text) {
            match word.split_once('=') {
                Some((k, v)) => {
                    self.0.entry(k.to_owned()).or_insert_with(|| v.to_owned());
                }
                None => warnings.push(WarningKind::MapEntryWithoutEquals { setting: name }),
            }
        }
        Ok(())
    }
    fn render(&self) -> String {
        join(self.0.iter().map(|(k, v)| format!("{k}={v}")))
    }
}

fn join<I: IntoIterator<Item = S>, S: AsRef<str>>(items: I) -> String {
    let mut out = String::new();
    for (i, s) in items.into_iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(s.as_ref());
    }
    out
}

/// `sandbox`: exactly `true`, `false` or `relaxed` (no `yes`/`no` here, unlike booleans).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SandboxMode {
    Enabled,
    /// Sandboxed, except derivations with `__noChroot = true`.
    Relaxed,
    Disabled,
}

impl SettingValue for SandboxMode {
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        _: bool,
        _: Ctx,
        _: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        *self = match text {
            "true" => SandboxMode::Enabled,
            "relaxed" => SandboxMode::Relaxed,
            "false" => SandboxMode::Disabled,
            _ => {
                return Err(ValueError::InvalidSandbox {
                    name,
                    value: text.into(),
                })
            }
        };
        Ok(())
    }
    fn render(&self) -> String {
        match self {
            SandboxMode::Enabled => "true",
            SandboxMode::Relaxed => "relaxed",
            SandboxMode::Disabled => "false",
        }
        .into()
    }
}

/// `max-jobs`: an unsigned 32-bit count, or `auto` = the number of online CPUs (resolved when
/// set, as Nix does; printed as the number).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaxJobs(pub u32);

impl SettingValue for MaxJobs {
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        append: bool,
        ctx: Ctx,
        warnings: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        if text == "auto" {
            self.0 = ctx.cpus.max(1);
            return Ok(());
        }
        self.0
            .assign(name, text, append, ctx, warnings)
            .map_err(|_| ValueError::InvalidMaxJobs {
                name,
                value: text.into(),
            })
    }
    fn render(&self) -> String {
        self.0.to_string()
    }
}

/// Nix's `PathSetting` with empty allowed (`build-hook`, `diff-hook`): empty means unset,
/// anything else must be absolute and is normalised lexically (`//`, `.`, `..`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptionalPath(pub Option<String>);

impl OptionalPath {
    pub fn as_deref(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl SettingValue for OptionalPath {
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        _: bool,
        _: Ctx,
        _: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        if text.is_empty() {
            self.0 = None;
            return Ok(());
        }
        match canon_path(text) {
            Some(p) => {
                self.0 = Some(p);
                Ok(())
            }
            None => Err(ValueError::NotAbsolute {
                name,
                value: text.into(),
            }),
        }
    }
    fn render(&self) -> String {
        self.0.clone().unwrap_or_default()
    }
}

/// The experimental features Nix 2.8 knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ExperimentalFeature {
    CaDerivations,
    ImpureDerivations,
    Flakes,
    NixCommand,
    RecursiveNix,
    NoUrlLiterals,
    FetchClosure,
}

impl ExperimentalFeature {
    pub const ALL: [ExperimentalFeature; 7] = [
        ExperimentalFeature::CaDerivations,
        ExperimentalFeature::ImpureDerivations,
        ExperimentalFeature::Flakes,
        ExperimentalFeature::NixCommand,
        ExperimentalFeature::RecursiveNix,
        ExperimentalFeature::NoUrlLiterals,
        ExperimentalFeature::FetchClosure,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ExperimentalFeature::CaDerivations => "ca-derivations",
            ExperimentalFeature::ImpureDerivations => "impure-derivations",
            ExperimentalFeature::Flakes => "flakes",
            ExperimentalFeature::NixCommand => "nix-command",
            ExperimentalFeature::RecursiveNix => "recursive-nix",
            ExperimentalFeature::NoUrlLiterals => "no-url-literals",
            ExperimentalFeature::FetchClosure => "fetch-closure",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }
}

impl fmt::Display for ExperimentalFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Unknown names warn and are dropped; printed sorted by name.
impl SettingValue for BTreeSet<ExperimentalFeature> {
    const APPENDABLE: bool = true;
    fn assign(
        &mut self,
        _: &'static str,
        text: &str,
        append: bool,
        _: Ctx,
        warnings: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        if !append {
            self.clear();
        }
        for word in tokenize(text) {
            match ExperimentalFeature::from_name(word) {
                Some(f) => {
                    self.insert(f);
                }
                None => warnings.push(WarningKind::UnknownExperimentalFeature(word.into())),
            }
        }
        Ok(())
    }
    fn render(&self) -> String {
        let names: BTreeSet<&str> = self.iter().map(|f| f.name()).collect();
        join(names)
    }
}

/// An inclusive range of uids, written `FIRST-LAST` (Stockade's `broker-uid-range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }

    pub fn len(&self) -> u64 {
        u64::from(self.last) - u64::from(self.first) + 1
    }

    /// Never true: a range holds at least one uid.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl SettingValue for UidRange {
    fn assign(
        &mut self,
        name: &'static str,
        text: &str,
        _: bool,
        _: Ctx,
        _: &mut Vec<WarningKind>,
    ) -> Result<(), ValueError> {
        let invalid = |reason| ValueError::Invalid {
            name,
            value: text.into(),
            reason,
        };
        let (a, b) = text
            .split_once('-')
            .ok_or_else(|| invalid("expected FIRST-LAST, e.g. 800000-865535"))?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        if !digits(a) || !digits(b) {
            return Err(invalid("expected FIRST-LAST, e.g. 800000-865535"));
        }
        let first: u32 = a.parse().map_err(|_| invalid("uid out of range"))?;
        let last: u32 = b.parse().map_err(|_| invalid("uid out of range"))?;
        if first == 0 {
            return Err(invalid("the range must not include root (uid 0)"));
        }
        // (uid_t)-1 means "no change" to setresuid and chown.
        if last == u32::MAX {
            return Err(invalid("uid 4294967295 is not a usable uid"));
        }
        if first > last {
            return Err(invalid("FIRST is greater than LAST"));
        }
        *self = UidRange { first, last };
        Ok(())
    }
    fn render(&self) -> String {
        format!("{}-{}", self.first, self.last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Ctx = Ctx { cpus: 6 };

    fn set<T: SettingValue>(v: &mut T, text: &str) -> Result<Vec<WarningKind>, ValueError> {
        let mut w = vec![];
        v.assign("s", text, false, CTX, &mut w)?;
        Ok(w)
    }

    fn append<T: SettingValue>(v: &mut T, text: &str) -> Vec<WarningKind> {
        let mut w = vec![];
        v.assign("s", text, true, CTX, &mut w).unwrap();
        w
    }

    #[test]
    fn booleans() {
        let mut b = false;
        for (t, want) in [
            ("true", true),
            ("no", false),
            ("1", true),
            ("0", false),
            ("yes", true),
            ("false", false),
        ] {
            set(&mut b, t).unwrap();
            assert_eq!(b, want, "{t}");
        }
        for bad in ["True", "on", "", " true", "2"] {
            let e = set(&mut b, bad).unwrap_err();
            assert_eq!(
                e,
                ValueError::InvalidBool {
                    name: "s",
                    value: bad.into()
                }
            );
        }
        assert!(set(&mut b, "TRUE")
            .unwrap_err()
            .to_string()
            .starts_with("Boolean setting 's' has invalid value 'TRUE'"));
        assert_eq!(true.render(), "true");
    }

    #[test]
    fn integers_as_string2int() {
        let mut u = 0u32;
        for (t, want) in [
            ("+3", 3),
            ("007", 7),
            ("4294967295", u32::MAX),
            ("000000000000000000000000001", 1),
        ] {
            set(&mut u, t).unwrap();
            assert_eq!(u, want);
        }
        for bad in [
            "-0",
            "-1",
            "4294967296",
            "",
            "+",
            "0x10",
            " 3",
            "3 ",
            "10K",
            "1.5",
            "３",
        ] {
            assert_eq!(
                set(&mut u, bad).unwrap_err().to_string(),
                format!("setting 's' has invalid value '{bad}'")
            );
        }
        let mut i = 0i64;
        for (t, want) in [
            ("-7", -7),
            ("-0", 0),
            ("+5", 5),
            ("9223372036854775807", i64::MAX),
        ] {
            set(&mut i, t).unwrap();
            assert_eq!(i, want);
        }
        for bad in ["9223372036854775808", "+-5", "--1"] {
            assert!(set(&mut i, bad).is_err(), "{bad}");
        }
        let mut w = 0u64;
        set(&mut w, "18446744073709551615").unwrap();
        assert_eq!(w.render(), "18446744073709551615");
        assert!(set(&mut w, "18446744073709551616").is_err());
    }

    #[test]
    fn strings_kept_verbatim() {
        let mut s = String::new();
        set(&mut s, "  a  b ").unwrap();
        assert_eq!(s, "  a  b ");
        set(&mut s, "").unwrap();
        assert_eq!(s.render(), "");
    }

    #[test]
    fn lists_sets_maps() {
        let mut l = vec!["x".to_string()];
        set(&mut l, "b a\tb\r\n c").unwrap();
        assert_eq!(l.render(), "b a b c");
        append(&mut l, "a");
        assert_eq!(l.render(), "b a b c a");
        set(&mut l, "").unwrap();
        assert!(l.is_empty());

        let mut s: BTreeSet<String> = BTreeSet::new();
        set(&mut s, "z y z").unwrap();
        append(&mut s, "a y");
        assert_eq!(s.render(), "a y z");

        let mut m = AccessTokens::default();
        let w = set(&mut m, "a=1 secret a=2 c=x=y =e").unwrap();
        assert_eq!(w, vec![WarningKind::MapEntryWithoutEquals { setting: "s" }]);
        assert!(!w[0].to_string().contains("secret"));
        append(&mut m, "a=3 d=4");
        assert_eq!(m.render(), "=e a=1 c=x=y d=4");
        set(&mut m, "b=2").unwrap();
        assert_eq!(m.render(), "b=2");
        assert_eq!(format!("{m:?}"), r#"{"b": "<redacted>"}"#);
    }

    #[test]
    fn sandbox_modes() {
        let mut m = SandboxMode::Enabled;
        set(&mut m, "relaxed").unwrap();
        assert_eq!(m, SandboxMode::Relaxed);
        set(&mut m, "false").unwrap();
        assert_eq!(m.render(), "false");
        for bad in ["yes", "1", "True", ""] {
            assert_eq!(
                set(&mut m, bad).unwrap_err(),
                ValueError::InvalidSandbox {
                    name: "s",
                    value: bad.into()
                }
            );
        }
    }

    #[test]
    fn max_jobs() {
        let mut j = MaxJobs(1);
        set(&mut j, "auto").unwrap();
        assert_eq!(j, MaxJobs(6));
        set(&mut j, "0").unwrap();
        assert_eq!(j.render(), "0");
        let e = set(&mut j, "Auto").unwrap_err();
        assert!(e
            .to_string()
            .starts_with("configuration setting 's' should be 'auto' or an integer"));
        assert!(set(&mut j, "-1").is_err());
    }

    #[test]
    fn optional_paths() {
        let mut p = OptionalPath::default();
        set(&mut p, "/a//b/../c/.").unwrap();
        assert_eq!(p.as_deref(), Some("/a/c"));
        set(&mut p, "").unwrap();
        assert_eq!(p, OptionalPath(None));
        let e = set(&mut p, "rel/x").unwrap_err();
        assert!(e.to_string().starts_with("not an absolute path: 'rel/x'"));
    }

    #[test]
    fn experimental_features() {
        let mut f: BTreeSet<ExperimentalFeature> = BTreeSet::new();
        let w = set(&mut f, "nix-command flakes bogus").unwrap();
        assert_eq!(
            w,
            vec![WarningKind::UnknownExperimentalFeature("bogus".into())]
        );
        append(&mut f, "ca-derivations");
        assert_eq!(f.render(), "ca-derivations flakes nix-command");
        for x in ExperimentalFeature::ALL {
            assert_eq!(ExperimentalFeature::from_name(x.name()), Some(x));
        }
    }

    #[test]
    fn uid_ranges() {
        let mut r = UidRange { first: 1, last: 1 };
        set(&mut r, "800000-865535").unwrap();
        assert_eq!(
            r,
            UidRange {
                first: 800000,
                last: 865535
            }
        );
        assert_eq!(r.len(), 65536);
        assert!(r.contains(800000) && r.contains(865535) && !r.contains(865536));
        set(&mut r, "5-5").unwrap();
        assert_eq!(r.render(), "5-5");
        for bad in [
            "",
            "5",
            "0-10",
            "10-5",
            "1-4294967295",
            "a-b",
            "+1-2",
            "1--2",
            "1-2-3",
            "1-99999999999",
            " 1-2",
        ] {
            let e = set(&mut r, bad).unwrap_err();
            assert!(matches!(e, ValueError::Invalid { .. }), "{bad}: {e}");
        }
        assert_eq!(
            r,
            UidRange { first: 5, last: 5 },
            "a failed set leaves the value alone"
        );
    }
}
