//! Parting a node from its group (`bdr.part_node`) and removing parted
//! nodes' rows everywhere (`bdr.drop_node` of a remote node), and changing a
//! node's connection string everywhere (`bdr.alter_node_interface`).
//!
//! Catalogs are local to each node, so each step is made on every member
//! through its own connection (committed there at once), the local node
//! included: its manager then acts without waiting for the caller's commit.

use crate::catalog::{self, NodeRow};
use crate::error::{BdrError, BdrResult};
use crate::peer::{Check, Peer};
use bdr_core::naming;
use bdr_core::node::NodeState;
use pgrx::prelude::*;

/// How long parting waits for the parting node's changes to reach every
/// member, and for the members to drop what belonged to it.
const PART_TIMEOUT_US: i64 = 120_000_000;

/// The application name of part's connections to the members.
const APPNAME: &str = "bdr part";
/// How often part looks again while it waits.
const PART_POLL_MS: i64 = 100;

fn connect(node: &NodeRow) -> BdrResult<Peer> {
    Peer::connect(&node.node_name, &node.node_dsn, APPNAME)
}

/// Polls `check` on `peer` until it holds.
fn wait_until(peer: &Peer, check: Check, what: &str) -> BdrResult<()> {
    let deadline = crate::shmem::now() + PART_TIMEOUT_US;
    loop {
        let Some(missing) = peer.check(&check, what)? else {
            return Ok(());
        };
        if crate::shmem::now() > deadline {
            return Err(BdrError::Prerequisite {
                msg: format!("timed out on node \"{}\" {what} ({missing})", peer.name),
                hint: format!(
                    "See bdr.subscription_summary and bdr.worker_errors on node \"{}\"; part_node can be run again.",
                    peer.name
                ),
            });
        }
        crate::pg::latch::wait(None, PART_POLL_MS);
    }
}

pub fn part_impl(node_name: &str, wait_for_completion: bool, force: bool) -> BdrResult<()> {
    let local = catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
    let group =
        catalog::group_name(local.node_group_id)?.ok_or_else(|| BdrError::Prerequisite {
            msg: format!(
                "local node \"{}\" is not a member of a node group",
                local.node_name
            ),
            hint: "Run bdr.part_node on a member of the parting node's group.".into(),
        })?;
    let parting = catalog::node_by_name(node_name)?
        .filter(|n| n.node_group_id == local.node_group_id)
        .ok_or_else(|| BdrError::NoSuchNode(node_name.to_string()))?;
    if parting.node_state == NodeState::Parted {
        notice!("node \"{node_name}\" is already parted");
        return Ok(());
    }
    let mut everyone = catalog::group_peers(&local)?;
    everyone.push(catalog::node_by_id(local.node_id)?.ok_or(BdrError::NoLocalNode)?);
    let members: Vec<NodeRow> = everyone
        .iter()
        .filter(|n| n.node_id != parting.node_id && n.node_state != NodeState::Parted)
        .cloned()
        .collect();
    if members.is_empty() {
        return Err(BdrError::Prerequisite {
            msg: format!("node \"{node_name}\" is the last member of node group \"{group}\""),
            hint: "There is nothing to part from; remove the node with bdr.drop_node().".into(),
        });
    }
    // Every remaining member must hear of it; the parting node only if it can.
    let conns: Vec<(NodeRow, Peer)> = members
        .iter()
        .map(|m| connect(m).map(|c| (m.clone(), c)))
        .collect::<BdrResult<_>>()?;
    let pconn = match connect(&parting) {
        Ok(c) => Some(c),
        Err(_) if force => {
            notice!(
                "node \"{node_name}\" is unreachable; parting it without catching up its last changes"
            );
            None
        }
        Err(e) => {
            return Err(BdrError::Prerequisite {
                msg: e.to_string(),
                hint: "If the node will not come back, part it with force => true.".into(),
            })
        }
    };

    for (_, c) in &conns {
        c.set_node_state(parting.node_id, NodeState::PartStart)?;
    }
    if let Some(pc) = &pconn {
        pc.set_node_state(parting.node_id, NodeState::PartStart)?;
        // Catch-up: everything the parting node committed so far reaches
        // every member before it goes, so that a change it sent to some
        // members only is not lost on the others.
        for (_, c) in &conns {
            c.set_node_state(parting.node_id, NodeState::Parting)?;
        }
        pc.set_node_state(parting.node_id, NodeState::Parting)?;
        for (_, c) in &conns {
            c.resume_subscription_from(&parting.node_name)?;
        }
        let end = pc.wal_insert_end()?;
        // Members still joining do not stream from it yet: their join
        // brings them its changes.
        for (m, _) in conns
            .iter()
            .filter(|(m, _)| m.node_state.is_streamed_from())
        {
            let slot = naming::slot_name(&parting.dbname, &group, &m.node_name);
            wait_until(
                pc,
                Check::SlotConfirmed { slot, lsn: end },
                &format!(
                    "waiting for node \"{}\" to receive the last changes of node \"{node_name}\"",
                    m.node_name
                ),
            )?;
        }
    }
    if pconn.is_none() {
        // Down: what it sent to some members but not to others comes from
        // the member that received the most of it.
        for (_, c) in &conns {
            c.set_node_state(parting.node_id, NodeState::PartCatchup)?;
        }
        catch_up_from_most_advanced(&parting, &group, &conns)?;
    }
    // The group's consensus forgets it, while its own consensus worker
    // still answers (it stops once the node is parted). That needs a
    // majority of the voters; without one the node stays a voter that
    // never answers, and the part goes on.
    let removed = conns
        .first()
        .map(|(_, c)| c.change_voter(parting.node_id, false));
    if let Some(Err(e)) = removed {
        warning!("node \"{node_name}\" remains a voter of the group's consensus: {e}");
    }
    for (_, c) in &conns {
        c.set_node_state(parting.node_id, NodeState::Parted)?;
    }
    if let Some(pc) = &pconn {
        pc.set_node_state(parting.node_id, NodeState::Parted)?;
    }
    if !wait_for_completion {
        return Ok(());
    }
    // Each member's manager drops its slot for the parted node and its
    // origin for it; the parted node drops all of its own.
    for (m, c) in &conns {
        let slot = naming::slot_name(&m.dbname, &group, &parting.node_name);
        let origin = naming::origin_name(&m.dbname, &group, &parting.node_name);
        wait_until(
            c,
            Check::SlotAndOriginGone { slot, origin },
            &format!("waiting for the slot and origin of node \"{node_name}\" to be dropped"),
        )?;
    }
    if let Some(pc) = &pconn {
        let prefix = naming::slot_name(&parting.dbname, &group, "");
        wait_until(
            pc,
            Check::NoSlotsWithPrefix(prefix),
            "waiting for its slots to be dropped",
        )?;
    }
    Ok(())
}

