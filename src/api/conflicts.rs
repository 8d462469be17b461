//! Conflict settings of the local node: `bdr.alter_node_set_conflict_resolver`,
//! `bdr.alter_node_set_log_config`, and what the writers read of them.
//! As in BDR 4 they are local to each node and transactional.

use crate::conflict_settings::*;
use crate::error::OrRaise;
use bdr_core::conflict::ConflictType;
use pgrx::prelude::*;

/// The conflict types in BDR 4's order with their default resolvers, for
/// `bdr.node_conflict_resolvers`.
#[pg_extern(immutable, parallel_safe)]
fn _conflict_types() -> TableIterator<
    'static,
    (
        name!(ord, i32),
        name!(conflict_type, &'static str),
        name!(default_resolver, &'static str),
    ),
> {
    TableIterator::new(
        ConflictType::ALL
            .into_iter()
            .enumerate()
            .map(|(i, t)| (i as i32 + 1, t.name(), t.default_resolver().name())),
    )
}

/// Sets the resolver the local node's writers use for one conflict type.
#[pg_extern(volatile)]
fn alter_node_set_conflict_resolver(node_name: &str, conflict_type: &str, conflict_resolver: &str) {
    set_resolver(node_name, conflict_type, conflict_resolver).or_raise()
}

/// Chooses where the local node logs conflicts, and which ones: NULL arrays
/// mean every type and every resolution.
#[pg_extern(volatile)]
fn alter_node_set_log_config(
    node_name: &str,
    log_to_file: default!(bool, true),
    log_to_table: default!(bool, true),
    conflict_type: default!(Option<Vec<Option<String>>>, "NULL"),
    conflict_resolution: default!(Option<Vec<Option<String>>>, "NULL"),
) {
    set_log_config(
        node_name,
        log_to_file,
        log_to_table,
        conflict_type,
        conflict_resolution,
    )
    .or_raise()
}
