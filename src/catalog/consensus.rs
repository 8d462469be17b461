//! The consensus tables: the Raft log (`bdr.global_consensus_journal`),
//! Raft's durable state with the state machine
//! (`bdr.local_consensus_state`), the last compaction
//! (`bdr.local_consensus_snapshot`); the first voter's bootstrap and the
//! cleanup when the node goes. `src/consensus/storage.rs` decides what to
//! write, in the consensus worker's durable transactions.

use super::*;

/// Makes this node the one voter of a new group's consensus: a snapshot at
/// index 1 whose configuration is this node, so that nodes that join later
/// start from a snapshot with the whole configuration in it.
pub fn bootstrap_consensus(node_id: u32, conf_state: &[u8], state: &[u8]) -> BdrResult<()> {
    Spi::run("DELETE FROM bdr.global_consensus_journal")?;
    Spi::run("DELETE FROM bdr.local_consensus_snapshot")?;
    Spi::run("DELETE FROM bdr.local_consensus_state")?;
    Spi::run_with_args(
        "INSERT INTO bdr.local_consensus_snapshot (log_index, log_term, snapshot) VALUES (1, 1, $1)",
        &[state.to_vec().into()],
    )?;
    Spi::run_with_args(
        "INSERT INTO bdr.local_consensus_state
                (node_id, current_term, apply_index, voted_for, last_known_leader, commit_index, conf_state, sm_state)
         VALUES ($1, 1, 1, 0, 0, 1, $2, $3)",
        &[oid(node_id).into(), conf_state.to_vec().into(), state.to_vec().into()],
    )?;
    Ok(())
}

/// Whether the local node takes part in its group's consensus: it is in a
/// group and not parted from it.
pub fn takes_part_in_consensus(local: &LocalNode) -> BdrResult<bool> {
    Ok(local.node_group_id != 0
        && node_by_id(local.node_id)?.is_some_and(|n| n.node_state != NodeState::Parted))
}

/// The state machine as this node applied it (`bdr_core::consensus::State`
/// encoded), if it takes part in a group's consensus.
pub fn consensus_state_machine() -> BdrResult<Option<Vec<u8>>> {
    select_first(
        "SELECT sm_state FROM bdr.local_consensus_state",
        &[],
        |row| Ok(row.get::<Vec<u8>>(1)?.unwrap_or_default()),
    )
}

/// Forgets this node's part in any consensus group.
pub fn drop_consensus_state() -> BdrResult<()> {
    Spi::run("DELETE FROM bdr.global_consensus_journal")?;
    Spi::run("DELETE FROM bdr.local_consensus_snapshot")?;
    Spi::run("DELETE FROM bdr.local_consensus_state")?;
    Ok(())
}

/// Raft's durable state as the consensus worker last wrote it.
pub struct ConsensusRow {
    pub term: i64,
    pub vote: u32,
    pub commit: i64,
    pub apply: i64,
    pub conf_state: Vec<u8>,
    pub sm_state: Vec<u8>,
}

pub fn consensus_state_row(node_id: u32) -> BdrResult<Option<ConsensusRow>> {
    select_first(
        "SELECT current_term, voted_for, commit_index, apply_index, conf_state, sm_state
           FROM bdr.local_consensus_state WHERE node_id = $1",
        &[oid(node_id).into()],
        |row| {
            Ok(ConsensusRow {
                term: row.get::<i64>(1)?.unwrap_or(0),
                vote: oid_col(row, 2)?,
                commit: row.get::<i64>(3)?.unwrap_or(0),
                apply: row.get::<i64>(4)?.unwrap_or(0),
                conf_state: row.get::<Vec<u8>>(5)?.unwrap_or_default(),
                sm_state: row.get::<Vec<u8>>(6)?.unwrap_or_default(),
            })
        },
    )
}

