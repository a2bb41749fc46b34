//! Repair mode: outputs checked before anything is built, damaged ones rebuilt, intact ones'
//! closures repaired through the derivations that made them.

use super::*;

/// A repair target with `damaged` outputs (of the named derivations); `refs`: output
/// references by name.
fn repair(
    graph: &[(&str, &[&str])],
    damaged: &[&str],
    refs: &[(&str, &[&str])],
    failing: Vec<&'static str>,
) -> Run {
    let names: Vec<&str> = graph.iter().map(|(n, _)| *n).collect();
    let mut store = Store::new(graph, &names);
    store.damaged = damaged.iter().map(|n| path(n)).collect();
    for (from, to) in refs {
        store
            .refs
            .insert(path(from), to.iter().map(|n| path(n)).collect());
    }
    build_in(store, &["top"], BuildKind::Repair, failing, false)
}

fn shown(name: &str) -> String {
    StoreDir::default().display(&path(name))
}

#[test]
fn a_repair_rebuilds_a_damaged_output_and_checks_its_inputs() {
    let r = repair(&[("top", &["dep"]), ("dep", &[])], &["top"], &[], vec![]);
    assert_eq!(r.events, vec![built("top", &[])]);
    assert_eq!(
        r.said,
        [
            format!("checking path '{}'...", shown("top")),
            format!("path '{}' is corrupted or missing!", shown("top")),
            format!("checking path '{}'...", shown("dep")),
        ]
    );
    assert!(matches!(r.outcomes["dep"], Outcome::Valid));
    let activity = format!("repairing outputs of '{}'", shown("top.drv"));
    assert!(
        r.frames
            .iter()
            .any(|f| matches!(f, Frame::Start(_, ActivityType::BUILD, t, _) if *t == activity)),
        "{:?}",
        r.frames
    );
}

#[test]
fn intact_outputs_have_their_closure_repaired_instead() {
    // top's output refers to lib's, which is damaged; lib.drv is an input of top.drv.
    let graph: &[(&str, &[&str])] = &[("top", &["lib"]), ("lib", &[])];
    let r = repair(graph, &["lib"], &[("top", &["lib"])], vec![]);
    assert_eq!(r.events, vec![built("lib", &[])]);
    assert_eq!(
        r.said,
        [
            format!("checking path '{}'...", shown("top")),
            format!("checking path '{}'...", shown("lib")),
            format!("path '{}' is corrupted or missing!", shown("lib")),
            format!(
                "found corrupted or missing path '{}' in the output closure of '{}'",
                shown("lib"),
                shown("top.drv")
            ),
        ]
    );
    assert!(
        matches!(r.outcomes["top"], Outcome::Valid),
        "{:?}",
        r.outcomes
    );

    // Nothing damaged: nothing built.
    let r = repair(graph, &[], &[("top", &["lib"])], vec![]);
    assert_eq!(r.events, vec![]);
    assert!(r.outcomes.values().all(|o| matches!(o, Outcome::Valid)));

    // The repair fails: so does the target.
    let r = repair(graph, &["lib"], &[("top", &["lib"])], vec!["lib"]);
    let Outcome::Failed { message, .. } = &r.outcomes["top"] else {
        panic!("{:?}", r.outcomes);
    };
    assert!(message.contains("could not be repaired"), "{message}");
}

#[test]
fn a_damaged_closure_path_nothing_made_cannot_be_repaired() {
    // `stray` is in top's closure, but no derivation of top's inputs made it.
    let r = repair(
        &[("top", &[]), ("stray", &[])],
        &["stray"],
        &[("top", &["stray"])],
        vec![],
    );
    assert_eq!(r.events, vec![]);
    let Outcome::Failed { message, .. } = &r.outcomes["top"] else {
        panic!("{:?}", r.outcomes);
    };
    assert_eq!(
        *message,
        format!(
            "some paths in the output closure of derivation '\x1b[35;1m{}\x1b[0m' could not be repaired",
            shown("top.drv")
        )
    );
}
