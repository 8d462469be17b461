//! The consensus worker's tables, as far as others write them: the first
//! voter's bootstrap and the cleanup when the node goes. (The worker's own
//! log and state writes are in `src/consensus/storage.rs`.)

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

/// Forgets this node's part in any consensus group.
pub fn drop_consensus_state() -> BdrResult<()> {
    Spi::run("DELETE FROM bdr.global_consensus_journal")?;
    Spi::run("DELETE FROM bdr.local_consensus_snapshot")?;
    Spi::run("DELETE FROM bdr.local_consensus_state")?;
    Ok(())
}