/// Writes Raft's durable state (0 vote: none).
pub fn save_consensus_state(node_id: u32, r: &ConsensusRow) -> BdrResult<()> {
    Spi::run_with_args(
        "INSERT INTO bdr.local_consensus_state
                (node_id, current_term, apply_index, voted_for, last_known_leader, commit_index, conf_state, sm_state)
         VALUES ($1, $2, $3, COALESCE($4, 0::oid), 0, $5, $6, $7)
         ON CONFLICT (node_id) DO UPDATE SET current_term = EXCLUDED.current_term,
                apply_index = EXCLUDED.apply_index, voted_for = EXCLUDED.voted_for,
                commit_index = EXCLUDED.commit_index, conf_state = EXCLUDED.conf_state,
                sm_state = EXCLUDED.sm_state",
        &[
            oid(node_id).into(),
            r.term.into(),
            r.apply.into(),
            oid(r.vote).into(),
            r.commit.into(),
            r.conf_state.clone().into(),
            r.sm_state.clone().into(),
        ],
    )?;
    Ok(())
}

/// (index, term) of the last compaction, if the log was compacted.
pub fn consensus_snapshot_point() -> BdrResult<Option<(i64, i64)>> {
    select_first(
        "SELECT log_index, log_term FROM bdr.local_consensus_snapshot ORDER BY log_index DESC LIMIT 1",
        &[],
        |row| {
            Ok((
                row.get::<i64>(1)?.unwrap_or(0),
                row.get::<i64>(2)?.unwrap_or(0),
            ))
        },
    )
}

/// Records a compaction at (`index`, `term`) with the state machine then.
pub fn record_consensus_snapshot(index: i64, term: i64, sm_state: &[u8]) -> BdrResult<()> {
    Spi::run("DELETE FROM bdr.local_consensus_snapshot")?;
    Spi::run_with_args(
        "INSERT INTO bdr.local_consensus_snapshot (log_index, log_term, snapshot) VALUES ($1, $2, $3)",
        &[index.into(), term.into(), sm_state.to_vec().into()],
    )?;
    Ok(())
}

/// The log entries (as raft-rs encodes them) after `index`, in order.
pub fn consensus_entries_after(index: i64) -> BdrResult<Vec<Vec<u8>>> {
    select(
        "SELECT req_payload FROM bdr.global_consensus_journal WHERE log_index > $1 ORDER BY log_index",
        &[index.into()],
        |row| Ok(row.get::<Vec<u8>>(1)?.unwrap_or_default()),
    )
}

/// A log entry, replacing whatever the log held from its index on when
/// `truncate` (the first of a batch).
pub fn append_consensus_entry(
    index: i64,
    term: i64,
    origin: u32,
    req_id: i64,
    payload: &[u8],
    truncate: bool,
) -> BdrResult<()> {
    if truncate {
        Spi::run_with_args(
            "DELETE FROM bdr.global_consensus_journal WHERE log_index >= $1",
            &[index.into()],
        )?;
    }
    Spi::run_with_args(
        "INSERT INTO bdr.global_consensus_journal (log_index, term, origin, req_id, req_payload)
         VALUES ($1, $2, COALESCE($3, 0::oid), $4, $5)",
        &[
            index.into(),
            term.into(),
            oid(origin).into(),
            req_id.into(),
            payload.to_vec().into(),
        ],
    )?;
    Ok(())
}

/// Drops the log before `index` (all of it when `None`).
pub fn drop_consensus_entries(before: Option<i64>) -> BdrResult<()> {
    match before {
        Some(i) => Spi::run_with_args(
            "DELETE FROM bdr.global_consensus_journal WHERE log_index < $1",
            &[i.into()],
        )?,
        None => Spi::run("DELETE FROM bdr.global_consensus_journal")?,
    }
    Ok(())
}

/// The state machine (`bdr_core::consensus::State`, encoded) as this
/// node last applied it: galloc allocations and global locks are read
/// from it without a round through the group.
pub fn consensus_state() -> BdrResult<Option<Vec<u8>>> {
    select_first(
        "SELECT s.sm_state FROM bdr.local_consensus_state s JOIN bdr.local_node l USING (node_id)",
        &[],
        |row| Ok(row.get::<Vec<u8>>(1)?.unwrap_or_default()),
    )
}
