//! Node and group management: `bdr.create_node`, `bdr.create_node_group`,
//! `bdr.drop_node`.

use crate::error::OrRaise;
use crate::node::*;
use crate::prereq;
use bdr_core::node::NodeState;
use pgrx::prelude::*;

/// Creates this database's BDR node. A database holds at most one.
#[pg_extern(volatile, parallel_unsafe)]
fn create_node(node_name: &str, local_dsn: &str) -> pg_sys::Oid {
    pg_sys::Oid::from(create_node_impl(node_name, local_dsn).or_raise())
}

/// Creates a node group; by default the local node becomes its first member.
#[pg_extern(volatile, parallel_unsafe)]
fn create_node_group(
    node_group_name: &str,
    parent_group_name: default!(Option<&str>, "NULL"),
    join_node_group: default!(bool, true),
    node_group_type: default!(Option<&str>, "NULL"),
) -> pg_sys::Oid {
    pg_sys::Oid::from(
        create_node_group_impl(
            node_group_name,
            parent_group_name,
            join_node_group,
            node_group_type,
        )
        .or_raise(),
    )
}

/// Removes a node's metadata: for the local node, all BDR metadata of this
/// database; for a remote node, only that node's. Parting is `bdr.part_node`.
#[pg_extern(volatile, parallel_unsafe)]
fn drop_node(node_name: &str, cascade: default!(bool, false), force: default!(bool, false)) {
    drop_node_impl(node_name, cascade, force).or_raise()
}

/// The name of a node state, as `bdr.node_summary` shows it.
#[pg_extern(immutable, parallel_safe)]
fn peer_state_name(state: pg_sys::Oid) -> Option<&'static str> {
    NodeState::from_oid(state.to_u32()).map(NodeState::name)
}

/// Checks the server settings bdr needs; run by CREATE EXTENSION.
#[pg_extern(volatile)]
fn _check_prerequisites() -> bool {
    prereq::check().or_raise();
    true
}
