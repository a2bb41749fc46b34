//! nix.conf parsing and settings application on arbitrary bytes.
//!
//! Input: NUL-separated chunks. The first is `/etc/nix/nix.conf`, the i-th further one is
//! `/etc/nix/i.conf` (so `include 1.conf` reaches the second chunk). Besides "never panics",
//! checks that every value a loaded `Settings` prints sets back to the same value.
#![no_main]
use std::collections::BTreeMap;
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use stockade_common::conf::{parse, HostFacts, MemorySource, Settings, StockadeSettings};

fuzz_target!(|data: &[u8]| {
    let mut chunks = data.split(|&b| b == 0);
    let main = chunks.next().unwrap_or_default();
    let mut files = BTreeMap::new();
    files.insert("/etc/nix/nix.conf".to_string(), main.to_vec());
    files.insert("/etc/nix/stockade.conf".to_string(), main.to_vec());
    for (i, chunk) in chunks.take(8).enumerate() {
        files.insert(format!("/etc/nix/{}.conf", i + 1), chunk.to_vec());
    }
    let mut source = MemorySource(files);

    if let Err(e) = parse::parse_entries(main, "/etc/nix/nix.conf", &mut source) {
        let _ = e.to_string();
    }

    let host = HostFacts::generic();
    match Settings::load_with(Path::new("/etc/nix"), host.clone(), &mut source) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                let _ = w.to_string();
            }
            let settings = loaded.settings;
            let printed = settings.key_values();
            let mut copy = Settings::defaults(&host, "/etc/nix");
            for (name, value) in &printed {
                if let Err(e) = copy.set(name, value) {
                    panic!("printed value of {name} does not parse back: {value:?}: {e}");
                }
            }
            assert_eq!(copy.key_values(), printed);
            let _ = settings.show_config();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }

    match StockadeSettings::load_with(Path::new("/etc/nix"), &mut source) {
        Ok(loaded) => {
            let _ = loaded.settings.show_config();
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
