//! Durability without an fsync per add (durable.rs): registrations are recorded as unsynced in
//! their own transaction, a round clears them after a sync, and a start after an unclean stop
//! (here: the store dropped without its last round, no syncer thread running) de-registers
//! the paths whose contents are not what was registered.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use stockade_common::content_address::ContentAddressMethod;
use stockade_common::hash::HashAlgo;
use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;
use stockade_store_writer::audit::Audit;
use stockade_store_writer::durable;
use stockade_store_writer::store::Store;

fn durable_env() -> Env {
    Env::with(|c| c.fsync_metadata = true)
}

fn add_text(b: &mut Broker, name: &str, data: &[u8], refs: Vec<StorePath>) -> PathInfo {
    let r = b.call(
        Req::AddToStore {
            name: name.into(),
            method: ContentAddressMethod::Text,
            algo: HashAlgo::Sha256,
            references: refs,
            repair: false,
        },
        Some(data.to_vec()),
    );
    match r {
        Ok(i) => i,
        other => panic!("expected path info, got {other:?}"),
    }
}

fn add_nar(b: &mut Broker, info: &PathInfo, nar: &[u8], repair: bool) {
    let r = b.call(
        Req::AddNar {
            info: Box::new(info.clone()),
            repair,
            dont_check_sigs: false,
            batch: None,
        },
        Some(nar.to_vec()),
    );
    assert_eq!(r, Ok(()));
}

fn unsynced(store: &Store) -> Vec<String> {
    store
        .db()
        .unsynced()
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

/// Overwrites a read-only store file.
fn damage(path: &std::path::Path, with: &[u8]) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(path, with).unwrap();
}

/// Drops the store without its last round (as a killed store-writer leaves it) and opens it
/// again, recovering.
fn crash_and_restart(env: Env) -> (tempfile::TempDir, Store, durable::Recovery) {
    let Env {
        dir, store, key, ..
    } = env;
    drop(store);
    let mut cfg = config(dir.path(), vec![key.to_public().to_string()]);
    cfg.fsync_metadata = true;
    let store = Store::open(cfg, Audit::stderr_only()).unwrap();
    let rec = durable::recover(&store).unwrap();
    (dir, store, rec)
}

#[test]
fn registrations_are_recorded_and_a_round_clears_them() {
    let mut env = durable_env();
    let mut b = env.connect(false);
    let a = add_text(&mut b, "a", b"a\n", vec![]);
    let c = add_text(&mut b, "c", b"c\n", vec![a.path.clone()]);
    assert_eq!(
        unsynced(&env.store),
        vec![env.store.full(&a.path), env.store.full(&c.path)]
    );
    assert!(env.store.syncer.pending());
    assert!(env.store.syncer.round(&*env.store).unwrap().is_some());
    assert!(unsynced(&env.store).is_empty());
    assert!(!env.store.syncer.pending());
    // A re-add of a valid path writes nothing, so records nothing.
    add_text(&mut b, "a", b"a\n", vec![]);
    assert!(unsynced(&env.store).is_empty());
    b.close();
}

#[test]
fn the_syncer_thread_clears_the_table_after_adds() {
    let mut env = durable_env();
    durable::start(&env.store).unwrap();
    let mut b = env.connect(false);
    let seen = env.store.syncer.rounds();
    add_text(&mut b, "a", b"a\n", vec![]);
    add_text(&mut b, "b", b"b\n", vec![]);
    // A round is due within MAX_DELAY of the first add; allow for a slow machine.
    let mut cleared = false;
    let mut seen = seen;
    for _ in 0..30 {
        if !env
            .store
            .syncer
            .wait_rounds(seen, std::time::Duration::from_secs(10))
        {
            break;
        }
        seen = env.store.syncer.rounds();
        if unsynced(&env.store).is_empty() {
            cleared = true;
            break;
        }
    }
    assert!(
        cleared,
        "the syncer did not clear {:?}",
        unsynced(&env.store)
    );
    b.close();
}

#[test]
fn without_fsync_metadata_nothing_is_recorded() {
    let mut env = Env::new();
    assert!(!env.store.cfg.fsync_metadata);
    let mut b = env.connect(false);
    add_text(&mut b, "a", b"a\n", vec![]);
    assert!(unsynced(&env.store).is_empty());
    assert!(!env.store.syncer.pending());
    b.close();
}

#[test]
fn a_start_after_an_unclean_stop_drops_damaged_paths_and_their_referrers() {
    let mut env = durable_env();
    let sd = env.sd();
    let mut b = env.connect(false);
    let damaged = add_text(&mut b, "damaged", b"will be lost\n", vec![]);
    let referrer = add_text(&mut b, "referrer", b"refers\n", vec![damaged.path.clone()]);
    let intact = add_text(&mut b, "intact", b"intact\n", vec![]);
    let nar = tree_nar("tree");
    let mut tree = info_for(&sd, "tree", &nar, &[]);
    tree.sign(&sd, &env.key).unwrap();
    add_nar(&mut b, &tree, &nar, false);
    let gone = add_text(&mut b, "gone", b"gone\n", vec![]);
    b.close();
    assert_eq!(unsynced(&env.store).len(), 5);
    let store_dir = env.real_store();
    // What a power cut does to contents that never reached the disk.
    damage(&store_dir.join(damaged.path.base_name()), b"");
    std::fs::remove_file(store_dir.join(gone.path.base_name())).unwrap();

    let (_dir, store, rec) = crash_and_restart(env);
    assert_eq!(rec.checked, 5);
    let mut invalidated = rec.invalidated.clone();
    invalidated.sort();
    let mut want = vec![
        damaged.path.clone(),
        referrer.path.clone(),
        gone.path.clone(),
    ];
    want.sort();
    assert_eq!(invalidated, want);
    assert!(rec.kept.is_empty());
    let db = store.db();
    for p in &want {
        assert!(!db.is_valid(p).unwrap(), "{p} is still valid");
    }
    assert!(db.is_valid(&intact.path).unwrap());
    assert!(db.is_valid(&tree.path).unwrap());
    drop(db);
    assert!(unsynced(&store).is_empty(), "the table is emptied");
    // Nothing left to do at the next start.
    let again = durable::recover(&store).unwrap();
    assert_eq!(again.checked, 0);
}

#[test]
fn a_damaged_path_that_an_older_path_refers_to_is_kept_and_reported() {
    // A repair records an old path again after paths that refer to it were synced.
    let mut env = durable_env();
    let sd = env.sd();
    let mut b = env.connect(false);
    let nar = tree_nar("base");
    let mut base = info_for(&sd, "base", &nar, &[]);
    base.sign(&sd, &env.key).unwrap();
    add_nar(&mut b, &base, &nar, false);
    let user = add_text(&mut b, "user", b"uses base\n", vec![base.path.clone()]);
    env.store.syncer.round(&*env.store).unwrap();
    add_nar(&mut b, &base, &nar, true);
    b.close();
    assert_eq!(unsynced(&env.store), vec![env.store.full(&base.path)]);
    damage(
        &env.real_store().join(base.path.base_name()).join("data"),
        b"x",
    );
    let (_dir, store, rec) = crash_and_restart(env);
    assert_eq!(rec.checked, 1);
    assert!(rec.invalidated.is_empty());
    assert_eq!(rec.kept, vec![base.path.clone()]);
    assert!(store.db().is_valid(&base.path).unwrap());
    assert!(store.db().is_valid(&user.path).unwrap());
    assert!(unsynced(&store).is_empty());
}
