//! Who may connect and who is trusted (`allowed-users`, `trusted-users`, `build-users-group`).
//!
//! Nix 2.8.0 (`src/nix/daemon.cc`) turns the peer's uid and gid into strings — the passwd name,
//! or the decimal uid when there is no entry; the group name, or the decimal gid — and matches
//! each list entry against them:
//! - `*` matches everyone;
//! - an entry equal to the user string matches;
//! - `@NAME` matches when NAME equals the primary-group string, or when the group database entry
//!   for NAME (`getgrnam`) lists the user string among its members.
//!
//! Trusted users are allowed whatever `allowed-users` says; a peer whose primary-group string
//! equals `build-users-group` is refused even when trusted.

use std::borrow::Cow;

/// What the caller looked up about a connecting peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerFacts {
    /// From `SO_PEERCRED`.
    pub uid: u32,
    /// From `SO_PEERCRED` (the peer's primary/effective gid).
    pub gid: u32,
    /// `getpwuid(uid)->pw_name`; `None` when the uid has no passwd entry.
    pub user_name: Option<String>,
    /// `getgrgid(gid)->gr_name`; `None` when the gid has no group entry.
    pub primary_group_name: Option<String>,
    /// Names of the groups whose member list (`gr_mem`) contains [`PeerFacts::user`]. Only
    /// groups referenced as `@NAME` in the lists matter (see [`referenced_groups`]); 2.8 looks
    /// each one up by name, so only the first database entry of a name counts. Note this is the
    /// group database's member lists, not the process's runtime supplementary groups.
    pub member_of: Vec<String>,
}

impl PeerFacts {
    /// The user string 2.8 matches and prints: the passwd name, else the decimal uid.
    pub fn user(&self) -> Cow<'_, str> {
        match &self.user_name {
            Some(name) => Cow::Borrowed(name),
            None => Cow::Owned(self.uid.to_string()),
        }
    }

    /// The primary-group string: the group name, else the decimal gid.
    pub fn group(&self) -> Cow<'_, str> {
        match &self.primary_group_name {
            Some(name) => Cow::Borrowed(name),
            None => Cow::Owned(self.gid.to_string()),
        }
    }
}

/// The group names the lists refer to as `@NAME`, in order, without repeats: the caller looks
/// these up (`getgrnam`) to fill [`PeerFacts::member_of`].
pub fn referenced_groups<'a>(lists: &[&'a [String]]) -> Vec<&'a str> {
    let mut out: Vec<&'a str> = Vec::new();
    for entry in lists.iter().flat_map(|l| l.iter()) {
        if let Some(name) = entry.strip_prefix('@') {
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// From group database entries `(name, members)`, the names of the groups that list `user`.
/// When a name occurs more than once only its first entry counts, as with `getgrnam`.
pub fn groups_listing<'a, G, M>(user: &str, groups: G) -> Vec<String>
where
    G: IntoIterator<Item = (&'a str, M)>,
    M: IntoIterator<Item = &'a str>,
{
    let mut seen: Vec<&'a str> = Vec::new();
    let mut out = Vec::new();
    for (name, members) in groups {
        if seen.contains(&name) {
            continue;
        }
        seen.push(name);
        if members.into_iter().any(|m| m == user) {
            out.push(name.to_string());
        }
    }
    out
}

/// Whether `peer` matches a `trusted-users` / `allowed-users` style list.
pub fn matches_user_list(peer: &PeerFacts, list: &[String]) -> bool {
    let user = peer.user();
    let group = peer.group();
    if list.iter().any(|e| e == "*") || list.iter().any(|e| *e == *user) {
        return true;
    }
    list.iter()
        .filter_map(|e| e.strip_prefix('@'))
        .any(|name| name == group || peer.member_of.iter().any(|m| m == name))
}

/// Why a connection was refused (for the audit line; the client sees only the text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseCause {
    /// Neither in `allowed-users` nor in `trusted-users`.
    NotAllowed,
    /// Primary group is `build-users-group`.
    BuildUsersGroup,
}

/// The verdict on a connecting peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Close the connection; `reason` is nix-daemon's text.
    Refused {
        reason: String,
        cause: RefuseCause,
    },
    Allowed {
        trusted: bool,
    },
}

impl Admission {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Admission::Allowed { .. })
    }

    /// Trusted and allowed.
    pub fn is_trusted(&self) -> bool {
        matches!(self, Admission::Allowed { trusted: true })
    }

    /// Apply a command-line trust override to an allowed peer. A refusal stays a refusal:
    /// Stockade checks admission even under `--force-*` (Nix ≥ 2.16 skips the check then).
    pub fn with_override(self, o: TrustOverride) -> Admission {
        match self {
            Admission::Allowed { trusted } => Admission::Allowed {
                trusted: o.apply(trusted),
            },
            refused => refused,
        }
    }
}

