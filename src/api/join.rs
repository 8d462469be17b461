//! SQL functions of joining a group: `bdr.join_node_group`,
//! `bdr.wait_for_join_completion`, and the internal ones a joining node calls
//! on the members. The join itself is `crate::join`.

use crate::error::OrRaise;
use crate::join::*;
use pgrx::prelude::*;

/// Joins the local node to the group of the node at `join_target_dsn`.
#[pg_extern(volatile, parallel_unsafe)]
fn join_node_group(
    join_target_dsn: &str,
    node_group_name: default!(Option<&str>, "NULL"),
    pause_in_standby: default!(bool, false),
    wait_for_completion: default!(bool, true),
    synchronize_structure: default!(&str, "'all'"),
) {
    let args = JoinArgs {
        target_dsn: join_target_dsn,
        group: node_group_name,
        pause_in_standby,
        synchronize_structure,
    };
    if !wait_for_completion {
        request_join(&args).or_raise();
        return;
    }
    // The join is complete when this returns; the connections to the peers
    // start when the transaction commits (see bdr.wait_for_join_completion).
    join_impl(&args).or_raise()
}

/// Called by a joining node on each member: records the joiner.
#[pg_extern(volatile, parallel_unsafe)]
fn _join_register(
    node_id: i64,
    node_name: &str,
    node_dsn: &str,
    dbname: &str,
    node_group_id: i64,
    seq_id: i32,
) {
    register_impl(
        node_id as u32,
        node_name,
        node_dsn,
        dbname,
        node_group_id as u32,
        seq_id,
    )
    .or_raise()
}

/// Called by a joining node on each member once it holds the group's data:
/// the member's manager then subscribes to it.
#[pg_extern(volatile, parallel_unsafe)]
fn _join_activate(node_id: i64) {
    activate_impl(node_id as u32).or_raise()
}

/// Waits until the local node is an active member and a receiver streams
/// from every peer.
#[pg_extern(volatile, parallel_unsafe)]
fn wait_for_join_completion(verbose_progress: default!(bool, false)) {
    wait_for_completion(verbose_progress).or_raise()
}
