//! SQL functions of DDL replication. The replication itself is `crate::ddl`.

use crate::error::OrRaise;
use pgrx::prelude::*;

/// Runs `ddl_cmd` here and replicates it to the group, whatever
/// `bdr.ddl_replication` says. `replication_sets` must be NULL or
/// `{default}`; `ddl_locking` overrides `bdr.ddl_locking` for the
/// statement.
#[pg_extern(volatile)]
fn replicate_ddl_command(
    ddl_cmd: &str,
    replication_sets: default!(Option<Vec<Option<String>>>, "NULL"),
    ddl_locking: default!(Option<&str>, "NULL"),
) {
    crate::ddl::replicate_ddl_command(ddl_cmd, replication_sets, ddl_locking).or_raise()
}
