//! Local commit timestamps that never fall behind what this node has seen
//! (`bdr_core::hlc`): the rule that makes last-update-wins independent of
//! clock skew.
//!
//! Every commit under a replication origin that carries a chosen timestamp
//! (writers applying a peer's transaction, sessions under `bdr_local`)
//! publishes it in shared memory before it becomes visible. A local
//! transaction that wrote something checks at PRE_COMMIT whether the wall
//! clock is past the newest published timestamp; if not, it borrows one of
//! the `bdr_local_<n>` origins and commits with `newest + 1 µs`, so that its
//! write is later than every version it can have replaced. When every pool
//! origin is busy it waits until one is free or the clock has passed, so it
//! is never wrong, only slower. With clocks in sync the check is one atomic
//! read per writing transaction.

use bdr_core::hlc::{local_commit_stamp, pool_origin_name, POOL_SIZE};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};

/// Set in a pool entry while a backend holds that origin; the low 16 bits
/// are the origin's id, 0 while the entry is not ready.
const BUSY: u32 = 1 << 16;
/// How long a commit waits between looks for a free pool origin.
const POOL_RETRY_MS: i64 = 1;
/// How many of the newest transactions' commit timestamps seed `newest`
/// after a restart (shared memory starts empty): what was applied from a
/// peer just before a crash may still lie in this node's future.
const SEED_XIDS: u32 = 100_000;
/// How long a commit waits for another backend that is seeding `newest`.
const SEED_WAIT_MS: i64 = 1_000;

/// `Clock::seeded` states.
const UNSEEDED: u32 = 0;
const SEEDING: u32 = 1;
const SEEDED: u32 = 2;

#[derive(Default)]
pub struct Clock {
    newest: AtomicI64,
    seeded: AtomicU32,
    /// The id of `bdr_local`, 0 until a manager has looked it up.
    local_origin: AtomicU32,
    pool: [AtomicU32; POOL_SIZE],
}

// SAFETY: only atomics, valid in shared memory at any address.
unsafe impl PGRXSharedMemory for Clock {}

// SAFETY: the only shared memory of this name.
static CLOCK: PgAtomic<Clock> = unsafe { PgAtomic::new(c"bdr_hlc") };

thread_local! {
    /// Set in processes whose commits the clock must leave alone (writers).
    static EXEMPT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The pool entry this backend borrowed for its current commit, and
/// whether its origin session is set up.
    static BORROWED: std::cell::Cell<Option<(usize, bool)>> = const { std::cell::Cell::new(None) };
}

pub fn init() {
    pg_shmem_init!(CLOCK);
    // SAFETY: _PG_init in the postmaster; every backend inherits the callback.
    unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
}

/// Makes the clock leave this process's commits alone: a writer's commits
/// carry a peer's timestamp, or are bookkeeping (conflict history after a
/// stopped apply) while its origin session stays set up, where borrowing
/// another origin would fail.
pub fn exempt_this_process() {
    EXEMPT.set(true);
}

/// Whether this process is a bdr writer (exempt from the clock; its DDL
/// is a peer's, not to be queued again).
pub fn is_exempt() -> bool {
    EXEMPT.get()
}

/// Records that a commit with timestamp `ts` (µs since 2000) is about to
/// become visible on this node.
pub fn publish(ts: i64) {
    CLOCK.get().newest.fetch_max(ts, Ordering::AcqRel);
}

/// The newest commit timestamp published on this node.
pub fn newest() -> i64 {
    CLOCK.get().newest.load(Ordering::Acquire)
}

