//! SQL functions of the group's consensus: its status, the key-value store
//! on it, switching it off and on, and the internal ones peers call (the
//! message transport, voter changes). The consensus itself is
//! `crate::consensus`.

use crate::consensus::{self, Status};
use crate::error::{BdrError, BdrResult, OrRaise};
use bdr_core::consensus::{Command, Request, PROTO_VERSION};
use pgrx::prelude::*;
use pgrx::JsonB;

/// This node's view of the group's consensus: its Raft state, the leader
/// it follows, the log positions and the voters. (`bdr.get_raft_status()`
/// is the same, under BDR 4's other name, in `sql/bdr_finalize.sql`.)
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn get_consensus_status() -> TableIterator<
    'static,
    (
        name!(node_id, pg_sys::Oid),
        name!(node_name, Option<String>),
        name!(state, &'static str),
        name!(leader_id, pg_sys::Oid),
        name!(leader_name, Option<String>),
        name!(current_term, i64),
        name!(commit_index, i64),
        name!(apply_index, i64),
        name!(last_index, i64),
        name!(snapshot_index, i64),
        name!(voting_nodes, i32),
        name!(voters, Vec<pg_sys::Oid>),
        name!(protocol_version, i32),
        name!(enabled, bool),
    ),
> {
    TableIterator::once({
        let s: Status = consensus::status();
        let name_of = |id: u64| {
            crate::catalog::node_by_id(id as u32)
                .ok()
                .flatten()
                .map(|n| n.node_name)
        };
        let state = if !s.running {
            "NOT_RUNNING"
        } else {
            s.role.name()
        };
        (
            pg_sys::Oid::from(s.raft.node_id as u32),
            name_of(s.raft.node_id),
            state,
            pg_sys::Oid::from(s.raft.leader as u32),
            (s.raft.leader != 0)
                .then(|| name_of(s.raft.leader))
                .flatten(),
            s.raft.term as i64,
            s.raft.commit as i64,
            s.raft.applied as i64,
            s.raft.last_index as i64,
            s.raft.snapshot_index as i64,
            s.voters.len() as i32,
            s.voters
                .iter()
                .map(|v| pg_sys::Oid::from(*v as u32))
                .collect(),
            PROTO_VERSION,
            !s.disabled,
        )
    })
}

#[pg_extern(immutable, parallel_safe)]
fn consensus_proto_version() -> i32 {
    PROTO_VERSION
}

/// Stops this node's consensus worker from taking part (it drops what
/// peers send and what sessions submit) until `bdr.consensus_enable()`.
#[pg_extern(volatile)]
fn consensus_disable() {
    consensus::set_disabled(true).or_raise()
}

#[pg_extern(volatile)]
fn consensus_enable() {
    consensus::set_disabled(false).or_raise()
}

fn now_us() -> i64 {
    crate::shmem::now()
}

fn kv_store(
    key: &str,
    value: JsonB,
    prev: Option<JsonB>,
    ttl: Option<i32>,
) -> BdrResult<Option<i64>> {
    if ttl.is_some_and(|t| t <= 0) {
        return Err(BdrError::InvalidValue {
            what: "ttl",
            msg: "a time to live is a positive number of milliseconds".into(),
        });
    }
    let text = |j: &JsonB| serde_json::to_string(&j.0).unwrap_or_default();
    let value = (!value.0.is_null()).then(|| text(&value));
    let cmd = Command::KvStore {
        key: key.to_string(),
        value,
        prev: prev.map(|p| (!p.0.is_null()).then(|| text(&p))),
        ttl_ms: ttl.map(i64::from),
        now_us: now_us(),
    };
    let a = consensus::submit(&Request::Command(cmd), "storing a consensus key")?;
    Ok(a.ok.then_some(a.at_us))
}

/// Stores `value` under `key` once a majority of the group agrees; with
/// `prev_value`, only if the key holds that value now (JSON null: only if
/// it is absent). `ttl`: milliseconds until the entry expires. Returns when
/// it took effect, or NULL when `prev_value` did not match; fails after
/// `bdr.raft_response_timeout` without a majority.
#[pg_extern(volatile)]
fn consensus_kv_store(
    key: &str,
    value: JsonB,
    prev_value: default!(Option<JsonB>, "NULL"),
    ttl: default!(Option<i32>, "NULL"),
) -> Option<TimestampWithTimeZone> {
    kv_store(key, value, prev_value, ttl)
        .or_raise()
        .and_then(|us| TimestampWithTimeZone::try_from(us).ok())
}

/// The value of `key` as the group agreed it: the read goes through the
/// log, so it sees every store committed before it.
#[pg_extern(volatile)]
fn consensus_kv_fetch(key: &str) -> Option<JsonB> {
    let cmd = Command::KvFetch {
        key: key.to_string(),
        now_us: now_us(),
    };
    let a = consensus::submit(&Request::Command(cmd), "fetching a consensus key").or_raise();
    a.value
        .and_then(|v| serde_json::from_str(&v).ok())
        .map(JsonB)
}

/// Called by peers' consensus workers: hands their Raft messages to this
/// node's worker.
#[pg_extern(volatile)]
fn _consensus_deliver(msgs: &[u8]) -> bool {
    // SAFETY: MyDatabaseId is set for the life of a connected backend.
    let db = unsafe { pg_sys::MyDatabaseId.to_u32() };
    consensus::shmem::deliver(db, msgs)
}

/// Called by a joining or parting node: makes `node_id` a voter of the
/// group's consensus, or takes it out, and waits until that is committed.
#[pg_extern(volatile)]
fn _consensus_change_voter(node_id: i64, add: bool) -> bool {
    let req = if add {
        Request::AddVoter(node_id as u64)
    } else {
        Request::RemoveVoter(node_id as u64)
    };
    consensus::submit(&req, "changing the consensus voters").or_raise();
    true
}

/// BDR 4's health check of the group's consensus: `status` OK, WARNING,
/// CRITICAL or UNKNOWN, and what it means.
#[pg_extern(volatile)]
fn monitor_group_raft() -> TableIterator<'static, (name!(status, String), name!(message, String))> {
    let (s, m) = consensus::group_health().or_raise();
    TableIterator::once((s.to_string(), m.to_string()))
}

