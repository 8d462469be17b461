//! The local node's conflict settings (`bdr.alter_node_set_conflict_resolver`,
//! `bdr.alter_node_set_log_config`): checked here, stored by the catalog,
//! and picked up by the writers at their next transaction. As in BDR 4 they
//! are local to each node and transactional.

use crate::catalog;
use crate::error::{BdrError, BdrResult};
use crate::stats;
use bdr_core::conflict::{self, ConflictType, RESOLUTIONS};

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

pub fn set_resolver(node_name: &str, conflict_type: &str, resolver: &str) -> BdrResult<()> {
    check_local_node(node_name)?;
    let (t, r) = conflict::check_resolver(conflict_type, resolver).map_err(|msg| {
        BdrError::InvalidValue {
            what: "conflict resolver",
            msg,
        }
    })?;
    catalog::set_conflict_resolver(t, r)?;
    stats::bump_config_generation_at_commit();
    Ok(())
}

pub fn set_log_config(
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
    catalog::set_conflict_log(log_to_file, log_to_table, types, resolutions)?;
    stats::bump_config_generation_at_commit();
    Ok(())
}
