//! Typed access to bdr's catalog tables (`sql/bdr_schema.sql`) through SPI.
//! Reads use read-only SPI so that polling workers never assign an xid.

use crate::error::BdrResult;
use bdr_core::naming;
use bdr_core::node::NodeState;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::spi::SpiHeapTupleData;

#[derive(Debug, Clone)]
pub struct NodeRow {
    pub node_id: u32,
    pub node_name: String,
    pub node_group_id: u32,
    pub node_state: NodeState,
    pub node_dsn: String,
    pub dbname: String,
}

#[derive(Debug, Clone)]
pub struct LocalNode {
    pub node_id: u32,
    pub node_name: String,
    pub node_group_id: u32,
}

fn oid(v: u32) -> pg_sys::Oid {
    pg_sys::Oid::from(v)
}

type Args<'a> = [DatumWithOid<'a>];

/// Runs a read-only query and maps every row.
fn select<T>(
    q: &str,
    args: &Args<'_>,
    map: impl Fn(&SpiHeapTupleData<'_>) -> BdrResult<T>,
) -> BdrResult<Vec<T>> {
    Spi::connect(|c| c.select(q, None, args)?.map(|row| map(&row)).collect())
}

fn select_first<T>(
    q: &str,
    args: &Args<'_>,
    map: impl Fn(&SpiHeapTupleData<'_>) -> BdrResult<T>,
) -> BdrResult<Option<T>> {
    Ok(select(q, args, map)?.into_iter().next())
}

// The catalog columns read below are all NOT NULL.
fn oid_col(row: &SpiHeapTupleData<'_>, i: usize) -> BdrResult<u32> {
    Ok(row.get::<pg_sys::Oid>(i)?.map(|o| o.to_u32()).unwrap_or(0))
}

fn text_col(row: &SpiHeapTupleData<'_>, i: usize) -> BdrResult<String> {
    Ok(row.get::<String>(i)?.unwrap_or_default())
}

fn node_row(row: &SpiHeapTupleData<'_>) -> BdrResult<NodeRow> {
    Ok(NodeRow {
        node_id: oid_col(row, 1)?,
        node_name: text_col(row, 2)?,
        node_group_id: oid_col(row, 3)?,
        node_state: NodeState::from_oid(oid_col(row, 4)?).unwrap_or(NodeState::None),
        node_dsn: text_col(row, 5)?,
        dbname: text_col(row, 6)?,
    })
}

const NODE_QUERY: &str =
    "SELECT node_id, node_name::text, node_group_id, node_state, node_dsn, dbname::text FROM bdr.node";

pub fn node_by_name(name: &str) -> BdrResult<Option<NodeRow>> {
    select_first(
        &format!("{NODE_QUERY} WHERE node_name = $1::name"),
        &[name.into()],
        node_row,
    )
}

pub fn node_by_id(id: u32) -> BdrResult<Option<NodeRow>> {
    select_first(
        &format!("{NODE_QUERY} WHERE node_id = $1"),
        &[oid(id).into()],
        node_row,
    )
}

pub fn local_node() -> BdrResult<Option<LocalNode>> {
    select_first(
        "SELECT n.node_id, n.node_name::text, n.node_group_id FROM bdr.local_node l JOIN bdr.node n USING (node_id)",
        &[],
        |row| Ok(LocalNode { node_id: oid_col(row, 1)?, node_name: text_col(row, 2)?, node_group_id: oid_col(row, 3)? }),
    )
}

/// The local node's name, if this database has the bdr extension and a local
/// node; used by the manager, which may run in a database without the extension.
pub fn database_has_local_node() -> BdrResult<Option<String>> {
    let has_ext = !select(
        "SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'bdr'",
        &[],
        |_| Ok(()),
    )?
    .is_empty();
    if !has_ext {
        return Ok(None);
    }
    Ok(local_node()?.map(|l| l.node_name))
}

/// Serialises node and group changes in this database.
pub fn lock_nodes() -> BdrResult<()> {
    Spi::run("LOCK TABLE bdr.node IN SHARE ROW EXCLUSIVE MODE")?;
    Ok(())
}

pub fn insert_local_node(id: u32, name: &str, dsn: &str) -> BdrResult<()> {
    let state = oid(NodeState::Created.oid());
    Spi::run_with_args(
        "INSERT INTO bdr.node (node_id, node_name, node_group_id, source_node_id, node_state, target_state,
                               seq_id, dbname, node_dsn, proto_version_ranges)
         VALUES ($1, $2::name, 0, $1, $3, $3, 0, current_database(), $4, ARRAY[$5, $5])",
        &[oid(id).into(), name.into(), state.into(), dsn.into(), bdr_core::version::PROTOCOL_VERSION.into()],
    )?;
    Spi::run_with_args(
        "INSERT INTO bdr.local_node (node_id) VALUES ($1)",
        &[oid(id).into()],
    )?;
    Ok(())
}

pub fn group_name(gid: u32) -> BdrResult<Option<String>> {
    select_first(
        "SELECT node_group_name::text FROM bdr.node_group WHERE node_group_id = $1",
        &[oid(gid).into()],
        |row| text_col(row, 1),
    )
}

pub fn group_by_name(name: &str) -> BdrResult<Option<u32>> {
    select_first(
        "SELECT node_group_id FROM bdr.node_group WHERE node_group_name = $1::name",
        &[name.into()],
        |row| oid_col(row, 1),
    )
}

pub fn insert_group(gid: u32, name: &str) -> BdrResult<()> {
    Spi::run_with_args(
        "INSERT INTO bdr.node_group (node_group_id, node_group_name, node_group_uuid) VALUES ($1, $2::name, gen_random_uuid())",
        &[oid(gid).into(), name.into()],
    )?;
    Ok(())
}

pub fn set_node_group(node_id: u32, gid: u32, state: NodeState, seq_id: i32) -> BdrResult<()> {
    Spi::run_with_args(
        "UPDATE bdr.node SET node_group_id = $2, node_state = $3, target_state = $3, seq_id = $4 WHERE node_id = $1",
        &[oid(node_id).into(), oid(gid).into(), oid(state.oid()).into(), seq_id.into()],
    )?;
    Ok(())
}

/// Names of the other nodes of the group that are not parted.
pub fn live_peers(node_id: u32, gid: u32) -> BdrResult<Vec<String>> {
    if gid == 0 {
        return Ok(vec![]);
    }
    select(
        "SELECT node_name::text FROM bdr.node WHERE node_group_id = $2 AND node_id <> $1 AND node_state <> $3 ORDER BY 1",
        &[oid(node_id).into(), oid(gid).into(), oid(NodeState::Parted.oid()).into()],
        |row| text_col(row, 1),
    )
}

/// Removes every BDR catalog row of this database (dropping the local node).
pub fn drop_all_metadata() -> BdrResult<()> {
    Spi::run("DELETE FROM bdr.subscription")?;
    Spi::run("DELETE FROM bdr.subscription_start")?;
    Spi::run("DELETE FROM bdr.join_request")?;
    Spi::run("DELETE FROM bdr.copied_row")?;
    Spi::run("DELETE FROM bdr.local_node")?;
    Spi::run("DELETE FROM bdr.node")?;
    Spi::run("DELETE FROM bdr.node_group")?;
    drop_consensus_state()?;
    Ok(())
}

pub fn drop_node_rows(node_id: u32) -> BdrResult<()> {
    Spi::run_with_args(
        "DELETE FROM bdr.subscription WHERE origin_node_id = $1 OR target_node_id = $1 OR source_node_id = $1",
        &[oid(node_id).into()],
    )?;
    Spi::run_with_args(
        "DELETE FROM bdr.subscription_start WHERE origin_node_id = $1",
        &[oid(node_id).into()],
    )?;
    Spi::run_with_args(
        "DELETE FROM bdr.node WHERE node_id = $1",
        &[oid(node_id).into()],
    )?;
    Ok(())
}

/// A subscription of the local node to a peer, with what a receiver needs.
#[derive(Debug, Clone)]
pub struct SubRow {
    pub sub_id: u32,
    pub sub_name: String,
    pub origin_node_id: u32,
    pub origin_node_name: String,
    pub origin_dsn: String,
    pub slot_name: String,
    pub origin_name: String,
    pub enabled: bool,
}

const SUB_QUERY: &str =
    "SELECT s.sub_id, s.sub_name::text, s.origin_node_id, n.node_name::text, n.node_dsn,
        s.slot_name::text, s.origin_name::text, s.sub_enabled
   FROM bdr.subscription s JOIN bdr.node n ON n.node_id = s.origin_node_id
   JOIN bdr.local_node l ON l.node_id = s.target_node_id";

fn sub_row(row: &SpiHeapTupleData<'_>) -> BdrResult<SubRow> {
    Ok(SubRow {
        sub_id: oid_col(row, 1)?,
        sub_name: text_col(row, 2)?,
        origin_node_id: oid_col(row, 3)?,
        origin_node_name: text_col(row, 4)?,
        origin_dsn: text_col(row, 5)?,
        slot_name: text_col(row, 6)?,
        origin_name: text_col(row, 7)?,
        enabled: row.get::<bool>(8)?.unwrap_or(false),
    })
}

/// The local node's subscriptions (one per peer it receives from).
pub fn local_subscriptions() -> BdrResult<Vec<SubRow>> {
    select(&format!("{SUB_QUERY} ORDER BY s.sub_id"), &[], sub_row)
}

pub fn subscription(sub_id: u32) -> BdrResult<Option<SubRow>> {
    select_first(
        &format!("{SUB_QUERY} WHERE s.sub_id = $1"),
        &[oid(sub_id).into()],
        sub_row,
    )
}

/// The other members of the local node's group, every state.
pub fn group_peers(local: &LocalNode) -> BdrResult<Vec<NodeRow>> {
    select(
        &format!("{NODE_QUERY} WHERE node_group_id = $1 AND node_id <> $2 AND node_group_id <> 0 ORDER BY node_id"),
        &[oid(local.node_group_id).into(), oid(local.node_id).into()],
        node_row,
    )
}

/// Replication slots and origins on this node that belong to parted nodes
/// (all of them, when the local node itself is parted): what the manager
/// drops once parting is done.
#[derive(Debug, Default)]
pub struct PartedLeftovers {
    pub slots: Vec<String>,
    pub origins: Vec<String>,
}

/// Makes bdr.subscription hold exactly one subscription from each peer the
/// local node streams from, and returns what parted peers left here. Writes
/// only when something changes, so a polling manager does not burn
/// transaction ids.
pub fn sync_subscriptions(local: &LocalNode) -> BdrResult<PartedLeftovers> {
    if local.node_group_id == 0 {
        return Ok(PartedLeftovers::default());
    }
    let group = group_name(local.node_group_id)?.unwrap_or_default();
    let mydb = select_first("SELECT current_database()::text", &[], |r| text_col(r, 1))?
        .unwrap_or_default();
    // A parted local node receives from nobody.
    let me_parted = node_by_id(local.node_id)?.is_some_and(|n| n.node_state == NodeState::Parted);
    let all_peers = group_peers(local)?;
    let gone = all_peers
        .iter()
        .filter(|p| me_parted || p.node_state == NodeState::Parted);
    let leftovers = PartedLeftovers {
        slots: gone
            .clone()
            .map(|p| naming::slot_name(&mydb, &group, &p.node_name))
            .collect(),
        origins: gone
            .map(|p| naming::origin_name(&mydb, &group, &p.node_name))
            .collect(),
    };
    let peers: Vec<NodeRow> = all_peers
        .into_iter()
        .filter(|p| p.node_state.is_streamed_from() && !me_parted)
        .collect();
    let existing = local_subscriptions()?;
    for p in &peers {
        if existing.iter().any(|s| s.origin_node_id == p.node_id) {
            continue;
        }
        let sub_name = naming::subscription_name(&mydb, &group, &p.node_name, &local.node_name);
        let slot = naming::slot_name(&p.dbname, &group, &local.node_name);
        let origin = naming::origin_name(&mydb, &group, &p.node_name);
        let sub_id = bdr_core::node::node_id_for(&sub_name);
        Spi::run_with_args(
            "INSERT INTO bdr.subscription (sub_id, sub_name, nodegroup_id, origin_node_id, source_node_id,
                                           target_node_id, slot_name, origin_name)
             VALUES ($1, $2::name, $3, $4, $4, $5, $6::name, $7::name)
             ON CONFLICT (sub_id) DO NOTHING",
            &[oid(sub_id).into(), sub_name.as_str().into(), oid(local.node_group_id).into(),
              oid(p.node_id).into(), oid(local.node_id).into(), slot.as_str().into(), origin.as_str().into()],
        )?;
    }
    for s in &existing {
        if !peers.iter().any(|p| p.node_id == s.origin_node_id) {
            Spi::run_with_args(
                "DELETE FROM bdr.subscription WHERE sub_id = $1",
                &[oid(s.sub_id).into()],
            )?;
        }
    }
    Ok(leftovers)
}

mod conflicts;
mod consensus;
mod housekeeping;
mod membership;
pub mod sequences;
pub mod statements;
pub use conflicts::*;
pub use consensus::*;
pub use housekeeping::*;
pub use membership::*;
