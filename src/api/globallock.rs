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
