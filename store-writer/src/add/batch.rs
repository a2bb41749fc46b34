//! A batch (AddMultipleToStore, ImportPaths): every path staged in one locked staging
//! directory, then installed and registered in one transaction by `CommitBatch`.

use std::collections::BTreeSet;
use std::io::Read;
use std::sync::Arc;

use stockade_common::narinfo::PathInfo;
use stockade_common::store_path::StorePath;

use super::install::{self, Item};
use super::stage::{self, Staging};
use super::Ctx;
use crate::error::ReqError;
use crate::store::Store;

/// Open batches per connection.
pub const MAX_BATCHES: usize = 16;
/// Paths staged in one batch.
pub const MAX_BATCH_PATHS: usize = 1 << 18;

pub struct Batch {
    /// Created with the first path staged.
    staging: Option<Staging>,
    items: Vec<Item>,
    /// An add in this batch failed; everything staged was dropped.
    failed: bool,
}

impl Batch {
    pub fn new() -> Batch {
        Batch {
            staging: None,
            items: Vec::new(),
            failed: false,
        }
    }

    /// Whether an add in this batch failed (the batch can then only be aborted).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// Drops everything staged after one of the batch's adds failed.
    pub fn fail(&mut self) {
        self.items.clear();
        self.staging = None;
        self.failed = true;
    }

    pub fn paths(&self) -> BTreeSet<StorePath> {
        self.items.iter().map(|i| i.info.path.clone()).collect()
    }

    /// Stages one NAR (its evidence and references already decided).
    pub fn stage(
        &mut self,
        info: PathInfo,
        repair: bool,
        evidence: String,
        input: impl Read,
        store: &Arc<Store>,
    ) -> Result<(), ReqError> {
        if self.items.len() >= MAX_BATCH_PATHS {
            return Err(ReqError::failed(format!(
                "too many paths in one batch (at most {MAX_BATCH_PATHS})"
            )));
        }
        let staging = match &mut self.staging {
            Some(s) => s,
            None => self.staging.insert(Staging::new(store)?),
        };
        // Store path base names are unique within the batch and valid file names.
        let node = info.path.base_name().to_string();
        let made = stage::nar(staging, &node, &info, input)?;
        let seal = staging.seal(&node, &store.full(&info.path), made)?;
        self.items.push(Item {
            node,
            info,
            repair,
            evidence,
            seal: Some(seal),
        });
        Ok(())
    }

    /// Installs and registers every staged path in one transaction (all or nothing).
    pub fn commit(self, ctx: &Ctx<'_>) -> Result<(), ReqError> {
        if self.failed {
            return Err(ReqError::failed(
                "cannot commit a batch in which a path failed to import",
            ));
        }
        let Some(staging) = &self.staging else {
            return Ok(());
        };
        install::commit(ctx, staging, self.items, "addNar(batch)")?;
        Ok(())
    }
}

impl Default for Batch {
    fn default() -> Self {
        Batch::new()
    }
}
