//! OptimiseStore: hard-links identical files of the store through `<store>/.links`.

use crate::error::ReqError;
use crate::store::Store;

/// Nix's optimiseStore (not yet).
pub fn optimise_store(_store: &Store, _log: &mut dyn FnMut(u32, String)) -> Result<(), ReqError> {
    Err(ReqError::failed(
        "store optimisation through this daemon is not supported yet",
    ))
}
