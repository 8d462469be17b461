//! SQL-callable functions, one file per area.

pub mod monitor;
pub mod node;
