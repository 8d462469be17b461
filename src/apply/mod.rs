//! Applying a peer's transactions: each remote transaction becomes one local
//! transaction, run under the peer's replication origin so that the origin's
//! progress commits atomically with the data and the local commit timestamp
//! equals the remote one. Rows are found by replica identity and changed with
//! SPI plans prepared once per relation and column set, and kept.
//!
//! A change that meets a local row written elsewhere is resolved by
//! `bdr_core::conflict::remote_wins` (last update wins, ties to the higher
//! node id), so every node keeps the same row.

mod backend;
mod ddl;
mod lookup;
mod relmap;
mod report;
mod rows;
mod spi;
mod tombstone;

use crate::pg::xact::in_subtransaction;
use crate::stats::{self, TxnCounts};
use backend::{RowWriter, Tid};
use bdr_core::conflict::{
    self, clock_skew_excess, remote_wins, ConflictConfig, ConflictType, Facts, Outcome, Writer,
};
use bdr_core::protocol::{Message, Relation, Value};
use bdr_core::quote::ident;
use lookup::*;
use pgrx::pg_sys;
use pgrx::prelude::*;
use relmap::*;
pub use report::Stop;
use report::*;
use spi::*;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

pub struct Applier {
    local_node_id: u32,
    remote_node_id: u32,
    dboid: u32,
    sub_id: u32,
    config: ConflictConfig,
    config_generation: u64,
    remote_xid: u32,
    remote_final_lsn: u64,
    counts: TxnCounts,
    stop: Option<Stop>,
    history_plan: pg_sys::SPIPlanPtr,
    copied_plan: pg_sys::SPIPlanPtr,
    /// Conflict history rows of the running transaction, written at commit.
    pending_history: Vec<Vec<Option<String>>>,
    dropped_plan: pg_sys::SPIPlanPtr,
    /// When the last clock skew warning was logged.
    skew_warned_at: i64,
    rels: HashMap<u32, RelMap>,
    origin_nodes: HashMap<u16, u32>,
    tomb_find: pg_sys::SPIPlanPtr,
    tomb_put: pg_sys::SPIPlanPtr,
    key_lock: pg_sys::SPIPlanPtr,
    rel_lock_s: pg_sys::SPIPlanPtr,
    rel_lock_x: pg_sys::SPIPlanPtr,
    /// Key locks taken per relation in the current transaction.
    key_locks: HashMap<u32, u32>,
    /// Mapped local tables changed by DDL since they were mapped.
    stale: std::collections::HashSet<u32>,
    /// Relations this transaction holds exclusively (no more key locks).
    escalated: std::collections::HashSet<u32>,
    /// The remote commit already applied (origin progress at start).
    applied_up_to: u64,
    in_txn: bool,
    skip_txn: bool,
    /// The rest of the remote transaction is left out (apply_error_ddl
    /// resolved by skip_transaction): rolled back at its commit.
    discard_txn: bool,
    commit_ts: i64,
    row_cxt: pg_sys::MemoryContext,
    /// Where the row writes go.
    rows: Box<dyn RowWriter>,
    pub ncommits: i64,
}

