//! The generator of snowflakeid and timeshard values: one state per
//! sequence in shared memory (every backend of the node takes from it),
//! its durable mark in the sequence itself, written about once a second
//! (`bdr_core::sequence::floor_to_write`) before any value past the last
//! mark is issued, so that values issued before a crash or restart are
//! never issued again, whatever the clock does.

use super::now_ms;
use crate::error::{BdrError, BdrResult};
use crate::pg::user::as_bdr;
use bdr_core::sequence::{self as layout, Generator, Kind, Step};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use std::cell::RefCell;
use std::collections::HashMap;

/// Sequences whose state is kept at once; one unused for `IDLE_MS` is
/// dropped for a new one (its state is read back from its durable mark).
const SLOTS: usize = 512;
const IDLE_MS: i64 = 10_000;

#[derive(Clone, Copy, Default)]
struct Slot {
    dboid: u32,
    seqid: u32,
    last_ms: i64,
    counter: i64,
    fallback: i64,
    /// The durable mark, in milliseconds: nothing at or past it is issued
    /// before a new one is written.
    durable_ms: i64,
    /// A backend is writing a new mark (without the lock: setval takes the
    /// sequence's own lock, which must never be waited for under ours).
    writing: bool,
    used_at: i64,
    /// This node's sequence id, read from the catalog when the slot was
    /// filled (not on every value).
    node: i64,
}

#[derive(Clone, Copy)]
pub struct Slots {
    s: [Slot; SLOTS],
}

impl Default for Slots {
    fn default() -> Self {
        Slots {
            s: [Slot::default(); SLOTS],
        }
    }
}

// SAFETY: plain data.
unsafe impl PGRXSharedMemory for Slots {}

// SAFETY: the only shared memory of this name.
static SEQS: PgLwLock<Slots> = unsafe { PgLwLock::new(c"bdr_sequences") };

pub fn init() {
    pg_shmem_init!(SEQS);
}

thread_local! {
    /// This session's last value of each sequence, for `bdr.seq_currval`.
    static LAST: RefCell<HashMap<u32, i64>> = RefCell::new(HashMap::new());
}