/// Decide whether `peer` may connect and whether it is trusted.
///
/// `build_users_group` is the setting's value (`None` or `Some("")` when unset); it is compared
/// with the primary-group string exactly as 2.8 does, so a gid without a group entry compares as
/// its decimal form.
pub fn admit(
    peer: &PeerFacts,
    allowed_users: &[String],
    trusted_users: &[String],
    build_users_group: Option<&str>,
) -> Admission {
    let trusted = matches_user_list(peer, trusted_users);
    let refuse = |cause| Admission::Refused {
        reason: format!(
            "user '{}' is not allowed to connect to the Nix daemon",
            peer.user()
        ),
        cause,
    };
    if build_users_group.is_some_and(|g| *peer.group() == *g) {
        return refuse(RefuseCause::BuildUsersGroup);
    }
    if !trusted && !matches_user_list(peer, allowed_users) {
        return refuse(RefuseCause::NotAllowed);
    }
    Admission::Allowed { trusted }
}

/// `--force-trusted`, `--force-untrusted`, `--default-trust` (Nix ≥ 2.16 names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TrustOverride {
    #[default]
    Default,
    ForceTrusted,
    ForceUntrusted,
}

impl TrustOverride {
    /// The trust of a peer that the lists judged `trusted`.
    pub fn apply(self, trusted: bool) -> bool {
        match self {
            TrustOverride::Default => trusted,
            TrustOverride::ForceTrusted => true,
            TrustOverride::ForceUntrusted => false,
        }
    }

