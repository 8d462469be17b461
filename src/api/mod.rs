//! SQL-callable functions, one file per area.

pub mod conflicts;
pub mod consensus;
pub mod ddl;
pub mod globallock;
pub mod join;
pub mod monitor;
pub mod node;
pub mod part;
pub mod sequence;
