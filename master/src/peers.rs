//! What the master looks up about a connecting peer before asking `policy`: the user and
//! primary-group names, and which `@group`s of the user lists name the user as a member.

use nix::unistd::{Gid, Group, Uid, User};
use stockade_common::ipc::PeerCred;
use stockade_policy::{groups_listing, PeerFacts};

/// Look up `cred` in the passwd and group databases. `groups` are the names the lists
/// reference as `@NAME` ([`stockade_policy::referenced_groups`]). A failed lookup counts as no
/// entry, which Nix 2.8 also does (the user is then matched by decimal uid).
pub fn peer_facts(cred: &PeerCred, groups: &[String]) -> PeerFacts {
    let user_name = User::from_uid(Uid::from_raw(cred.uid))
        .ok()
        .flatten()
        .map(|u| u.name);
    let primary_group_name = Group::from_gid(Gid::from_raw(cred.gid))
        .ok()
        .flatten()
        .map(|g| g.name);
    let mut facts = PeerFacts {
        uid: cred.uid,
        gid: cred.gid,
        user_name,
        primary_group_name,
        member_of: Vec::new(),
    };
    if !groups.is_empty() {
        let entries: Vec<(String, Vec<String>)> = groups
            .iter()
            .filter_map(|name| Group::from_name(name).ok().flatten())
            .map(|g| (g.name, g.mem))
            .collect();
        let user = facts.user().into_owned();
        facts.member_of = groups_listing(
            &user,
            entries
                .iter()
                .map(|(n, m)| (n.as_str(), m.iter().map(String::as_str))),
        );
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found() {
        let f = peer_facts(
            &PeerCred {
                pid: 1,
                uid: 0,
                gid: 0,
            },
            &["root".to_string(), "no-such-group-xyz".to_string()],
        );
        assert_eq!(f.user_name.as_deref(), Some("root"));
        assert_eq!(f.primary_group_name.as_deref(), Some("root"));
        assert_eq!(f.user(), "root");
    }

    #[test]
    fn unknown_ids_are_decimal() {
        let f = peer_facts(
            &PeerCred {
                pid: 1,
                uid: 3_999_999_999,
                gid: 3_999_999_998,
            },
            &[],
        );
        assert_eq!(f.user(), "3999999999");
        assert_eq!(f.group(), "3999999998");
        assert!(f.member_of.is_empty());
    }
}
