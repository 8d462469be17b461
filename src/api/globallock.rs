//! SQL functions of the global locks (`crate::globallock`).

use crate::error::OrRaise;
use pgrx::prelude::*;

/// Takes the group's advisory lock `key` for this session, waiting up to
/// `bdr.global_lock_timeout`.
#[pg_extern(volatile, name = "global_advisory_lock")]
fn global_advisory_lock(key: i64) {
    crate::globallock::advisory_lock(key, None).or_raise()
}

#[pg_extern(volatile, name = "global_advisory_lock")]
fn global_advisory_lock2(key1: i32, key2: i32) {
    crate::globallock::advisory_lock(key1 as i64, Some(key2)).or_raise()
}

/// Lets the group's advisory lock `key` go; false if this session did not
/// hold it.
#[pg_extern(volatile, name = "global_advisory_unlock")]
fn global_advisory_unlock(key: i64) -> bool {
    crate::globallock::advisory_unlock(key, None).or_raise()
}

#[pg_extern(volatile, name = "global_advisory_unlock")]
fn global_advisory_unlock2(key1: i32, key2: i32) -> bool {
    crate::globallock::advisory_unlock(key1 as i64, Some(key2)).or_raise()
}

/// The group's global locks as this node's consensus state holds them.
#[pg_extern(stable)]
fn _global_locks() -> TableIterator<
    'static,
    (
        name!(lock_key, String),
        name!(lock_type, String),
        name!(origin_node_id, pg_sys::Oid),
        name!(origin_node_name, String),
        name!(pid, i32),
        name!(acquired_us, i64),
        name!(statement, String),
    ),
> {
    let rows = crate::globallock::locks().or_raise();
    TableIterator::new(rows.into_iter().map(|(k, _, h)| {
        (
            k,
            h.lock_type,
            pg_sys::Oid::from(h.node_id),
            h.node_name,
            h.pid,
            h.acquired_us,
            h.statement,
        )
    }))
}

/// Takes the global DML lock on `relation` for this transaction: writes to
/// it stop on every node until the transaction ends, and it returns once
/// every node has applied what every node wrote to it before. The user's
/// `bdr.global_lock_table(regclass)` wraps it (`sql/bdr_finalize.sql`).
#[pg_extern(volatile)]
fn _global_lock_table(relation: pg_sys::Oid) {
    crate::dmllock::global_lock_table(relation).or_raise()
}

/// Waits until transaction `origin_topxid` of node `origin_node_id` has
/// been applied on this node, or on every node (`allnodes`), at most
/// `bdr.global_lock_timeout`.
#[pg_extern(volatile)]
fn wait_for_xid_progress(
    origin_node_id: pg_sys::Oid,
    origin_topxid: i32,
    allnodes: default!(bool, true),
) {
    crate::dmllock::wait_for_xid_progress(origin_node_id.to_u32(), origin_topxid as u32, allnodes)
        .or_raise()
}

/// A peer's part of the global DML lock (called over the requester's
/// connection): stops writes to `relation` here; returns the LSN this
/// node's marker ends after.
#[pg_extern(volatile)]
fn _dml_lock_acquire(relation: &str, lock_id: i64, origin_node: i64, timeout_ms: i64) -> String {
    let l = crate::dmllock::acquire_for_peer(relation, lock_id, origin_node as u32, timeout_ms)
        .or_raise();
    bdr_core::lsn::format(l)
}

/// Hands this session's part of lock `lock_id` over to the writer, until
/// the origin's transaction ending after `after` is applied here.
#[pg_extern(volatile)]
fn _dml_lock_handover(lock_id: i64, after: &str) -> bool {
    let Some(after) = bdr_core::lsn::parse(after) else {
        crate::error::BdrError::InvalidValue {
            what: "after",
            msg: format!("\"{after}\" is not an LSN"),
        }
        .raise()
    };
    crate::dmllock::handover(lock_id, after)
}

/// Commits a marker transaction; returns the LSN it ends after.
#[pg_extern(volatile)]
fn _progress_marker() -> String {
    bdr_core::lsn::format(crate::dmllock::write_marker().or_raise())
}

/// "" when this node has applied each node's target LSN, else which not.
#[pg_extern(volatile)]
fn _caught_up(targets: &str) -> String {
    crate::dmllock::caught_up(targets).or_raise()
}

/// What became of this node's transaction `xid`.
#[pg_extern(volatile)]
fn _xid_status(xid: i64) -> Option<String> {
    crate::dmllock::xid_status(xid as u32)
}

/// The global DML locks this node's table holds.
#[pg_extern(volatile)]
fn _dml_locks() -> TableIterator<
    'static,
    (
        name!(origin_node_id, pg_sys::Oid),
        name!(relation, pg_sys::Oid),
        name!(pid, i32),
        name!(acquired_us, i64),
    ),
> {
    TableIterator::new(
        crate::dmllock::locks_here()
            .into_iter()
            .map(|(o, r, p, a)| (pg_sys::Oid::from(o), pg_sys::Oid::from(r), p, a)),
    )
}
