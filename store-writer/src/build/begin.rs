//! BeginBuild: the inputs must be valid; their closure and the outputs are held as temporary
//! roots of the build (each root taken before the path is looked at, as Nix's `addTempRoot`
//! comes before `isValidPath`) until EndBuild or the end of the helper's channel.

use std::collections::{BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use stockade_common::ipc::builder::BuildInputs;
use stockade_common::store_path::StorePath;

use crate::db::StoreDb;
use crate::error::{hl, ReqError};
use crate::roots::{add_temp_root, TempRoots};
use crate::store::Store;

/// One open build.
pub struct Build {
    pub drv: StorePath,
    /// The closure of the inputs: what outputs may refer to, besides the outputs.
    pub closure: BTreeSet<StorePath>,
    pub roots: Mutex<TempRoots>,
}

/// Opens build `id`: checks `drv` and `inputs`, roots everything. → the build and the reply.
pub fn begin(
    store: &Arc<Store>,
    db: &StoreDb,
    id: u64,
    drv: StorePath,
    inputs: Vec<StorePath>,
    outputs: Vec<StorePath>,
) -> Result<(Build, BuildInputs), ReqError> {
    crate::gc::auto_gc(store, false);
    let mut roots = TempRoots::for_build(&store.state_dir, id);
    let drv_full = store.full(&drv);
    add_temp_root(store, &mut roots, &drv)?;
    if !drv.is_derivation() || !db.is_valid(&drv)? {
        return Err(ReqError::failed(format!(
            "derivation '{}' is not valid",
            hl(&drv_full)
        )));
    }
    for p in &inputs {
        add_temp_root(store, &mut roots, p)?;
        if !db.is_valid(p)? {
            return Err(ReqError::failed(format!(
                "dependency '{}' of '{}' is not valid",
                hl(store.full(p)),
                hl(&drv_full)
            )));
        }
    }
    let mut closure = BTreeSet::new();
    let mut refs: std::collections::BTreeMap<StorePath, Vec<StorePath>> = Default::default();
    let mut todo: VecDeque<StorePath> = inputs.into_iter().collect();
    while let Some(p) = todo.pop_front() {
        if closure.contains(&p) {
            continue;
        }
        add_temp_root(store, &mut roots, &p)?;
        // A reference of a valid path is valid (the database refuses anything else).
        let info = db.query_path_info(&p)?.ok_or_else(|| {
            ReqError::failed(format!("path '{}' is not valid", hl(store.full(&p))))
        })?;
        todo.extend(
            info.references
                .iter()
                .filter(|r| !closure.contains(*r))
                .cloned(),
        );
        refs.insert(p.clone(), info.references.into_iter().collect());
        closure.insert(p);
    }
    let mut valid_outputs = Vec::new();
    for p in &outputs {
        add_temp_root(store, &mut roots, p)?;
        if db.is_valid(p)? {
            valid_outputs.push(p.clone());
        }
    }
    let reply = BuildInputs {
        closure: closure.iter().cloned().collect(),
        valid_outputs,
        references: closure
            .iter()
            .map(|p| refs.remove(p).unwrap_or_default())
            .collect(),
    };
    let build = Build {
        drv,
        closure,
        roots: Mutex::new(roots),
    };
    Ok((build, reply))
}