/// The parting node is down: finds the member that has applied the most of
/// its stream (the streams are ordered, so that member has everything any
/// member has), and replays on every other member the rows and deletes
/// whose last writer there is the parting node. Each is applied with the
/// parting node's commit timestamp (under the `bdr_local` origin, so it also
/// replicates) unless the member holds a newer version: applying what a
/// member already has changes nothing.
fn catch_up_from_most_advanced(
    parting: &NodeRow,
    group: &str,
    conns: &[(NodeRow, Peer)],
) -> BdrResult<()> {
    let mut best: Option<(usize, u64, u32)> = None;
    for (i, (m, c)) in conns.iter().enumerate() {
        let origin = naming::origin_name(&m.dbname, group, &parting.node_name);
        let Some((lsn, roident)) = c.origin(&origin)? else {
            continue;
        };
        if best.as_ref().is_none_or(|b| lsn > b.1) {
            best = Some((i, lsn, roident));
        }
    }
    let Some((ai, _, roident)) = best else {
        return Ok(());
    };
    let (a, ac) = &conns[ai];
    let changes = ac.changes_of_origin(roident)?;
    if changes.is_empty() {
        return Ok(());
    }
    for (i, (m, c)) in conns.iter().enumerate() {
        if i == ai {
            continue;
        }
        c.catch_up(&changes)?;
        notice!(
            "node \"{}\" caught up {} change(s) of node \"{}\" from node \"{}\"",
            m.node_name,
            changes.len(),
            parting.node_name,
            a.node_name
        );
    }
    Ok(())
}

/// Drops this node's slot for `node` and its origin for it, once its row
/// goes: nothing would name them afterwards.
pub fn drop_artifacts_of(node: &NodeRow) -> BdrResult<()> {
    let Some(local) = catalog::local_node()? else {
        return Ok(());
    };
    let Some(group) = catalog::group_name(local.node_group_id)? else {
        return Ok(());
    };
    let db = catalog::current_database()?;
    let slot = naming::slot_name(&db, &group, &node.node_name);
    let origin = naming::origin_name(&db, &group, &node.node_name);
    catalog::drop_parted_artifacts(&[slot], &[origin])?;
    Ok(())
}

/// After dropping a parted node's rows locally, drops them on every other
/// member too, so that the name can join again.
pub fn drop_everywhere(node: &NodeRow, force: bool) -> BdrResult<()> {
    let Some(local) = catalog::local_node()? else {
        return Ok(());
    };
    for m in catalog::group_peers(&local)?
        .into_iter()
        .filter(|m| m.node_id != node.node_id && m.node_state != NodeState::Parted)
    {
        match connect(&m) {
            Ok(c) => c.drop_node_rows(node.node_id)?,
            Err(e) if force => warning!("{e}; drop node \"{}\" there later", node.node_name),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn alter_interface_impl(node_name: &str, interface_dsn: &str) -> BdrResult<()> {
    bdr_core::dsn::Dsn::parse(interface_dsn).map_err(|err| BdrError::BadDsn {
        dsn: interface_dsn.to_string(),
        err,
    })?;
    let node = catalog::node_by_name(node_name)?
        .ok_or_else(|| BdrError::NoSuchNode(node_name.to_string()))?;
    let local = catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
    // Every other member first (they connect to the node with it), then here.
    for m in catalog::group_peers(&local)?
        .into_iter()
        .filter(|m| m.node_state != NodeState::Parted)
    {
        connect(&m)?.set_node_dsn(node.node_id, interface_dsn)?;
    }
    set_dsn(node.node_id, interface_dsn)
}

pub fn set_dsn(node_id: u32, dsn: &str) -> BdrResult<()> {
    catalog::set_node_dsn(node_id, dsn)?;
    crate::shmem::wake_workers_at_commit();
    Ok(())
}
