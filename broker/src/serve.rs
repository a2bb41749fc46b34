//! Serving one client once the broker has started and locked down (start.rs): greeting the
//! store-writer, then the worker protocol until the client leaves.

use crate::{builder, session, start, store};

pub fn serve(started: start::Started) -> Result<(), String> {
    let start::Started {
        cfg,
        client,
        writer,
        builder,
        db,
    } = started;
    let mut store = store::Store::new(writer, db);
    store
        .hello()
        .map_err(|e| format!("greeting the store-writer: {}", e.message))?;
    let mut session =
        session::Session::new(client, store, builder::Builder::new(Some(builder)), *cfg)
            .map_err(|e| format!("setting up the connection: {e}"))?;
    match session.serve() {
        session::End::Eof => Ok(()),
        session::End::Error(e) => {
            log::info!("connection ended: {e}");
            Ok(())
        }
    }
}
