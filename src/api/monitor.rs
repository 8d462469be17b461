//! Version and worker monitoring functions.

use crate::shmem::{self, Task, TASKS};
use bdr_core::version;
use pgrx::prelude::*;

/// The bdr version as text, e.g. `4.0.0`.
#[pg_extern(immutable, parallel_safe)]
fn bdr_version() -> &'static str {
    version::VERSION
}

/// The bdr version as MAJOR*10000 + MINOR*100 + PATCH.
#[pg_extern(immutable, parallel_safe)]
fn bdr_version_num() -> i32 {
    version::VERSION_NUM
}

/// One row per task in use of the shared-memory task table.
fn task_rows<R>(row: impl Fn(&Task) -> R) -> Vec<R> {
    TASKS
        .share()
        .tasks
        .iter()
        .filter(|t| t.in_use)
        .map(row)
        .collect()
}

/// Raw rows of the shared-memory task table; `bdr.worker_tasks` presents them.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn _worker_tasks() -> TableIterator<
    'static,
    (
        name!(role, i32),
        name!(role_name, String),
        name!(dboid, pg_sys::Oid),
        name!(subid, pg_sys::Oid),
        name!(pid, i32),
        name!(registered, i64),
        name!(attached, i64),
        name!(exited, i64),
        name!(success, bool),
        name!(next_launch_not_before, i64),
        name!(last_request_pid, i32),
        name!(last_request_time, i64),
        name!(last_request_approved, bool),
        name!(nrequests, i64),
        name!(nregistrations, i64),
        name!(prev_pid, i32),
        name!(prev_registered, i64),
        name!(prev_launched, i64),
        name!(prev_exited, i64),
        name!(first_registered, i64),
        name!(failures, i32),
    ),
> {
    TableIterator::new(task_rows(|t| {
        (
            t.role as i32,
            t.role.name().to_string(),
            pg_sys::Oid::from(t.dboid),
            pg_sys::Oid::from(t.subid),
            t.pid,
            t.registered,
            t.attached,
            t.exited,
            t.success(),
            t.next_launch_not_before,
            t.last_request_pid,
            t.last_request_time,
            t.last_request_approved,
            t.nrequests,
            t.nregistrations,
            t.prev_pid,
            t.prev_registered,
            t.prev_launched,
            t.prev_exited,
            t.first_registered,
            t.failures as i32,
        )
    }))
}

/// Replication state of receivers and writers, and the last error of every
/// task; `bdr.subscription_summary` and `bdr.worker_errors` present them.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn _worker_status() -> TableIterator<
    'static,
    (
        name!(role_name, String),
        name!(dboid, pg_sys::Oid),
        name!(subid, pg_sys::Oid),
        name!(connected, bool),
        name!(role, i32),
        name!(pid, i32),
        name!(recv_lsn, String),
        name!(recv_commit_lsn, String),
        name!(flush_lsn, String),
        name!(replay_lsn, String),
        name!(replay_time, i64),
        name!(ncommits, i64),
        name!(last_error, Option<String>),
        name!(last_error_time, i64),
        name!(last_error_pid, i32),
    ),
> {
    use bdr_core::lsn::format;
    TableIterator::new(task_rows(|t| {
        let err = t.last_error.as_str();
        (
            t.role.name().to_string(),
            pg_sys::Oid::from(t.dboid),
            pg_sys::Oid::from(t.subid),
            t.connected && t.pid != 0,
            t.role as i32,
            t.pid,
            format(t.recv_lsn),
            format(t.recv_commit_lsn),
            format(t.flush_lsn),
            format(t.replay_lsn),
            t.replay_time,
            t.ncommits,
            (!err.is_empty()).then(|| err.to_string()),
            t.last_error_time,
            t.last_error_pid,
        )
    }))
}

/// Lets every worker that is waiting out a backoff be launched at once.
#[pg_extern(volatile)]
fn worker_task_reset_backoff_all() {
    let proc_ = {
        let mut t = TASKS.exclusive();
        for task in t.tasks.iter_mut().filter(|t| t.in_use) {
            task.next_launch_not_before = 0;
            task.failures = 0;
        }
        t.supervisor_proc
    };
    shmem::set_latch_of(proc_);
}

/// The name of the slot on a node (in database `db`) for peer `target`.
#[pg_extern(immutable, parallel_safe)]
fn _slot_name(db: &str, group: &str, target: &str) -> String {
    bdr_core::naming::slot_name(db, group, target)
}

/// Where the last WAL record written so far ends. Unlike
/// pg_current_wal_insert_lsn(), which may point past a page header no
/// record has reached yet, peers can confirm exactly this position.
#[pg_extern(volatile, parallel_safe)]
fn _wal_insert_end_lsn() -> String {
    // SAFETY: reads a WAL position; no preconditions.
    bdr_core::lsn::format(unsafe { pg_sys::GetXLogInsertEndRecPtr() })
}

/// Wakes this database's manager when the calling transaction commits, so it
/// acts on catalog changes (e.g. a subscription disabled) at once.
#[pg_extern(volatile)]
fn _wake_manager_at_commit() {
    crate::shmem::wake_workers_at_commit();
}

/// Whether a relation of this kind, persistence and schema replicates
/// (`bdr_core::tables::replicates`, the rule the output plugin follows).
#[pg_extern(immutable, parallel_safe)]
fn _replicates(relkind: i8, relpersistence: i8, nspname: &str) -> bool {
    bdr_core::tables::replicates(relkind as u8, relpersistence as u8, nspname)
}
