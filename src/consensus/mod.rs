//! Consensus: one Raft group per BDR group (TiKV's raft-rs, driven by the
//! consensus worker of each node), for what the group must agree on. A
//! backend submits a request (`submit`) and waits, at most
//! `bdr.raft_response_timeout`, until the worker has it committed by a
//! majority and applied here.
//!
//! Messages between the workers travel on connections of their own
//! (`Peer::deliver_consensus`), not with replication, so a node whose apply
//! lags still votes.

pub mod shmem;
mod storage;
pub mod worker;

/// Makes this node the first and only voter of a new group's consensus.
pub fn bootstrap(node_id: u32) -> BdrResult<()> {
    use protobuf::Message as _;
    let cs = raft::prelude::ConfState::from((vec![node_id as u64], vec![]));
    crate::catalog::bootstrap_consensus(
        node_id,
        &cs.write_to_bytes().unwrap_or_default(),
        &bdr_core::consensus::State::default().encode(),
    )
}

use crate::error::{BdrError, BdrResult};
use bdr_core::consensus::{Applied, Request, Role};
use pgrx::prelude::*;
use shmem::{ReqState, CONSENSUS};

/// How often a waiting backend looks at its request when nothing wakes it.
const SUBMIT_POLL_MS: i64 = 100;

fn my_database() -> u32 {
    // SAFETY: MyDatabaseId is set for the life of a connected backend.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

fn no_majority(what: &str, waited_ms: i64, proposed: bool) -> BdrError {
    let hint = "Check that most nodes of the group are up and reachable (bdr.get_consensus_status(), bdr.monitor_group_raft()); bdr.raft_response_timeout sets how long to wait.".to_string();
    if proposed {
        // Handed to Raft: a majority may still commit it after we stop
        // waiting, so the caller cannot know whether it took effect.
        BdrError::OutcomeUnknown {
            msg: format!("{what}: no majority of the group's consensus confirmed it within {waited_ms} ms; it may still take effect"),
            hint,
        }
    } else {
        BdrError::NoMajority {
            msg: format!("{what}: no majority of the group's consensus answered within {waited_ms} ms; it was not applied"),
            hint,
        }
    }
}

/// Commits `req` through the group's consensus and returns what applying
/// it gave here; fails after `bdr.raft_response_timeout` without a
/// majority.
pub fn submit(req: &Request, what: &str) -> BdrResult<Applied> {
    let timeout_ms = crate::guc::get_int(crate::guc::RAFT_RESPONSE_TIMEOUT).max(0) as i64;
    submit_within(req, what, timeout_ms)
}

/// As `submit`, waiting at most `timeout_ms` (a caller that tries again
/// does not lose a whole `bdr.raft_response_timeout` to a proposal the
/// old leader took with it).
pub fn submit_within(req: &Request, what: &str, timeout_ms: i64) -> BdrResult<Applied> {
    let (slot, id, started) = post(req, what, false)?;
    wait_for(slot, id, started, what, timeout_ms)
}

/// Hands `req` to the consensus worker without waiting for it (what a
/// transaction's end or a session's exit releases): it takes effect once
/// the group commits it, or not at all if the worker cannot propose it
/// within twice `bdr.raft_response_timeout`.
pub fn submit_detached(req: &Request, what: &str) -> BdrResult<()> {
    post(req, what, true).map(|_| ())
}

/// Puts a request into a free slot and wakes the worker.
fn post(req: &Request, what: &str, detached: bool) -> BdrResult<(usize, u64, i64)> {
    let dboid = my_database();
    let data = req.encode();
    if data.len() > shmem::REQUEST_BYTES {
        return Err(BdrError::InvalidValue {
            what: "consensus request",
            msg: format!(
                "{} bytes is more than the {} a request can carry",
                data.len(),
                shmem::REQUEST_BYTES
            ),
        });
    }
    let started = crate::shmem::now();
    let (slot, id, worker) = {
        let mut s = CONSENSUS.exclusive();
        let worker = s
            .db(dboid)
            .map(|d| (d.worker, d.disabled))
            .unwrap_or((0, false));
        // Only a database's own worker frees its slots: a request nobody
        // waits for, where none runs, would keep its slot.
        if detached && worker.0 == 0 {
            return Err(BdrError::Prerequisite {
                msg: format!("{what}: no consensus worker runs for this database"),
                hint: "The manager starts it; see bdr.worker_tasks.".into(),
            });
        }
        if worker.1 {
            return Err(BdrError::Prerequisite {
                msg: "consensus is disabled on this node".into(),
                hint: "Enable it with bdr.consensus_enable().".into(),
            });
        }
        let Some(slot) = s.requests.iter().position(|r| r.state == ReqState::Free) else {
            return Err(BdrError::Prerequisite {
                msg: format!(
                    "{what}: {} consensus requests are already waiting",
                    shmem::MAX_REQUESTS
                ),
                hint: "Try again when fewer requests are in flight.".into(),
            });
        };
        // Ids are unique across restarts too: an entry proposed before one
        // may commit after it, and must not answer a new request.
        if s.next_id == 1 {
            s.next_id = (crate::shmem::now().max(1) as u64).wrapping_mul(1024);
        }
        let id = s.next_id;
        s.next_id += 1;
        let r = &mut s.requests[slot];
        r.state = ReqState::Submitted;
        r.dboid = dboid;
        r.id = id;
        // SAFETY: MyProc is set for every connected backend.
        r.waiter = unsafe { pg_sys::MyProc } as usize;
        r.created_at = started;
        r.detached = detached;
        r.len = data.len();
        r.data[..data.len()].copy_from_slice(&data);
        (slot, id, worker.0)
    };
    crate::shmem::set_latch_of(worker);
    Ok((slot, id, started))
}

/// Waits for the answer to the request in `slot`.
fn wait_for(slot: usize, id: u64, started: i64, what: &str, timeout_ms: i64) -> BdrResult<Applied> {
    loop {
        {
            let mut s = CONSENSUS.exclusive();
            let r = &mut s.requests[slot];
            if r.id == id && r.state == ReqState::Done {
                let out = Applied::decode(&r.data[..r.len]);
                *r = Default::default();
                let took = (crate::shmem::now() - started) / 1000;
                if took > crate::guc::get_int(crate::guc::RAFT_LOG_MIN_MESSAGE_DURATION) as i64 {
                    tracing::info!("consensus: {what} took {took} ms");
                }
                return out.ok_or_else(|| BdrError::Prerequisite {
                    msg: format!("{what}: the consensus worker could not read the request"),
                    hint: String::new(),
                });
            }
            let waited = (crate::shmem::now() - started) / 1000;
            if waited >= timeout_ms {
                let proposed = r.id == id && r.state == ReqState::Proposed;
                drop(s);
                // Never proposed: freed, it cannot take effect.
                give_up(slot, id);
                return Err(no_majority(what, waited, proposed));
            }
        }
        let left = timeout_ms - (crate::shmem::now() - started) / 1000;
        // A cancel while waiting gives the slot up as a timeout does.
        pgrx::PgTryBuilder::new(|| crate::pg::latch::wait(None, left.clamp(1, SUBMIT_POLL_MS)))
            .catch_others(|e| {
                give_up(slot, id);
                e.rethrow()
            })
            .execute();
    }
}

/// Gives up request `id` in `slot`: freed if it was never proposed, else
/// left for the worker to free once it applies.
fn give_up(slot: usize, id: u64) {
    let mut s = CONSENSUS.exclusive();
    let r = &mut s.requests[slot];
    if r.id != id {
        return;
    }
    if r.state == ReqState::Submitted || r.state == ReqState::Done {
        *r = Default::default();
    } else {
        r.state = ReqState::Abandoned;
    }
}

/// The state machine as this node last applied it (empty before it
/// applied anything).
pub fn applied_state() -> BdrResult<bdr_core::consensus::State> {
    let bytes = crate::pg::user::as_bdr(crate::catalog::consensus_state)?;
    Ok(bytes
        .and_then(|b| bdr_core::consensus::State::decode(&b))
        .unwrap_or_default())
}

/// This node's view of its consensus group: what its worker published,
/// and whether one runs.
pub struct Status {
    pub raft: shmem::Status,
    pub role: Role,
    pub voters: Vec<u64>,
    pub running: bool,
    pub disabled: bool,
}

pub fn status() -> Status {
    let s = CONSENSUS.share();
    let d = s.db(my_database());
    let raft = d.map(|d| d.status).unwrap_or_default();
    Status {
        raft,
        role: match raft.role {
            2 => Role::Leader,
            1 => Role::Candidate,
            _ => Role::Follower,
        },
        voters: raft.voters[..raft.nvoters].to_vec(),
        running: d.is_some_and(|d| d.worker != 0),
        disabled: d.is_some_and(|d| d.disabled),
    }
}

/// BDR 4's `bdr.monitor_group_raft()`: asks every member for its Raft
/// state and says whether the group agrees on one leader.
pub fn group_health() -> BdrResult<(&'static str, &'static str)> {
    use crate::peer::Peer;
    let Some(local) = crate::catalog::local_node()? else {
        return Ok(bdr_core::consensus::raft_health(&[]));
    };
    if local.node_group_id == 0 {
        return Ok(bdr_core::consensus::raft_health(&[]));
    }
    let me = status();
    let mut states = vec![(me.running, me.role, me.raft.leader)];
    for p in crate::catalog::group_peers(&local)?
        .into_iter()
        .filter(|p| p.node_id != local.node_id && p.node_state != bdr_core::node::NodeState::Parted)
    {
        let seen = Peer::connect(&p.node_name, &p.node_dsn, "bdr monitor")
            .and_then(|c| c.consensus_state());
        states.push(match seen {
            Ok((state, leader)) => (
                state != "NOT_RUNNING",
                match state.as_str() {
                    "RAFT_LEADER" => Role::Leader,
                    "RAFT_CANDIDATE" => Role::Candidate,
                    _ => Role::Follower,
                },
                leader,
            ),
            Err(_) => (false, Role::Follower, 0),
        });
    }
    Ok(bdr_core::consensus::raft_health(&states))
}

/// Hands the leadership to `node_id`; with `wait`, until it has it (at
/// most `bdr.raft_response_timeout`).
pub fn transfer_leadership(node_id: u32, wait: bool) -> BdrResult<()> {
    if !status().voters.contains(&(node_id as u64)) {
        return Err(BdrError::Prerequisite {
            msg: format!("node {node_id} is not a voter of the group's consensus"),
            hint: "See the voters in bdr.get_consensus_status().".into(),
        });
    }
    submit(
        &Request::TransferLeader(node_id as u64),
        "transferring the leadership",
    )?;
    if !wait {
        return Ok(());
    }
    let timeout_ms = crate::guc::get_int(crate::guc::RAFT_RESPONSE_TIMEOUT).max(0) as i64;
    let started = crate::shmem::now();
    while status().raft.leader != node_id as u64 {
        if (crate::shmem::now() - started) / 1000 >= timeout_ms {
            return Err(BdrError::OutcomeUnknown {
                msg: format!("node {node_id} did not take the leadership within {timeout_ms} ms"),
                hint: "It may still take it; see bdr.get_consensus_status().".into(),
            });
        }
        crate::pg::latch::wait(None, SUBMIT_POLL_MS);
    }
    Ok(())
}

/// The state machine as applied here, with a header, for
/// `bdr.consensus_snapshot_export`.
pub fn snapshot_export() -> BdrResult<Vec<u8>> {
    let state =
        crate::catalog::consensus_state_machine()?.ok_or_else(|| BdrError::Prerequisite {
            msg: "this node has no consensus state".into(),
            hint: "Create or join a BDR group first.".into(),
        })?;
    Ok(bdr_core::consensus::export_snapshot(&state))
}

/// Replaces the group's consensus state machine with an exported one, on
/// every node at the same point of the log.
pub fn snapshot_import(snapshot: &[u8]) -> BdrResult<()> {
    let state =
        bdr_core::consensus::verify_snapshot(snapshot).map_err(|msg| BdrError::InvalidValue {
            what: "consensus snapshot",
            msg,
        })?;
    let a = submit(
        &Request::Command(bdr_core::consensus::Command::Restore {
            state: state.encode(),
        }),
        "importing a consensus snapshot",
    )?;
    if a.ok {
        Ok(())
    } else {
        Err(BdrError::InvalidValue {
            what: "consensus snapshot",
            msg: "the snapshot's state machine does not decode".into(),
        })
    }
}

/// `bdr.consensus_disable()` / `enable()`: the worker stops taking part
/// (drops what peers send and what backends submit) or takes part again.
pub fn set_disabled(disabled: bool) -> BdrResult<()> {
    let mut s = CONSENSUS.exclusive();
    match s.db_or_take(my_database()) {
        Some(d) => {
            d.disabled = disabled;
            Ok(())
        }
        None => Err(BdrError::Prerequisite {
            msg: "no consensus runs in this database".into(),
            hint: "Create or join a BDR group first.".into(),
        }),
    }
}
