//! A node's life in its database: creating it, creating a group with it,
//! and dropping a node's metadata (`bdr.create_node`, `bdr.create_node_group`,
//! `bdr.drop_node`).

use crate::catalog::{self, LocalNode};
use crate::error::{BdrError, BdrResult};
use crate::{prereq, shmem};
use bdr_core::dsn::Dsn;
use bdr_core::node::{self, NodeState};

pub fn create_node_impl(node_name: &str, local_dsn: &str) -> BdrResult<u32> {
    prereq::check()?;
    node::validate_name("node", node_name)?;
    Dsn::parse(local_dsn).map_err(|err| BdrError::BadDsn {
        dsn: local_dsn.to_string(),
        err,
    })?;

    catalog::lock_nodes()?;
    if let Some(local) = catalog::local_node()? {
        return Err(BdrError::LocalNodeExists(local.node_name));
    }
    if catalog::node_by_name(node_name)?.is_some() {
        return Err(BdrError::NodeExists(node_name.to_string()));
    }
    let id = node::node_id_for(node_name);
    if let Some(other) = catalog::node_by_id(id)? {
        return Err(BdrError::NodeIdCollision {
            id,
            name: node_name.to_string(),
            other: other.node_name,
        });
    }
    catalog::insert_local_node(id, node_name, local_dsn)?;
    shmem::wake_workers_at_commit();
    Ok(id)
}

pub fn create_node_group_impl(
    node_group_name: &str,
    parent_group_name: Option<&str>,
    join_node_group: bool,
    node_group_type: Option<&str>,
) -> BdrResult<u32> {
    node::validate_name("node group", node_group_name)?;
    if let Some(t) = node_group_type {
        if !t.eq_ignore_ascii_case("normal") {
            let known = [
                "subscriber-only",
                "datanode",
                "read coordinator",
                "write coordinator",
            ];
            if known.iter().any(|k| k.eq_ignore_ascii_case(t)) {
                return Err(BdrError::NotSupported(format!("node group type \"{t}\"")));
            }
            return Err(BdrError::InvalidValue {
                what: "node_group_type",
                msg: format!("\"{t}\" is not a node group type; use NULL for a normal group"),
            });
        }
    }
    if parent_group_name.is_some() {
        return Err(BdrError::NotSupported(
            "creating a subgroup (parent_group_name)".into(),
        ));
    }
    catalog::lock_nodes()?;
    let local = catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
    if let Some(g) = catalog::group_name(local.node_group_id)? {
        return Err(BdrError::AlreadyInGroup {
            node: local.node_name,
            group: g,
        });
    }
    if catalog::group_by_name(node_group_name)?.is_some() {
        return Err(BdrError::GroupExists(node_group_name.to_string()));
    }
    let gid = node::group_id_for(node_group_name);
    catalog::insert_group(gid, node_group_name)?;
    if join_node_group {
        catalog::set_node_group(local.node_id, gid, NodeState::Active, 1)?;
        crate::sequence::node_changed_at_commit();
        crate::consensus::bootstrap(local.node_id)?;
    }
    shmem::wake_workers_at_commit();
    Ok(gid)
}

pub fn drop_node_impl(node_name: &str, _cascade: bool, force: bool) -> BdrResult<()> {
    catalog::lock_nodes()?;
    let target = catalog::node_by_name(node_name)?
        .ok_or_else(|| BdrError::NoSuchNode(node_name.to_string()))?;
    let local: Option<LocalNode> = catalog::local_node()?;
    let is_local = local.as_ref().is_some_and(|l| l.node_id == target.node_id);
    if is_local {
        let peers = catalog::live_peers(target.node_id, target.node_group_id)?;
        if !peers.is_empty() && !force {
            return Err(BdrError::LocalNodeHasPeers {
                node: node_name.to_string(),
                peers,
            });
        }
        catalog::drop_all_metadata()?;
        crate::sequence::node_changed_at_commit();
    } else {
        if target.node_state != NodeState::Parted && !force && target.node_group_id != 0 {
            return Err(BdrError::NodeStillActive(node_name.to_string()));
        }
        if target.node_state == NodeState::Parted {
            crate::part::drop_artifacts_of(&target)?;
        }
        catalog::drop_node_rows(target.node_id)?;
        if target.node_state == NodeState::Parted {
            crate::part::drop_everywhere(&target, force)?;
        }
    }
    shmem::wake_workers_at_commit();
    Ok(())
}
