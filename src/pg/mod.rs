//! Thin wrappers over the PostgreSQL services that more than one part of
//! bdr uses: waiting on the latch and signals, subtransactions. Nothing here
//! knows about bdr's catalogs or features; everything above may use it.

pub mod latch;
pub mod user;
pub mod xact;