/// After a restart, before the first local commit is stamped: the newest
/// commit timestamp among the last `SEED_XIDS` transactions, read from
/// PostgreSQL's commit timestamp store (the first writing transaction pays
/// for it, once; others wait for it, at most `SEED_WAIT_MS`).
fn ensure_seeded() {
    let clock = CLOCK.get();
    let give_up = crate::shmem::now() + SEED_WAIT_MS * 1000;
    loop {
        match clock.seeded.load(Ordering::Acquire) {
            SEEDED => return,
            UNSEEDED
                if clock
                    .seeded
                    .compare_exchange(UNSEEDED, SEEDING, Ordering::AcqRel, Ordering::Acquire)
                    .is_ok() =>
            {
                // Back to unseeded if the scan raises an ERROR, so that the
                // next commit tries again instead of waiting for it.
                pgrx::PgTryBuilder::new(|| {
                    publish(newest_recent_commit().max(read_floor()));
                    clock.seeded.store(SEEDED, Ordering::Release);
                })
                .finally(|| {
                    let _ = clock.seeded.compare_exchange(
                        SEEDING,
                        UNSEEDED,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                })
                .execute();
                return;
            }
            _ if crate::shmem::now() > give_up => return,
            _ => crate::pg::latch::wait(None, POOL_RETRY_MS),
        }
    }
}

/// Publishes the real commit timestamps of the rows a join copied here
/// (`bdr.copied_row`): the copies themselves carry the earliest timestamp,
/// and a local write over one must be later than its real version.
pub fn publish_copied() {
    match crate::catalog::newest_copied_commit() {
        Ok(Some(ts)) => publish(ts),
        Ok(None) => {}
        Err(e) => tracing::warn!("could not read bdr.copied_row: {e}"),
    }
}

/// Where `newest` is kept while it lies ahead of the wall clock (relative to
/// the data directory, every backend's working directory).
const FLOOR_FILE: &str = "pg_logical/bdr_clock";

thread_local! {
    /// What this process last wrote to `FLOOR_FILE`.
    static SAVED: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

/// Writes `newest` to disk while it lies ahead of the wall clock, so that a
/// restart seeds the clock with it even when the transactions that carried
/// it are older than the seed's scan. Called by the managers at every poll;
/// costs nothing while the clocks agree.
pub fn save_floor() {
    let n = newest();
    if n <= crate::shmem::now() || n <= SAVED.get() {
        return;
    }
    let tmp = format!("{FLOOR_FILE}.{}", std::process::id());
    let r = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(n.to_string().as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, FLOOR_FILE)
    })();
    match r {
        Ok(()) => SAVED.set(n),
        Err(e) => tracing::warn!("could not write {FLOOR_FILE}: {e}"),
    }
}

