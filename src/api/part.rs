//! SQL functions of leaving a group: `bdr.part_node`, `bdr.drop_node`'s
//! helpers on the members, `bdr.alter_node_interface`. The part itself is
//! `crate::part`.

use crate::catalog;
use crate::error::{BdrError, BdrResult, OrRaise};
use crate::part::*;
use bdr_core::node::NodeState;
use pgrx::prelude::*;

/// Removes a node from its group: its last changes reach every member,
/// then every member forgets it and drops the replication slot and origin
/// that served it, and its own workers stop.
#[pg_extern(volatile, parallel_unsafe)]
fn part_node(
    node_name: &str,
    wait_for_completion: default!(bool, true),
    force: default!(bool, false),
) {
    part_impl(node_name, wait_for_completion, force).or_raise()
}

/// Sets a node's state here; called by the node running a part.
#[pg_extern(volatile)]
fn _set_node_state(node_id: i64, state: i32) -> bool {
    let r: BdrResult<()> = (|| {
        let state = NodeState::from_oid(state as u32).ok_or(BdrError::InvalidValue {
            what: "node state",
            msg: format!("{state} is not a node state"),
        })?;
        crate::catalog::set_node_state(node_id as u32, state)?;
        crate::shmem::wake_workers_at_commit();
        Ok(())
    })();
    r.or_raise();
    true
}

/// Removes node `node_id`'s rows here, and the slot and origin that served
/// it if the manager has not dropped them yet; called by `bdr.drop_node` on
/// the other members.
#[pg_extern(volatile)]
fn _drop_node_rows(node_id: i64) -> bool {
    let r: BdrResult<()> = (|| {
        if let Some(n) = catalog::node_by_id(node_id as u32)? {
            drop_artifacts_of(&n)?;
        }
        catalog::drop_node_rows(node_id as u32)
    })();
    r.or_raise();
    crate::shmem::wake_workers_at_commit();
    true
}

/// Sets a node's connection string here; called by `bdr.alter_node_interface`.
#[pg_extern(volatile)]
fn _set_node_dsn(node_id: i64, dsn: &str) -> bool {
    set_dsn(node_id as u32, dsn).or_raise();
    true
}

/// Changes the connection string other nodes use to reach `node_name`, on
/// every member of the group. Receivers reconnect with it.
#[pg_extern(volatile, parallel_unsafe)]
fn alter_node_interface(node_name: &str, interface_dsn: &str) {
    alter_interface_impl(node_name, interface_dsn).or_raise()
}
