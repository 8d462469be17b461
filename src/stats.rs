//! Apply statistics per subscription (`bdr.stat_subscription`) and the
//! counter that tells writers to re-read the conflict settings. Kept in
//! shared memory: like PostgreSQL's own statistics they survive worker
//! restarts but not a server restart, and `bdr.reset_subscription_stats()`
//! clears them.

use crate::shmem::MAX_TASKS;
use bdr_core::conflict::ConflictType;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

#[derive(Debug, Clone, Copy, Default)]
pub struct SubStats {
    pub in_use: bool,
    pub dboid: u32,
    pub subid: u32,
    pub nconnect: i64,
    pub ncommit: i64,
    pub nabort: i64,
    pub nerror: i64,
    pub nskippedtx: i64,
    pub ninsert: i64,
    pub nupdate: i64,
    pub ndelete: i64,
    pub ntruncate: i64,
    pub ndeadlocks: i64,
    pub nretries: i64,
    pub connect_time: i64,
    pub last_disconnect_time: i64,
    pub start_lsn: u64,
    /// The remote transaction (commit LSN) the last stop happened in, and
    /// how many stops in a row happened there (`retries_at_same_lsn`).
    pub last_failed_lsn: u64,
    pub retries_at_same_lsn: i64,
    /// Commits by the writer running now.
    pub curr_ncommit: i64,
    pub conflicts: [i64; 13],
}

/// Row changes and conflicts a writer counted in one transaction, added to
/// the shared counters at its commit.
#[derive(Debug, Clone, Copy, Default)]
pub struct TxnCounts {
    pub ninsert: i64,
    pub nupdate: i64,
    pub ndelete: i64,
    pub ntruncate: i64,
    pub conflicts: [i64; 13],
}

impl TxnCounts {
    pub fn conflict(&mut self, t: ConflictType) {
        self.conflicts[t as usize] += 1;
    }
}

#[derive(Clone, Copy)]
pub struct Stats {
    pub subs: [SubStats; MAX_TASKS],
    /// Bumped when a transaction that changed the conflict resolvers or the
    /// log configuration commits; writers re-read them when it moves.
    pub conflict_config_generation: u64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            subs: [SubStats::default(); MAX_TASKS],
            conflict_config_generation: 1,
        }
    }
}

// SAFETY: plain data without pointers.
unsafe impl PGRXSharedMemory for Stats {}

// SAFETY: the only shared memory of this name.
pub static STATS: PgLwLock<Stats> = unsafe { PgLwLock::new(c"bdr_apply_stats") };

pub fn init() {
    pg_shmem_init!(STATS);
}

/// Runs `f` on the counters of subscription `subid` of database `dboid`,
/// creating them on first use. Does nothing when the table is full, or
/// when `bdr.track_subscription_apply` is off in this worker.
pub fn update(dboid: u32, subid: u32, f: impl FnOnce(&mut SubStats)) {
    if !crate::guc::get_bool(crate::guc::TRACK_SUBSCRIPTION_APPLY) {
        return;
    }
    let mut s = STATS.exclusive();
    let i = s
        .subs
        .iter()
        .position(|x| x.in_use && x.dboid == dboid && x.subid == subid)
        .or_else(|| s.subs.iter().position(|x| !x.in_use));
    if let Some(i) = i {
        let e = &mut s.subs[i];
        if !e.in_use {
            *e = SubStats {
                in_use: true,
                dboid,
                subid,
                ..SubStats::default()
            };
        }
        f(e);
    }
}

/// Adds one applied transaction's counts (`final_lsn`: its remote commit).
pub fn add_commit(dboid: u32, subid: u32, final_lsn: u64, c: &TxnCounts) {
    update(dboid, subid, |s| {
        if s.last_failed_lsn != 0 && final_lsn >= s.last_failed_lsn {
            // Past the transaction that failed: the retries are over.
            s.last_failed_lsn = 0;
            s.retries_at_same_lsn = 0;
        }
        s.ncommit += 1;
        s.curr_ncommit += 1;
        s.ninsert += c.ninsert;
        s.nupdate += c.nupdate;
        s.ndelete += c.ndelete;
        s.ntruncate += c.ntruncate;
        for (a, b) in s.conflicts.iter_mut().zip(c.conflicts.iter()) {
            *a += b;
        }
    });
}

/// Counts a writer that ended in an error while applying the remote
/// transaction committed at `lsn` (0: between transactions).
pub fn note_error(dboid: u32, subid: u32, lsn: u64, deadlock: bool) {
    update(dboid, subid, |s| {
        s.nerror += 1;
        if deadlock {
            s.ndeadlocks += 1;
        }
        if lsn != 0 {
            if s.last_failed_lsn == lsn {
                s.retries_at_same_lsn += 1;
            } else {
                s.last_failed_lsn = lsn;
                s.retries_at_same_lsn = 0;
            }
        }
    });
}

pub fn config_generation() -> u64 {
    STATS.share().conflict_config_generation
}

/// Makes writers re-read the conflict settings once the calling
/// transaction commits (the settings are transactional).
pub fn bump_config_generation_at_commit() {
    pgrx::callbacks::register_xact_callback(pgrx::callbacks::PgXactCallbackEvent::Commit, || {
        STATS.exclusive().conflict_config_generation += 1;
    });
}

/// Raw counters of this database's subscriptions; `bdr.stat_subscription`
/// adds names.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile)]
fn _stat_subscription() -> TableIterator<
    'static,
    (
        name!(subid, pg_sys::Oid),
        name!(counters, Vec<i64>),
        name!(conflicts, Vec<i64>),
        name!(start_lsn, i64),
    ),
> {
    // SAFETY: MyDatabaseId is set in every backend connected to a database.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let rows: Vec<_> = STATS
        .share()
        .subs
        .iter()
        .filter(|s| s.in_use && s.dboid == db)
        .map(|s| {
            (
                pg_sys::Oid::from(s.subid),
                vec![
                    s.nconnect,
                    s.ncommit,
                    s.nabort,
                    s.nerror,
                    s.nskippedtx,
                    s.ninsert,
                    s.nupdate,
                    s.ndelete,
                    s.ntruncate,
                    s.ndeadlocks,
                    s.nretries,
                    s.connect_time,
                    s.last_disconnect_time,
                    s.retries_at_same_lsn,
                    s.curr_ncommit,
                ],
                s.conflicts.to_vec(),
                s.start_lsn as i64,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// Clears the apply statistics of this database's subscriptions.
#[pg_extern(volatile)]
fn reset_subscription_stats() -> bool {
    // SAFETY: MyDatabaseId is set in every backend connected to a database.
    let db = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let mut s = STATS.exclusive();
    for e in s.subs.iter_mut().filter(|e| e.in_use && e.dboid == db) {
        *e = SubStats {
            in_use: true,
            dboid: e.dboid,
            subid: e.subid,
            ..SubStats::default()
        };
    }
    true
}