/// Hands the group's consensus leadership to `node_name`; with
/// `wait_for_completion`, returns once it has it.
#[pg_extern(volatile)]
fn raft_leadership_transfer(node_name: &str, wait_for_completion: bool) {
    let r: BdrResult<()> = (|| {
        let n = crate::catalog::node_by_name(node_name)?
            .ok_or_else(|| BdrError::NoSuchNode(node_name.to_string()))?;
        consensus::transfer_leadership(n.node_id, wait_for_completion)
    })();
    r.or_raise()
}

/// The consensus state machine as this node applied it, for
/// `bdr.consensus_snapshot_verify` (and a record of what the group agreed).
#[pg_extern(volatile)]
fn consensus_snapshot_export(version: default!(Option<i32>, "NULL")) -> Vec<u8> {
    if let Some(v) = version {
        if v != PROTO_VERSION {
            BdrError::InvalidValue {
                what: "version",
                msg: format!(
                    "this node exports consensus protocol version {PROTO_VERSION} only, not {v}"
                ),
            }
            .raise();
        }
    }
    consensus::snapshot_export().or_raise()
}

/// Checks that `snapshot` is a consensus snapshot this node can read.
#[pg_extern(immutable)]
fn consensus_snapshot_verify(snapshot: &[u8]) -> bool {
    bdr_core::consensus::verify_snapshot(snapshot)
        .map_err(|msg| BdrError::InvalidValue {
            what: "consensus snapshot",
            msg,
        })
        .or_raise();
    true
}

/// Replaces what the group's consensus holds with `snapshot` (from
/// `bdr.consensus_snapshot_export`), through the Raft log, so every node
/// makes the same change at the same point; needs a majority.
#[pg_extern(volatile)]
fn consensus_snapshot_import(snapshot: &[u8]) {
    consensus::snapshot_import(snapshot).or_raise()
}