fn read_floor() -> i64 {
    std::fs::read_to_string(FLOOR_FILE)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The first normal transaction id (PostgreSQL's FirstNormalTransactionId).
const FIRST_NORMAL_XID: u32 = 3;

fn newest_recent_commit() -> i64 {
    // SAFETY: reads a setting.
    if !unsafe { pg_sys::track_commit_timestamp } {
        return 0;
    }
    // SAFETY: reads the next xid and commit timestamps, which PostgreSQL
    // answers (false) for xids it has no data for.
    unsafe {
        let next = pg_sys::ReadNextFullTransactionId().value as u32;
        let mut newest = 0;
        for back in 1..=SEED_XIDS {
            let xid = next.wrapping_sub(back);
            if xid < FIRST_NORMAL_XID {
                break;
            }
            let mut ts = 0;
            let mut origin = 0;
            if pg_sys::TransactionIdGetCommitTsData(
                pg_sys::TransactionId::from(xid),
                &mut ts,
                &mut origin,
            ) {
                newest = newest.max(ts);
            }
        }
        newest
    }
}

/// Makes the pool origins usable: each gets its replication-origin state in
/// shared memory here, in a worker where a failure (no free state: too low
/// `max_replication_slots`) only costs a warning, never at a user's commit.
/// Run by every manager at start, in a transaction; cheap when done already.
pub fn prepare_pool() {
    let clock = CLOCK.get();
    // SAFETY: a catalog lookup inside the caller's transaction.
    let local =
        unsafe { pg_sys::replorigin_by_name(crate::output_plugin::LOCAL_ORIGIN.as_ptr(), true) };
    clock.local_origin.store(local as u32, Ordering::Release);
    // Origin states are bounded by max_replication_slots; the peers' origins
    // come first. Prepared only while every origin that exists can have one.
    let origins = Spi::connect(|c| {
        c.select(
            "SELECT count(*) FROM pg_catalog.pg_replication_origin",
            Some(1),
            &[],
        )?
        .first()
        .get_one::<i64>()
    });
    // SAFETY: reads a setting.
    let states = unsafe { pg_sys::max_replication_slots } as i64;
    if origins.ok().flatten().unwrap_or(i64::MAX) > states {
        if clock.pool.iter().all(|e| e.load(Ordering::Acquire) == 0) {
            tracing::warn!(
                "max_replication_slots ({states}) is lower than the number of replication origins: local commits after a peer's future-dated change wait for the clock instead of borrowing a bdr_local_<n> origin (raise max_replication_slots)"
            );
        }
        return;
    }
    for (i, entry) in clock.pool.iter().enumerate() {
        if entry.load(Ordering::Acquire) != 0 {
            continue;
        }
        let name = std::ffi::CString::new(pool_origin_name(i + 1)).unwrap_or_default();
        // SAFETY: a catalog lookup inside the caller's transaction.
        let id = unsafe { pg_sys::replorigin_by_name(name.as_ptr(), true) } as u32;
        if id == 0 {
            continue;
        }
        // Claimed busy while being set up, so that no commit borrows it.
        if entry
            .compare_exchange(0, id | BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            continue;
        }
        let ok = crate::pg::xact::in_subtransaction(|| {
            // SAFETY: the origin exists and no backend holds it (the entry
            // was 0); set up and released at once, which leaves its state.
            unsafe {
                pg_sys::replorigin_session_setup(id as pg_sys::RepOriginId);
                pg_sys::replorigin_session_reset();
            }
        });
        match ok {
            Ok(()) => entry.store(id, Ordering::Release),
            Err(e) => {
                entry.store(0, Ordering::Release);
                tracing::warn!(
                    "replication origin {} cannot be used: {e}; local commits after a peer's future-dated change wait for the clock instead (raise max_replication_slots)",
                    name.to_string_lossy()
                );
            }
        }
    }
}

fn borrow() -> Option<(usize, u32)> {
    let clock = CLOCK.get();
    clock.pool.iter().enumerate().find_map(|(i, e)| {
        let v = e.load(Ordering::Acquire);
        (v != 0
            && v & BUSY == 0
            && e.compare_exchange(v, v | BUSY, Ordering::AcqRel, Ordering::Acquire)
                .is_ok())
        .then_some((i, v))
    })
}

fn any_ready() -> bool {
    CLOCK
        .get()
        .pool
        .iter()
        .any(|e| e.load(Ordering::Acquire) != 0)
}

/// Whether this database has bdr (read on the rare path only).
fn bdr_database() -> bool {
    // SAFETY: a syscache lookup inside the committing transaction.
    unsafe { pg_sys::get_extension_oid(c"bdr".as_ptr(), true) != pg_sys::InvalidOid }
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_PRE_COMMIT => pre_commit(),
        pg_sys::XactEvent::XACT_EVENT_COMMIT
        | pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => give_back(),
        _ => {}
    }
}

fn pre_commit() {
    if EXEMPT.get() {
        return;
    }
    // SAFETY: reading the session's origin settings, as xact.c does.
    let (origin, chosen) = unsafe {
        (
            pg_sys::replorigin_session_origin,
            pg_sys::replorigin_session_origin_timestamp,
        )
    };
    if origin != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
        // A session under `bdr_local` chose the timestamp of a local change
        // (part's catch-up, tests). Other origins (PostgreSQL's own
        // subscriptions, other tools) carry foreign clocks: not published.
        if chosen != 0 && origin as u32 == CLOCK.get().local_origin.load(Ordering::Acquire) {
            publish(chosen);
        }
        return;
    }
    // SAFETY: no preconditions; a transaction without an xid wrote nothing.
    if unsafe { pg_sys::GetTopTransactionIdIfAny() } == pg_sys::InvalidTransactionId {
        return;
    }
    ensure_seeded();
    if local_commit_stamp(crate::shmem::now(), newest()).is_none() || !bdr_database() {
        return;
    }
    loop {
        if let Some((i, id)) = borrow() {
            // Read again now that the origin is ours: later publishes count.
            let stamp = local_commit_stamp(crate::shmem::now(), newest());
            let Some(stamp) = stamp else {
                CLOCK.get().pool[i].fetch_and(!BUSY, Ordering::AcqRel);
                return;
            };
            // SAFETY: the pool entry makes this backend the origin's only
            // user; the origin is released at the end of the transaction
            // (give_back), also when the commit fails.
            unsafe {
                BORROWED.set(Some((i, false)));
                pg_sys::replorigin_session_setup(id as pg_sys::RepOriginId);
                BORROWED.set(Some((i, true)));
                pg_sys::replorigin_session_origin = id as pg_sys::RepOriginId;
                pg_sys::replorigin_session_origin_lsn = 0;
                pg_sys::replorigin_session_origin_timestamp = stamp;
            }
            publish(stamp);
            return;
        }
        if local_commit_stamp(crate::shmem::now(), newest()).is_none() {
            return;
        }
        let wait = if any_ready() {
            POOL_RETRY_MS
        } else {
            // No pool origin at all: wait out the skew itself.
            ((newest() - crate::shmem::now()) / 1000).clamp(1, 1000)
        };
        crate::pg::latch::wait(None, wait);
    }
}

fn give_back() {
    let Some((i, set_up)) = BORROWED.take() else {
        return;
    };
    if set_up {
        // SAFETY: this backend set the origin up in pre_commit.
        unsafe {
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
            pg_sys::replorigin_session_origin_lsn = 0;
            pg_sys::replorigin_session_origin_timestamp = 0;
            pg_sys::replorigin_session_reset();
        }
    }
    CLOCK.get().pool[i].fetch_and(!BUSY, Ordering::AcqRel);
}
