//! The store-writer's side of builds: the builder-helper's one channel (made by the master;
//! no broker can send these requests), its phases, and what each request does.

mod adopt;
mod begin;
mod checks;
mod outputs;
pub mod phase;
pub mod session;