    /// The trust of a connection with no peer to judge (a plain `--stdio` pipe served locally):
    /// 2.8 trusts it, leaving access control to whoever set up the pipe.
    pub fn unauthenticated(self) -> bool {
        self.apply(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(list: &[&str]) -> Vec<String> {
        list.iter().map(|x| x.to_string()).collect()
    }

    fn peer(
        uid: u32,
        user: Option<&str>,
        gid: u32,
        group: Option<&str>,
        member_of: &[&str],
    ) -> PeerFacts {
        PeerFacts {
            uid,
            gid,
            user_name: user.map(str::to_string),
            primary_group_name: group.map(str::to_string),
            member_of: s(member_of),
        }
    }

    /// (what, peer, allowed-users, trusted-users, build-users-group, want: None = refused,
    /// Some(trusted)).
    type Case<'a> = (
        &'a str,
        &'a PeerFacts,
        Vec<String>,
        Vec<String>,
        Option<&'a str>,
        Option<bool>,
    );

    const ALLOWED: Option<bool> = Some(false);
    const TRUSTED: Option<bool> = Some(true);
    const REFUSED: Option<bool> = None;

    #[test]
    fn admission_table() {
        let root = peer(0, Some("root"), 0, Some("root"), &[]);
        let alice = peer(1000, Some("alice"), 100, Some("users"), &[]);
        let bob = peer(1001, Some("bob"), 100, Some("users"), &["wheel"]);
        let eve = peer(1002, Some("eve"), 100, Some("users"), &[]);
        let nixbld_member = peer(1003, Some("nixbld-member"), 30000, Some("nixbld"), &[]);
        let in_nixbld_by_membership = peer(1004, Some("carol"), 100, Some("users"), &["nixbld"]);
        let no_passwd = peer(4242, None, 100, Some("users"), &[]);
        let no_group = peer(1005, Some("dave"), 777, None, &[]);
        let nameless = peer(5000, None, 5000, None, &[]);
        let same_name = peer(1006, Some("frank"), 1006, Some("frank"), &[]);

        let star = s(&["*"]);
        let root_only = s(&["root"]);
        #[rustfmt::skip]
        let cases: Vec<Case<'_>> = vec![
            ("defaults: root trusted", &root, star.clone(), root_only.clone(), None, TRUSTED),
            ("defaults: user allowed", &alice, star.clone(), root_only.clone(), None, ALLOWED),
            ("named trusted", &alice, star.clone(), s(&["root", "alice"]), None, TRUSTED),
            ("not in allowed (A1)", &eve, s(&["alice", "bob"]), root_only.clone(), None, REFUSED),
            ("trusted implies allowed", &alice, s(&["bob"]), s(&["alice"]), None, TRUSTED),
            ("empty allowed: only trusted", &root, vec![], root_only.clone(), None, TRUSTED),
            ("empty allowed: others refused", &alice, vec![], root_only.clone(), None, REFUSED),
            ("star in trusted", &eve, vec![], star.clone(), None, TRUSTED),
            ("build group refused (A2)", &nixbld_member, star.clone(), root_only.clone(), Some("nixbld"), REFUSED),
            ("build group refused even if trusted (A2)", &nixbld_member, star.clone(), s(&["nixbld-member"]), Some("nixbld"), REFUSED),
            ("build group by membership only is not checked", &in_nixbld_by_membership, star.clone(), root_only.clone(), Some("nixbld"), ALLOWED),
            ("no build group configured", &nixbld_member, star.clone(), root_only.clone(), None, ALLOWED),
            ("empty build group never matches", &nixbld_member, star.clone(), root_only.clone(), Some(""), ALLOWED),
            ("build group compared with decimal gid", &no_group, star.clone(), root_only.clone(), Some("777"), REFUSED),
            ("@group by primary group", &alice, s(&["@users"]), root_only.clone(), None, ALLOWED),
            ("@group by membership (A3)", &bob, s(&["@wheel"]), root_only.clone(), None, ALLOWED),
            ("@group membership makes trusted (A3)", &bob, vec![], s(&["@wheel"]), None, TRUSTED),
            ("@group not a member", &alice, s(&["@wheel"]), root_only.clone(), None, REFUSED),
            ("bare group name is a user name", &bob, s(&["wheel"]), root_only.clone(), None, REFUSED),
            ("uid without passwd entry (A3)", &no_passwd, s(&["4242"]), root_only.clone(), None, ALLOWED),
            ("uid without passwd entry, not listed", &no_passwd, s(&["alice"]), root_only.clone(), None, REFUSED),
            ("uid without passwd entry, star", &no_passwd, star.clone(), root_only.clone(), None, ALLOWED),
            ("gid without group entry as @decimal", &no_group, s(&["@777"]), root_only.clone(), None, ALLOWED),
            ("@decimal uid is not the user", &no_passwd, s(&["@4242"]), root_only.clone(), None, REFUSED),
            ("decimal uid when a name exists does not match", &alice, s(&["1000"]), root_only.clone(), None, REFUSED),
            ("decimal gid when a name exists does not match", &alice, s(&["@100"]), root_only.clone(), None, REFUSED),
            ("nameless peer trusted by decimal uid", &nameless, vec![], s(&["5000"]), None, TRUSTED),
            ("case sensitive", &alice, s(&["Alice"]), root_only.clone(), None, REFUSED),
            ("no globbing", &alice, s(&["al*"]), root_only.clone(), None, REFUSED),
            ("no trimming", &alice, s(&["alice "]), root_only.clone(), None, REFUSED),
            ("lone @ matches nothing", &alice, s(&["@"]), root_only.clone(), None, REFUSED),
            ("@user name that is also the primary group", &same_name, s(&["@frank"]), root_only.clone(), None, ALLOWED),
            ("root not special without listing", &root, s(&["alice"]), s(&["alice"]), None, REFUSED),
        ];
        for (what, p, allowed, trusted, bug, want) in cases {
            let got = admit(p, &allowed, &trusted, bug);
            match (want, &got) {
                (Some(t), Admission::Allowed { trusted }) => assert_eq!(*trusted, t, "{what}"),
                (None, Admission::Refused { reason, .. }) => assert_eq!(
                    reason,
                    &format!(
                        "user '{}' is not allowed to connect to the Nix daemon",
                        p.user()
                    ),
                    "{what}"
                ),
                _ => panic!("{what}: expected {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn refusal_text_and_cause() {
        let eve = peer(1002, Some("eve"), 100, Some("users"), &[]);
        assert_eq!(
            admit(&eve, &s(&["alice"]), &s(&["root"]), None),
            Admission::Refused {
                reason: "user 'eve' is not allowed to connect to the Nix daemon".into(),
                cause: RefuseCause::NotAllowed
            }
        );
        let ghost = peer(4242, None, 30000, Some("nixbld"), &[]);
        assert_eq!(
            admit(&ghost, &s(&["*"]), &s(&["*"]), Some("nixbld")),
            Admission::Refused {
                reason: "user '4242' is not allowed to connect to the Nix daemon".into(),
                cause: RefuseCause::BuildUsersGroup
            }
        );
    }

    #[test]
    fn trust_override() {
        let alice = peer(1000, Some("alice"), 100, Some("users"), &[]);
        let eve = peer(1002, Some("eve"), 100, Some("users"), &[]);
        let allowed = s(&["alice"]);
        let trusted = s(&["alice"]);
        let cases = [
            (TrustOverride::Default, &alice, Some(true)),
            (TrustOverride::ForceUntrusted, &alice, Some(false)),
            (TrustOverride::ForceTrusted, &alice, Some(true)),
            (TrustOverride::ForceTrusted, &eve, None),
            (TrustOverride::ForceUntrusted, &eve, None),
        ];
        for (o, p, want) in cases {
            let got = admit(p, &allowed, &trusted, None).with_override(o);
            match want {
                Some(t) => assert_eq!(got, Admission::Allowed { trusted: t }, "{o:?}"),
                None => assert!(!got.is_allowed(), "{o:?}"),
            }
        }
        let bob = peer(1001, Some("bob"), 100, Some("users"), &[]);
        let got = admit(&bob, &s(&["*"]), &s(&["root"]), None);
        assert!(!got.is_trusted());
        assert!(got.with_override(TrustOverride::ForceTrusted).is_trusted());

        assert!(TrustOverride::Default.unauthenticated());
        assert!(TrustOverride::ForceTrusted.unauthenticated());
        assert!(!TrustOverride::ForceUntrusted.unauthenticated());
        assert_eq!(TrustOverride::default(), TrustOverride::Default);
    }

    #[test]
    fn group_lookup_helpers() {
        let allowed = s(&["alice", "@wheel", "*", "@dev"]);
        let trusted = s(&["@wheel", "@admins", "root"]);
        assert_eq!(
            referenced_groups(&[&allowed, &trusted]),
            vec!["wheel", "dev", "admins"]
        );

        let db: Vec<(&str, Vec<&str>)> = vec![
            ("wheel", vec!["root", "bob"]),
            ("dev", vec!["alice"]),
            ("wheel", vec!["alice"]), // duplicate name: getgrnam returns the first
            ("4242s", vec!["4242"]),
        ];
        fn iter<'a>(
            db: &'a [(&'a str, Vec<&'a str>)],
        ) -> impl Iterator<Item = (&'a str, impl Iterator<Item = &'a str>)> {
            db.iter().map(|(n, m)| (*n, m.iter().copied()))
        }
        assert_eq!(groups_listing("bob", iter(&db)), vec!["wheel"]);
        assert_eq!(groups_listing("alice", iter(&db)), vec!["dev"]);
        assert_eq!(groups_listing("4242", iter(&db)), vec!["4242s"]);
        assert!(groups_listing("eve", iter(&db)).is_empty());

        // The decimal-uid user string finds membership the same way.
        let ghost = PeerFacts {
            uid: 4242,
            gid: 100,
            user_name: None,
            primary_group_name: Some("users".into()),
            member_of: groups_listing("4242", iter(&db)),
        };
        assert!(admit(&ghost, &s(&["@4242s"]), &[], None).is_allowed());
    }
}
