//! The row writes' back-end interface: what the decision flow asks of the
//! storage once it knows what to do with a row. The SPI back-end
//! (`spi::SpiRows`) is the one there is; a batching back-end (multi-row
//! inserts, COPY) or one that hands rows to parallel writers goes beside it
//! and is chosen in `Applier::new`, as pglogical's `apply_api` table
//! chooses between SPI and heap access.
//!
//! Lookups (finding the local row, its key, its writer) are not part of it:
//! they must see every write already made, whichever back-end made it.

use super::relmap::RelMap;
use bdr_core::protocol::Value;
use pgrx::pg_sys;

/// Where a local row is: the tid of the version the writer locked or wrote.
pub(super) type Tid = pg_sys::ItemPointerData;

pub(super) trait RowWriter {
    /// Inserts `new`'s remote columns `cols` into `rel`; returns where the
    /// row went, `None` when a unique index already held its values (the
    /// writer then looks again).
    fn insert(&mut self, rel: &mut RelMap, cols: &[usize], new: &[Value]) -> Option<Tid>;
    /// Sets remote columns `cols` of the row at `at` to `new`'s values.
    fn update(&mut self, rel: &mut RelMap, at: Tid, cols: &[usize], new: &[Value]);
    /// Deletes the row at `at`.
    fn delete(&mut self, rel: &mut RelMap, at: Tid);
}
