//! Garbage collection, as Nix's `collectGarbage`.

use stockade_common::ipc::msg::ClientIdentity;
use stockade_common::ipc::writer::{CollectGarbage, GcResult};

use crate::error::ReqError;
use crate::store::Store;

pub fn collect_garbage(
    _store: &Store,
    _client: &ClientIdentity,
    _req: &CollectGarbage,
    _log: &mut dyn FnMut(u32, String),
) -> Result<GcResult, ReqError> {
    Err(ReqError::failed(
        "garbage collection through this daemon is not supported yet",
    ))
}