fn my_database() -> u32 {
    // SAFETY: MyDatabaseId is set for the life of a connected backend.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

/// Drops the state of a sequence whose layout was just set up again.
pub fn forget(seqid: u32) {
    let db = my_database();
    let mut s = SEQS.exclusive();
    for slot in s.s.iter_mut() {
        if slot.dboid == db && slot.seqid == seqid {
            *slot = Slot::default();
        }
    }
}

fn parts(kind: Kind, v: i64) -> (i64, i64, i64) {
    if kind == Kind::Timeshard {
        layout::timeshard_parts(v)
    } else {
        layout::snowflake_parts(v)
    }
}

fn compose(kind: Kind, ms: i64, node: i64, counter: i64) -> i64 {
    if kind == Kind::Timeshard {
        layout::timeshard_compose(ms, node, counter)
    } else {
        layout::snowflake_compose(ms, node, counter)
    }
}

fn fallback_counter(kind: Kind) -> i64 {
    if kind == Kind::Timeshard {
        layout::TIMESHARD_FALLBACK_COUNTER
    } else {
        layout::FALLBACK_COUNTER
    }
}

/// The sequence's own value (its durable mark, or the last plain
/// `nextval`), or `None` before its first `nextval`.
fn sequence_value(seqid: u32) -> Option<i64> {
    // SAFETY: a built-in function called with a valid sequence oid; bdr
    // reads its own mark whatever the session's privileges.
    as_bdr(|| unsafe {
        pgrx::direct_function_call::<i64>(
            pg_sys::pg_sequence_last_value,
            &[pg_sys::Oid::from(seqid).into_datum()],
        )
    })
}

fn find(s: &Slots, db: u32, seqid: u32, fallback: i64) -> Option<usize> {
    s.s.iter()
        .position(|x| x.dboid == db && x.seqid == seqid && x.fallback == fallback)
}

/// Clears a slot's `writing` if the mark's write fails (an ERROR unwinds
/// through here).
struct Writing {
    db: u32,
    seqid: u32,
    fallback: i64,
    armed: bool,
}

impl Drop for Writing {
    fn drop(&mut self) {
        if self.armed {
            let mut s = SEQS.exclusive();
            if let Some(i) = find(&s, self.db, self.seqid, self.fallback) {
                s.s[i].writing = false;
            }
        }
    }
}

fn pause() {
    // SAFETY: a plain sleep of 100 µs.
    unsafe { pg_sys::pg_usleep(100) };
    pgrx::check_for_interrupts!();
}

/// Drops the state of every sequence of database `db` (the node's
/// sequence id changed).
pub fn forget_database(db: u32) {
    let mut s = SEQS.exclusive();
    for slot in s.s.iter_mut().filter(|x| x.dboid == db) {
        *slot = Slot::default();
    }
}

/// The next value of snowflakeid or timeshard sequence `seqid`; `node_seq_id`
/// is asked only when the sequence's state is loaded.
pub fn next_value(
    seqid: u32,
    kind: Kind,
    node_seq_id: impl Fn() -> BdrResult<i64>,
) -> BdrResult<i64> {
    check_rights(seqid)?;
    let db = my_database();
    let fallback = fallback_counter(kind);
    let mut wait_started: Option<i64> = None;
    loop {
        let now = now_ms();
        let mut s = SEQS.exclusive();
        let i = match find(&s, db, seqid, fallback) {
            Some(i) => i,
            None => {
                drop(s);
                let node = node_seq_id()?;
                let floor = match sequence_value(seqid) {
                    Some(v) => parts(kind, v).0,
                    None => read_restart_value(seqid)
                        .map(|v| parts(kind, v).0)
                        .unwrap_or(0),
                };
                s = SEQS.exclusive();
                match find(&s, db, seqid, fallback) {
                    Some(i) => i,
                    None => {
                        // A state of another kind for this sequence is stale.
                        for x in s.s.iter_mut() {
                            if x.dboid == db && x.seqid == seqid && !x.writing {
                                *x = Slot::default();
                            }
                        }
                        let Some(i) = (0..SLOTS)
                            .filter(|&i| {
                                s.s[i].dboid == 0
                                    || (!s.s[i].writing && now - s.s[i].used_at > IDLE_MS)
                            })
                            .min_by_key(|&i| (s.s[i].dboid != 0, s.s[i].used_at))
                        else {
                            return Err(BdrError::Prerequisite {
                                msg: format!("more than {SLOTS} snowflakeid and timeshard sequences are in use at once on this node"),
                                hint: "Retry in a few seconds, when some have been idle.".into(),
                            });
                        };
                        let g = Generator::resume(floor, fallback);
                        s.s[i] = Slot {
                            dboid: db,
                            seqid,
                            last_ms: g.last_ms,
                            counter: g.counter,
                            fallback,
                            durable_ms: floor,
                            writing: false,
                            used_at: now,
                            node,
                        };
                        i
                    }
                }
            }
        };
        let slot = &mut s.s[i];
        let node = slot.node;
        if slot.writing && now.max(slot.last_ms) >= slot.durable_ms {
            // Another backend is making values past the mark durable.
            drop(s);
            pause();
            continue;
        }
        let mut g = Generator {
            last_ms: slot.last_ms,
            counter: slot.counter,
            fallback: slot.fallback,
        };
        let waited = wait_started.is_some_and(|w| crate::shmem::now() - w > 2000);
        match g.next(now, waited) {
            Step::WaitNextMs => {
                drop(s);
                wait_started.get_or_insert(crate::shmem::now());
                pause();
            }
            Step::Issue { ms, counter } => {
                if slot.writing {
                    drop(s);
                    pause();
                    continue;
                }
                slot.last_ms = g.last_ms;
                slot.counter = g.counter;
                slot.used_at = now;
                let v = compose(kind, ms, node, counter);
                if let Some(mark) = layout::floor_to_write(ms, slot.durable_ms) {
                    // No other backend issues a value at or past the old
                    // mark until this one is in WAL, ahead of the commit of
                    // any row that uses such a value.
                    slot.writing = true;
                    drop(s);
                    let mut guard = Writing {
                        db,
                        seqid,
                        fallback,
                        armed: true,
                    };
                    let durable = write_mark(seqid, kind, node, mark);
                    guard.armed = false;
                    let mut s = SEQS.exclusive();
                    if let Some(i) = find(&s, db, seqid, fallback) {
                        s.s[i].durable_ms = s.s[i].durable_ms.max(durable);
                        s.s[i].writing = false;
                    }
                }
                LAST.with(|l| l.borrow_mut().insert(seqid, v));
                return Ok(v);
            }
        }
    }
}

/// Sets the sequence to the mark (unless plain `nextval` took it further
/// already); returns the mark now in place, in milliseconds.
fn write_mark(seqid: u32, kind: Kind, node: i64, mark_ms: i64) -> i64 {
    if let Some(cur) = sequence_value(seqid) {
        let cur_ms = parts(kind, cur).0;
        if cur_ms >= mark_ms {
            return cur_ms;
        }
    }
    let v = compose(kind, mark_ms, node, fallback_counter(kind));
    // SAFETY: a built-in function with a valid sequence oid; setval is not
    // transactional, as the mark must not be.
    as_bdr(|| unsafe {
        pgrx::direct_function_call::<i64>(
            pg_sys::setval3_oid,
            &[
                pg_sys::Oid::from(seqid).into_datum(),
                v.into_datum(),
                true.into_datum(),
            ],
        )
    });
    mark_ms
}

/// The value a sequence restarts with (`last_value` before its first
/// `nextval`).
fn read_restart_value(seqid: u32) -> Option<i64> {
    as_bdr(|| crate::catalog::sequences::seq_info(seqid))
        .ok()
        .map(|i| i.last_value)
}

/// nextval's own checks: privileges, read-only and parallel mode.
fn check_rights(seqid: u32) -> BdrResult<()> {
    // SAFETY: an ACL check of an existing relation for the current user.
    let ok = unsafe {
        pg_sys::pg_class_aclcheck(
            pg_sys::Oid::from(seqid),
            pg_sys::GetUserId(),
            (pg_sys::ACL_USAGE | pg_sys::ACL_UPDATE) as pg_sys::AclMode,
        )
    } == pg_sys::AclResult::ACLCHECK_OK;
    if !ok {
        crate::fail!(
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied for sequence with oid {seqid}"
        );
    }
    // SAFETY: PostgreSQL's own checks for a command that writes.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(c"nextval()".as_ptr());
        pg_sys::PreventCommandIfParallelMode(c"nextval()".as_ptr());
    }
    Ok(())
}

/// This session's last value of a snowflakeid or timeshard sequence.
pub fn current_value(seqid: u32) -> BdrResult<i64> {
    LAST.with(|l| l.borrow().get(&seqid).copied())
        .ok_or_else(|| BdrError::Prerequisite {
            msg: format!("currval of sequence with oid {seqid} is not yet defined in this session"),
            hint: "Call nextval() first in this session.".into(),
        })
}
