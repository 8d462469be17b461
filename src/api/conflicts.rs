//! Conflict settings of the local node: `bdr.alter_node_set_conflict_resolver`,
//! `bdr.alter_node_set_log_config`, and what the writers read of them.
//! As in BDR 4 they are local to each node and transactional.

use crate::catalog;
use crate::error::{BdrError, BdrResult, OrRaise};
use crate::stats;
use bdr_core::conflict::{self, ConflictType, RESOLUTIONS};
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

/// Conflict settings apply to the node they are made on; BDR 4 refuses
/// others too, since they are not replicated.
fn check_local_node(node_name: &str) -> BdrResult<()> {
    let local = catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
    if local.node_name != node_name {
        if catalog::node_by_name(node_name)?.is_none() {
            return Err(BdrError::NoSuchNode(node_name.to_string()));
        }
        return Err(BdrError::Prerequisite {
            msg: format!(
                "node \"{node_name}\" is not the local node (\"{}\"); conflict settings are local to each node",
                local.node_name
            ),
            hint: format!("Connect to node \"{node_name}\" and run the function there."),
        });
    }
    Ok(())
}

fn set_resolver(node_name: &str, conflict_type: &str, resolver: &str) -> BdrResult<()> {
    check_local_node(node_name)?;
    let (t, r) = conflict::check_resolver(conflict_type, resolver).map_err(|msg| {
        BdrError::InvalidValue {
            what: "conflict resolver",
            msg,
        }
    })?;
    Spi::run_with_args(
        "INSERT INTO bdr.node_conflict_resolver_config (conflict_type, conflict_resolver)
         VALUES ($1, $2)
         ON CONFLICT (conflict_type) DO UPDATE SET conflict_resolver = EXCLUDED.conflict_resolver",
        &[t.name().into(), r.name().into()],
    )?;
    stats::bump_config_generation_at_commit();
    Ok(())
}

/// Sets the resolver the local node's writers use for one conflict type.
#[pg_extern(volatile)]
fn alter_node_set_conflict_resolver(node_name: &str, conflict_type: &str, conflict_resolver: &str) {
    set_resolver(node_name, conflict_type, conflict_resolver).or_raise()
}

fn set_log_config(
    node_name: &str,
    log_to_file: bool,
    log_to_table: bool,
    types: Option<Vec<Option<String>>>,
    resolutions: Option<Vec<Option<String>>>,
) -> BdrResult<()> {
    check_local_node(node_name)?;
    let types: Option<Vec<String>> = types.map(|v| v.into_iter().flatten().collect());
    let resolutions: Option<Vec<String>> = resolutions.map(|v| v.into_iter().flatten().collect());
    for t in types.iter().flatten() {
        if ConflictType::parse(t).is_none() {
            return Err(BdrError::InvalidValue {
                what: "conflict_type",
                msg: format!(
                    "\"{t}\" is not a conflict type; the types are: {}",
                    ConflictType::ALL.map(|t| t.name()).join(", ")
                ),
            });
        }
    }
    for r in resolutions.iter().flatten() {
        if !RESOLUTIONS.contains(&r.as_str()) {
            return Err(BdrError::InvalidValue {
                what: "conflict_resolution",
                msg: format!(
                    "\"{r}\" is not a conflict resolution; the resolutions are: {}",
                    RESOLUTIONS.join(", ")
                ),
            });
        }
    }
    Spi::run_with_args(
        "UPDATE bdr.node_log_config_data SET log_to_file = $1, log_to_table = $2,
                log_conflict_type = $3, log_conflict_res = $4",
        &[
            log_to_file.into(),
            log_to_table.into(),
            types.into(),
            resolutions.into(),
        ],
    )?;
    stats::bump_config_generation_at_commit();
    Ok(())
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