/// The remote transaction (commit LSN) being applied, 0 between
/// transactions: the writer's error accounting reads it.
pub static CURRENT_REMOTE_LSN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Applier {
    pub fn new(
        local_node_id: u32,
        remote_node_id: u32,
        applied_up_to: u64,
        dboid: u32,
        sub_id: u32,
    ) -> Applier {
        // SAFETY: a memory context for per-row values, reset after each change.
        let row_cxt = unsafe {
            pg_sys::AllocSetContextCreateExtended(
                pg_sys::TopMemoryContext,
                c"bdr apply row".as_ptr(),
                pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
                pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
            )
        };
        crate::relcache::watch();
        Applier {
            local_node_id,
            remote_node_id,
            dboid,
            sub_id,
            config: ConflictConfig::default(),
            config_generation: 0,
            remote_xid: 0,
            remote_final_lsn: 0,
            counts: TxnCounts::default(),
            stop: None,
            history_plan: std::ptr::null_mut(),
            copied_plan: std::ptr::null_mut(),
            pending_history: Vec::new(),
            dropped_plan: std::ptr::null_mut(),
            skew_warned_at: 0,
            rels: HashMap::new(),
            origin_nodes: HashMap::new(),
            tomb_find: std::ptr::null_mut(),
            tomb_put: std::ptr::null_mut(),
            key_lock: std::ptr::null_mut(),
            rel_lock_s: std::ptr::null_mut(),
            rel_lock_x: std::ptr::null_mut(),
            key_locks: HashMap::new(),
            escalated: std::collections::HashSet::new(),
            stale: std::collections::HashSet::new(),
            applied_up_to,
            in_txn: false,
            skip_txn: false,
            discard_txn: false,
            commit_ts: 0,
            row_cxt,
            rows: Box::new(SpiRows { row_cxt }),
            ncommits: 0,
        }
    }

    /// Applies one message; returns `(remote end LSN, local commit end LSN)`
    /// at each COMMIT, for the receiver's flush feedback.
    pub fn handle(&mut self, m: Message) -> Option<(u64, u64)> {
        match m {
            Message::Begin {
                xid,
                final_lsn,
                commit_time,
            } => {
                self.commit_ts = commit_time;
                self.remote_xid = xid;
                self.remote_final_lsn = final_lsn;
                CURRENT_REMOTE_LSN.store(final_lsn, std::sync::atomic::Ordering::Relaxed);
                // Streaming resumes at the origin's progress, so this only
                // catches a peer that sends again what we already have.
                self.skip_txn = final_lsn != 0 && final_lsn < self.applied_up_to;
                if self.skip_txn {
                    stats::update(self.dboid, self.sub_id, |s| s.nskippedtx += 1);
                } else {
                    crate::pg::latch::reload_config_if_asked();
                    self.check_clock_skew();
                    // Before any decision about this transaction's rows, so
                    // that a local commit racing with it is stamped later.
                    crate::hlc::publish(commit_time);
                    self.begin();
                }
                None
            }
            Message::Commit {
                end_lsn,
                commit_time,
                ..
            } => {
                if self.skip_txn || !self.in_txn {
                    self.skip_txn = false;
                    return Some((end_lsn, 0));
                }
                if self.discard_txn {
                    let local_end = self.discard(end_lsn, commit_time);
                    crate::dmllock::applied(self.remote_node_id, end_lsn);
                    return Some((end_lsn, local_end));
                }
                let local_end = self.commit(end_lsn, commit_time);
                self.applied_up_to = self.applied_up_to.max(end_lsn);
                // The peer's DDL under a global DML lock is here now.
                crate::dmllock::applied(self.remote_node_id, end_lsn);
                Some((end_lsn, local_end))
            }
            Message::Relation(r) => {
                // A new description (after DDL on the peer) replaces the old one.
                self.rels.remove(&r.id);
                let map = self.map_relation(r);
                self.rels.insert(map.remote.id, map);
                None
            }
            Message::Origin { .. } => None,
            _ if self.skip_txn || self.discard_txn => None,
            _ if self.stop.is_some() => None,
            Message::Insert { relid, new } => {
                self.counts.ninsert += 1;
                self.row(|a| {
                    if a.table_present(relid, &new) {
                        if let Some(cols) = a.present_cols(relid, &new, true) {
                            a.insert(relid, &new, &cols, ConflictType::InsertExists, true)
                        }
                    }
                });
                None
            }
            Message::Update { relid, old, new } => {
                self.counts.nupdate += 1;
                self.row(|a| {
                    if a.table_present(relid, &new) {
                        a.update(relid, old.as_deref(), &new)
                    }
                });
                None
            }
            Message::Delete { relid, old } => {
                self.counts.ndelete += 1;
                self.row(|a| {
                    if a.table_present(relid, &old) {
                        a.delete(relid, &old)
                    }
                });
                None
            }
            Message::Message {
                transactional: true,
                prefix,
                content,
            } if prefix == bdr_core::ddl::DDL_PREFIX => {
                self.row(|a| a.ddl(&content));
                None
            }
            Message::Message {
                transactional: true,
                prefix,
                ..
            } if prefix == bdr_core::dmllock::MARKER_PREFIX => {
                // An xid, so that the commit writes a record that advances
                // the origin: the global DML lock waits for that progress.
                // SAFETY: inside the apply transaction begun in `begin`.
                unsafe { pg_sys::GetCurrentTransactionId() };
                None
            }
            Message::Message { .. } => None,
            Message::Truncate {
                relids,
                cascade,
                restart_identity,
            } => {
                self.counts.ntruncate += 1;
                self.row(|a| {
                    let present: Vec<u32> = relids
                        .iter()
                        .copied()
                        .filter(|r| a.table_present(*r, &[]))
                        .collect();
                    if !present.is_empty() {
                        a.truncate(&present, cascade, restart_identity)
                    }
                });
                None
            }
        }
    }

    fn begin(&mut self) {
        // SAFETY: starts the local transaction the remote one is applied in.
        unsafe {
            pg_sys::SetCurrentStatementStartTimestamp();
            pg_sys::StartTransactionCommand();
            // Each change must see what committed before it (e.g. the
            // tombstone of a transaction its insert waited for), whatever
            // default_transaction_isolation says.
            pg_sys::XactIsoLevel = pg_sys::XACT_READ_COMMITTED as i32;
        }
        let generation = stats::config_generation();
        if generation != self.config_generation {
            // SAFETY: the catalog read needs a snapshot; popped right after.
            unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
            match crate::catalog::conflict_config() {
                Ok(c) => self.config = c,
                Err(e) => crate::fail!(
                    ERRCODE_INTERNAL_ERROR,
                    "could not read the conflict settings: {e}"
                ),
            }
            // SAFETY: pushed above.
            unsafe { pg_sys::PopActiveSnapshot() };
            self.config_generation = generation;
        }
        // SAFETY: the apply transaction's SPI connection, closed at commit.
        unsafe { spi_check(pg_sys::SPI_connect(), "connecting to SPI") };
        self.in_txn = true;
        self.counts = TxnCounts::default();
        self.pending_history.clear();
        self.key_locks.clear();
        self.escalated.clear();
    }

    /// `bdr.maximum_clock_skew`: a remote commit too far in the future of the
    /// local clock is warned about (at most once a minute) or waited for.
    fn check_clock_skew(&mut self) {
        let max_skew = crate::guc::get_int(crate::guc::MAXIMUM_CLOCK_SKEW);
        let now = crate::shmem::now();
        let Some(excess) = clock_skew_excess(self.commit_ts, now, max_skew) else {
            return;
        };
        if crate::guc::get_enum(crate::guc::MAXIMUM_CLOCK_SKEW_ACTION) == "wait" {
            tracing::debug!(
                "waiting {} ms for the local clock: node {} committed at {}",
                excess / 1000,
                self.remote_node_id,
                timestamp_text(self.commit_ts)
            );
            loop {
                let now = crate::shmem::now();
                match clock_skew_excess(self.commit_ts, now, max_skew) {
                    None => break,
                    Some(left) => crate::pg::latch::wait(None, (left / 1000).clamp(1, 1000)),
                }
            }
        } else if now - self.skew_warned_at >= 60_000_000 {
            self.skew_warned_at = now;
            warning!(
                "clock skew: node {} committed a transaction at {}, {} ms ahead of this node's clock (bdr.maximum_clock_skew = {} ms)",
                self.remote_node_id,
                timestamp_text(self.commit_ts),
                (self.commit_ts - now) / 1000,
                max_skew
            );
        }
    }

    fn commit(&mut self, end_lsn: u64, commit_time: i64) -> u64 {
        self.flush_history();
        // SAFETY: ends the transaction begun in `begin`. Setting the origin's
        // LSN and timestamp first makes the commit record carry them, which
        // advances the origin atomically and gives the rows the remote time.
        unsafe {
            pg_sys::SPI_finish();
            pg_sys::replorigin_session_origin_lsn = end_lsn;
            pg_sys::replorigin_session_origin_timestamp = commit_time;
            pg_sys::CommitTransactionCommand();
            pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
        }
        self.in_txn = false;
        self.ncommits += 1;
        CURRENT_REMOTE_LSN.store(0, std::sync::atomic::Ordering::Relaxed);
        stats::add_commit(self.dboid, self.sub_id, self.remote_final_lsn, &self.counts);
        // SAFETY: set by the commit just made (0 if it wrote no WAL).
        unsafe { pg_sys::XactLastCommitEnd }
    }

    /// Rolls the remote transaction back, and records it as applied: an
    /// otherwise empty transaction whose commit record carries the origin's
    /// progress.
    fn discard(&mut self, end_lsn: u64, commit_time: i64) -> u64 {
        // SAFETY: ends the apply transaction begun in `begin` without its
        // changes, then commits one that only advances the origin (an xid,
        // so that there is a commit record to carry it).
        unsafe {
            pg_sys::SPI_finish();
            pg_sys::AbortCurrentTransaction();
            pg_sys::StartTransactionCommand();
            pg_sys::GetCurrentTransactionId();
            pg_sys::replorigin_session_origin_lsn = end_lsn;
            pg_sys::replorigin_session_origin_timestamp = commit_time;
            pg_sys::CommitTransactionCommand();
        }
        self.in_txn = false;
        self.discard_txn = false;
        self.pending_history.clear();
        CURRENT_REMOTE_LSN.store(0, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            "skipped transaction {} of node {} (apply_error_ddl resolved by skip_transaction)",
            self.remote_xid,
            self.remote_node_id
        );
        // SAFETY: set by the commit just made.
        unsafe { pg_sys::XactLastCommitEnd }
    }

    /// Runs one row change with a fresh snapshot and per-row memory.
    fn row(&mut self, f: impl FnOnce(&mut Self)) {
        if !self.in_txn {
            crate::fail!(
                ERRCODE_PROTOCOL_VIOLATION,
                "bdr writer: change outside a transaction from the peer"
            );
        }
        if self.stop.is_some() {
            return;
        }
        // SAFETY: each change sees the effects of the previous ones (new
        // snapshot, command counter), and its values live in row_cxt.
        unsafe {
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            let old = pg_sys::MemoryContextSwitchTo(self.row_cxt);
            f(self);
            pg_sys::MemoryContextSwitchTo(old);
            pg_sys::MemoryContextReset(self.row_cxt);
            pg_sys::PopActiveSnapshot();
            pg_sys::CommandCounterIncrement();
        }
    }
}
