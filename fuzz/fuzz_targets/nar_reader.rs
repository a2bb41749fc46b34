#![no_main]
//! NAR reader + restorer on arbitrary bytes.
//!
//! Checks, for every input: the validator and the restorer agree on acceptance; a restore never
//! creates anything outside its target (a canary directory and the target's siblings stay as
//! they were); and an accepted NAR, being canonical, dumps back to exactly the input bytes.

use std::fs;
use std::path::{Path, PathBuf};

use libfuzzer_sys::fuzz_target;
use stockade_common::nar::{dump, restore_path, validate, Limits, NarReader};

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    v.sort();
    v
}

/// Per-process scratch directory, on tmpfs when there is one (metadata-heavy loop).
fn workdir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    let root = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    root.join(format!("stockade-nar-fuzz-{}", std::process::id()))
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_entries: 20_000,
        max_nar_size: data.len() as u64,
        ..Limits::default()
    };
    let valid = validate(data, limits);

    let base = workdir();
    let _ = fs::remove_dir_all(&base);
    let canary = base.join("canary");
    let parent = base.join("t");
    fs::create_dir_all(&canary).expect("create canary");
    fs::create_dir(&parent).expect("create target parent");

    let mut reader = NarReader::with_limits(data, limits);
    let restored =
        restore_path(&mut reader, &parent.join("out")).and_then(|()| reader.finish_at_eof());

    assert_eq!(
        valid.is_ok(),
        restored.is_ok(),
        "validate: {valid:?}, restore: {restored:?}"
    );
    assert_eq!(
        names(&base),
        ["canary", "t"],
        "something escaped the target"
    );
    assert!(names(&canary).is_empty(), "canary touched");
    assert!(names(&parent).iter().all(|n| n == "out"), "sibling created");

    if restored.is_ok() {
        let mut again = Vec::new();
        dump(&parent.join("out"), &mut again).expect("dump of restored tree");
        assert!(
            again == data,
            "restore+dump is not the identity on an accepted NAR"
        );
    }
    fs::remove_dir_all(&base).expect("cleanup");
});
