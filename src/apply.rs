//! Applying a peer's transactions: each remote transaction becomes one local
//! transaction, run under the peer's replication origin so that the origin's
//! progress commits atomically with the data and the local commit timestamp
//! equals the remote one. Rows are found by replica identity and changed with
//! SPI plans prepared once per relation and column set, and kept.
//!
//! A change that meets a local row written elsewhere is resolved by
//! `bdr_core::conflict::remote_wins` (last update wins, ties to the higher
//! node id), so every node keeps the same row.

use crate::error::in_subtransaction;
use crate::stats::{self, TxnCounts};
use bdr_core::conflict::{
    self, clock_skew_excess, remote_wins, ConflictConfig, ConflictType, Facts, Outcome, Resolver,
    Writer,
};
use bdr_core::protocol::{Message, Relation, Value};
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::ffi::{CStr, CString};

struct LocalCol {
    name: String,
    attnum: i16,
    typid: pg_sys::Oid,
    typmod: i32,
    input: pg_sys::Oid,
    input_param: pg_sys::Oid,
    recv: pg_sys::Oid,
    recv_param: pg_sys::Oid,
}

#[derive(Hash, PartialEq, Eq, Clone)]
enum PlanKey {
    /// Find the row by these remote columns (`=`, or IS NOT DISTINCT FROM for
    /// REPLICA IDENTITY FULL).
    Find(Vec<usize>, bool),
    Insert(Vec<usize>),
    Update(Vec<usize>),
    Delete,
    /// The local row at a ctid as JSON (conflict history).
    LocalJson,
    /// The key columns of the local row at a ctid, as text.
    KeyAt,
    /// These remote columns' values as a JSON object (conflict history).
    Json(Vec<usize>),
}

/// A unique index of the local table other than the replica identity's.
struct UniqueIndex {
    oid: pg_sys::Oid,
    /// Remote column indexes of its columns.
    cols: Vec<usize>,
}

struct RelMap {
    remote: Relation,
    local_oid: pg_sys::Oid,
    qualified: String,
    /// For each remote column, the local column it maps to.
    map: Vec<Option<usize>>,
    local: Vec<LocalCol>,
    /// Remote column indexes of the replica identity key.
    key: Vec<usize>,
    /// The local index that holds the key, if there is one.
    key_index: Option<pg_sys::Oid>,
    /// The other unique indexes an incoming row may collide on.
    uniques: Vec<UniqueIndex>,
    /// Local columns the peer does not send (source_column_missing).
    source_missing: Vec<String>,
    /// The table does not exist here (target_table_missing).
    missing: bool,
    plans: HashMap<PlanKey, pg_sys::SPIPlanPtr>,
}

impl Drop for RelMap {
    fn drop(&mut self) {
        for (_, p) in self.plans.drain() {
            // SAFETY: plans were kept with SPI_keepplan and are freed once.
            unsafe { pg_sys::SPI_freeplan(p) };
        }
    }
}

/// The local row an incoming change meets.
struct Found {
    ctid: pg_sys::ItemPointerData,
    xmin: u32,
    writer: Option<Writer>,
}

/// A conflict as the writer met it, for resolving and logging.
struct Seen<'a> {
    t: ConflictType,
    relid: u32,
    index: Option<pg_sys::Oid>,
    /// The key (remote column indexes) and the values it is taken from.
    key: &'a [usize],
    key_vals: &'a [Value],
    /// The incoming row (for a DELETE, its key).
    remote: Option<&'a [Value]>,
    local: Option<&'a Found>,
    /// Applying means the incoming row becomes the local row (not a DELETE).
    applies_row: bool,
    /// What to say about it in the server log.
    detail: String,
}

/// A conflict whose resolver stops the apply: the writer rolls back, logs
/// it, and exits with this error; it retries from the same transaction.
pub struct Stop {
    pub message: String,
    pub hint: String,
    pub code: PgSqlErrorCode,
    conflict_type: ConflictType,
    history: Option<Vec<Option<String>>>,
}

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
    commit_ts: i64,
    row_cxt: pg_sys::MemoryContext,
    pub ncommits: i64,
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// When and where the transaction `xid` (an xmin datum) committed; no
/// timestamp for frozen or too old transactions, or our own uncommitted one.
fn commit_ts_of(xid: pg_sys::Datum) -> (Option<i64>, u16) {
    let xid = pg_sys::TransactionId::from(xid.value() as u32);
    let mut ts: pg_sys::TimestampTz = 0;
    let mut origin: pg_sys::RepOriginId = 0;
    // SAFETY: reads the commit timestamp SLRU; xmin of a visible row is valid.
    let found = unsafe { pg_sys::TransactionIdGetCommitTsData(xid, &mut ts, &mut origin) };
    if found && ts != 0 {
        (Some(ts), origin)
    } else {
        (None, 0)
    }
}

/// The first column of the first row of the last SPI result (by-value
/// columns only). Frees the result, which would otherwise be kept to the end
/// of the transaction even when it has no rows.
///
/// # Safety
/// Right after an SPI execution in this SPI connection.
unsafe fn first_datum_and_free() -> Option<pg_sys::Datum> {
    let tt = pg_sys::SPI_tuptable;
    if tt.is_null() {
        return None;
    }
    let first = if pg_sys::SPI_processed == 0 || (*(*tt).tupdesc).natts < 1 {
        None
    } else {
        let mut isnull = false;
        let d = pg_sys::SPI_getbinval(*(*tt).vals, (*tt).tupdesc, 1, &mut isnull);
        (!isnull).then_some(d)
    };
    pg_sys::SPI_freetuptable(tt);
    first
}

/// A PostgreSQL timestamp as text, for log lines.
fn timestamp_text(ts: i64) -> String {
    // SAFETY: formats a timestamp value; returns a palloc'd C string.
    unsafe { std::ffi::CStr::from_ptr(pg_sys::timestamptz_to_str(ts)) }
        .to_string_lossy()
        .into_owned()
}

/// Prepares and keeps a statement for the life of the writer.
fn keep_plan(sql: &str, types: &mut [pg_sys::Oid]) -> pg_sys::SPIPlanPtr {
    let c = CString::new(sql).unwrap_or_default();
    // SAFETY: prepared inside the apply transaction's SPI connection and kept.
    unsafe {
        let p = pg_sys::SPI_prepare(c.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if p.is_null() {
            error!("bdr writer: could not prepare: {sql}");
        }
        pg_sys::SPI_keepplan(p);
        p
    }
}

/// The remote transaction (commit LSN) being applied, 0 between
/// transactions: the writer's error accounting reads it.
pub static CURRENT_REMOTE_LSN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The commit timestamp of rows a join copied (see `bdr.copied_row`).
const COPIED_COMMIT_TS: i64 = 1;

/// Columns of `bdr.conflict_history` a writer fills, all passed as text.
const HISTORY_COLUMNS: &str = "sub_id, local_xid, local_lsn, remote_xid, remote_commit_lsn,
    remote_commit_time, conflict_type, conflict_resolution, conflict_index, reloid, nspname,
    relname, key_tuple, remote_tuple, local_tuple, apply_tuple, local_tuple_xmin,
    local_tuple_node_id, local_tuple_commit_time";

const HISTORY_VALUES: &str = "$1::oid, $2::xid, $3::pg_lsn, $4::xid, $5::pg_lsn,
    bdr._ts($6::int8), $7, $8, $9::oid::regclass, $10::oid, $11, $12, $13::json, $14::json,
    $15::json, $16::json, $17::xid, $18::oid, bdr._ts($19::int8)";

fn history_insert() -> String {
    format!("INSERT INTO bdr.conflict_history ({HISTORY_COLUMNS}) VALUES ({HISTORY_VALUES})")
}

fn history_insert_select() -> String {
    format!("INSERT INTO bdr.conflict_history ({HISTORY_COLUMNS}) SELECT {HISTORY_VALUES}")
}

/// Key locks one transaction takes on one relation before it locks the
/// whole relation instead (see `Applier::lock_key`).
const MAX_KEY_LOCKS: u32 = 256;

fn spi_check(rc: i32, what: &str) {
    if rc < 0 {
        error!("bdr writer: SPI failed ({rc}) while {what}");
    }
}

/// Runs a kept plan whose parameters are all text (NULL for `None`);
/// returns the first column of its first row as text. Parameter values are
/// made in `cxt`.
fn exec_texts(
    plan: pg_sys::SPIPlanPtr,
    params: &[Option<String>],
    cxt: pg_sys::MemoryContext,
) -> Option<String> {
    // SAFETY: text datums built in `cxt`; a kept plan with as many text
    // parameters; the result row is read before it is freed.
    unsafe {
        let old = pg_sys::MemoryContextSwitchTo(cxt);
        let mut args: Vec<pg_sys::Datum> = Vec::with_capacity(params.len());
        let mut nulls: Vec<std::ffi::c_char> = Vec::with_capacity(params.len());
        for p in params {
            match p {
                Some(v) => {
                    let c = CString::new(v.as_str()).unwrap_or_default();
                    args.push(pg_sys::Datum::from(pg_sys::cstring_to_text(c.as_ptr())));
                    nulls.push(b' ' as std::ffi::c_char);
                }
                None => {
                    args.push(pg_sys::Datum::from(0));
                    nulls.push(b'n' as std::ffi::c_char);
                }
            }
        }
        pg_sys::MemoryContextSwitchTo(old);
        spi_check(
            pg_sys::SPI_execute_plan(plan, args.as_mut_ptr(), nulls.as_ptr(), false, 1),
            "running a bdr statement",
        );
        first_text_and_free()
    }
}

/// The first column of the first row of the last SPI result as text.
///
/// # Safety
/// Right after an SPI execution in this SPI connection.
unsafe fn first_text_and_free() -> Option<String> {
    let tt = pg_sys::SPI_tuptable;
    if tt.is_null() {
        return None;
    }
    let v = if pg_sys::SPI_processed == 0 {
        None
    } else {
        let p = pg_sys::SPI_getvalue(*(*tt).vals, (*tt).tupdesc, 1);
        (!p.is_null()).then(|| {
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            pg_sys::pfree(p as *mut std::ffi::c_void);
            s
        })
    };
    pg_sys::SPI_freetuptable(tt);
    v
}

/// The unique indexes of local table `oid` an incoming row can be checked
/// against (plain columns, no predicate), split into the one that holds the
/// replica identity key and the others, with their columns as remote
/// column indexes.
/// Unique indexes of `oid` as (index oid, attnums separated by spaces).
///
/// # Safety
/// Inside an SPI connection, with a snapshot.
unsafe fn index_rows(oid: pg_sys::Oid) -> Vec<(pg_sys::Oid, String, bool)> {
    let q = format!(
        "SELECT i.indexrelid, pg_catalog.array_to_string((i.indkey::int2[])[0:i.indnkeyatts - 1], ' '),
                i.indisprimary
           FROM pg_catalog.pg_index i
          WHERE i.indrelid = {} AND i.indisunique AND i.indisvalid AND i.indimmediate
            AND i.indpred IS NULL AND i.indexprs IS NULL
          ORDER BY i.indisprimary DESC, i.indexrelid",
        oid.to_u32()
    );
    let c = CString::new(q).unwrap_or_default();
    let mut rows: Vec<(pg_sys::Oid, String, bool)> = Vec::new();
    spi_check(
        pg_sys::SPI_execute(c.as_ptr(), true, 0),
        "reading a table's indexes",
    );
    let tt = pg_sys::SPI_tuptable;
    for i in 0..pg_sys::SPI_processed as usize {
        let tup = *(*tt).vals.add(i);
        let mut isnull = false;
        let d = pg_sys::SPI_getbinval(tup, (*tt).tupdesc, 1, &mut isnull);
        let cols = pg_sys::SPI_getvalue(tup, (*tt).tupdesc, 2);
        let primary = pg_sys::SPI_getbinval(tup, (*tt).tupdesc, 3, &mut isnull).value() != 0;
        rows.push((
            pg_sys::Oid::from(d.value() as u32),
            CStr::from_ptr(cols).to_string_lossy().into_owned(),
            primary,
        ));
    }
    rows
}

/// Splits the unique indexes (`index_rows`) of a table into the one that
/// holds the replica identity key and the others, with their columns as
/// remote column indexes. Indexes on columns the peer does not send are
/// left out.
fn unique_indexes(
    rows: Vec<(pg_sys::Oid, String, bool)>,
    local: &[LocalCol],
    map: &[Option<usize>],
    key: &[usize],
) -> (Vec<usize>, Option<pg_sys::Oid>, Vec<UniqueIndex>) {
    let resolved: Vec<(pg_sys::Oid, Vec<usize>, bool)> = rows
        .into_iter()
        .filter_map(|(ioid, cols, primary)| {
            let remote: Option<Vec<usize>> = cols
                .split_whitespace()
                .map(|a| {
                    let attnum: i16 = a.parse().ok()?;
                    let li = local.iter().position(|l| l.attnum == attnum)?;
                    map.iter().position(|m| *m == Some(li))
                })
                .collect();
            remote.filter(|r| !r.is_empty()).map(|r| (ioid, r, primary))
        })
        .collect();
    // REPLICA IDENTITY FULL marks no key columns; the primary key still
    // identifies rows for conflicts.
    let key: Vec<usize> = if key.is_empty() {
        resolved
            .iter()
            .find(|r| r.2)
            .map(|r| r.1.clone())
            .unwrap_or_default()
    } else {
        key.to_vec()
    };
    let mut sorted_key = key.clone();
    sorted_key.sort_unstable();
    let mut key_index = None;
    let mut uniques = Vec::new();
    for (ioid, mut cols, _) in resolved {
        let mut sorted = cols.clone();
        sorted.sort_unstable();
        if key_index.is_none() && sorted == sorted_key {
            key_index = Some(ioid);
        } else {
            cols.dedup();
            uniques.push(UniqueIndex { oid: ioid, cols });
        }
    }
    (key, key_index, uniques)
}

/// The remote columns of `vals` this node has and that carry a value.
fn present(r: &RelMap, vals: &[Value]) -> Vec<usize> {
    (0..r.remote.columns.len())
        .filter(|i| r.map[*i].is_some() && vals.get(*i) != Some(&Value::UnchangedToast))
        .collect()
}

fn same_tid(a: &pg_sys::ItemPointerData, b: &pg_sys::ItemPointerData) -> bool {
    a.ip_blkid.bi_hi == b.ip_blkid.bi_hi
        && a.ip_blkid.bi_lo == b.ip_blkid.bi_lo
        && a.ip_posid == b.ip_posid
}

/// A relation name for log lines and the history.
fn relname_of(oid: pg_sys::Oid) -> Option<String> {
    // SAFETY: returns NULL for an oid that is no relation.
    let p = unsafe { pg_sys::get_rel_name(oid) };
    (!p.is_null()).then(|| {
        // SAFETY: a palloc'd C string, freed once copied.
        unsafe {
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            pg_sys::pfree(p as *mut std::ffi::c_void);
            s
        }
    })
}

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
            commit_ts: 0,
            row_cxt,
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
                    crate::workers::reload_config_if_asked();
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
                let local_end = self.commit(end_lsn, commit_time);
                self.applied_up_to = self.applied_up_to.max(end_lsn);
                Some((end_lsn, local_end))
            }
            Message::Relation(r) => {
                // A new description (after DDL on the peer) replaces the old one.
                self.rels.remove(&r.id);
                let map = self.map_relation(r);
                self.rels.insert(map.remote.id, map);
                None
            }
            Message::Origin { .. } | Message::Message { .. } => None,
            _ if self.skip_txn => None,
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
        }
        let generation = stats::config_generation();
        if generation != self.config_generation {
            // SAFETY: the catalog read needs a snapshot; popped right after.
            unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
            match crate::api::conflicts::load_config() {
                Ok(c) => self.config = c,
                Err(e) => error!("could not read the conflict settings: {e}"),
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
                    Some(left) => crate::workers::wait(None, (left / 1000).clamp(1, 1000)),
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

    /// Runs one row change with a fresh snapshot and per-row memory.
    fn row(&mut self, f: impl FnOnce(&mut Self)) {
        if !self.in_txn {
            error!("bdr writer: change outside a transaction from the peer");
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

    fn map_relation(&mut self, r: Relation) -> RelMap {
        let qualified = format!("{}.{}", quote_ident(&r.schema), quote_ident(&r.name));
        let mut local = Vec::new();
        let mut local_oid = pg_sys::InvalidOid;
        let mut index_list = Vec::new();
        let q = CString::new(format!(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attnum, a.attrelid FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = pg_catalog.to_regclass({})
                AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
              ORDER BY a.attnum",
            crate::walrcv::literal(&qualified)
        ))
        .unwrap_or_default();
        // SAFETY: a read-only catalog query in the current transaction (or a
        // short one of its own); results are copied out before SPI_finish.
        unsafe {
            let own_txn = !pg_sys::IsTransactionState();
            if own_txn {
                pg_sys::StartTransactionCommand();
            }
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            spi_check(pg_sys::SPI_connect(), "connecting to SPI");
            spi_check(
                pg_sys::SPI_execute(q.as_ptr(), true, 0),
                "reading a table's columns",
            );
            let tt = pg_sys::SPI_tuptable;
            for i in 0..pg_sys::SPI_processed as usize {
                let tup = *(*tt).vals.add(i);
                let desc = (*tt).tupdesc;
                let mut isnull = false;
                let name = pg_sys::SPI_getvalue(tup, desc, 1);
                let typid = pg_sys::SPI_getbinval(tup, desc, 2, &mut isnull);
                let typmod = pg_sys::SPI_getbinval(tup, desc, 3, &mut isnull);
                let attnum = pg_sys::SPI_getbinval(tup, desc, 4, &mut isnull).value() as i16;
                local_oid = pg_sys::Oid::from(
                    pg_sys::SPI_getbinval(tup, desc, 5, &mut isnull).value() as u32,
                );
                let typid = pg_sys::Oid::from(typid.value() as u32);
                let (mut input, mut input_param, mut recv, mut recv_param) = (
                    pg_sys::InvalidOid,
                    pg_sys::InvalidOid,
                    pg_sys::InvalidOid,
                    pg_sys::InvalidOid,
                );
                pg_sys::getTypeInputInfo(typid, &mut input, &mut input_param);
                pg_sys::getTypeBinaryInputInfo(typid, &mut recv, &mut recv_param);
                local.push(LocalCol {
                    name: CStr::from_ptr(name).to_string_lossy().into_owned(),
                    attnum,
                    typid,
                    typmod: typmod.value() as i32,
                    input,
                    input_param,
                    recv,
                    recv_param,
                });
            }
            if local_oid != pg_sys::InvalidOid {
                index_list = index_rows(local_oid);
            }
            pg_sys::SPI_finish();
            pg_sys::PopActiveSnapshot();
            if own_txn {
                pg_sys::CommitTransactionCommand();
            }
        }
        let missing = local.is_empty();
        let map: Vec<Option<usize>> = r
            .columns
            .iter()
            .map(|c| local.iter().position(|l| l.name == c.name))
            .collect();
        let key: Vec<usize> = r
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
            .collect();
        let source_missing = local
            .iter()
            .enumerate()
            .filter(|(li, _)| !map.contains(&Some(*li)))
            .map(|(_, l)| l.name.clone())
            .collect();
        let (key, key_index, uniques) = if missing {
            (key, None, Vec::new())
        } else {
            unique_indexes(index_list, &local, &map, &key)
        };
        RelMap {
            remote: r,
            local_oid,
            qualified,
            map,
            local,
            key,
            key_index,
            uniques,
            source_missing,
            missing,
            plans: HashMap::new(),
        }
    }

    /// Whether local table `oid` changed by DDL since it was mapped (after
    /// a relcache reset, every mapped table counts as changed); forgets it.
    fn changed_since_mapped(&mut self, oid: pg_sys::Oid) -> bool {
        if let Some(changed) = crate::relcache::take() {
            let mapped = self.rels.values().map(|r| r.local_oid.to_u32());
            if changed.all {
                self.stale.extend(mapped);
            } else {
                let mapped: std::collections::HashSet<u32> = mapped.collect();
                self.stale
                    .extend(changed.relids.into_iter().filter(|o| mapped.contains(o)));
            }
        }
        self.stale.remove(&oid.to_u32())
    }

    /// Whether the change's table exists here. When it does not, that is a
    /// target_table_missing conflict, resolved here; a table dropped and
    /// created again since it was described is described anew.
    fn table_present(&mut self, relid: u32, vals: &[Value]) -> bool {
        if self.stop.is_some() {
            return false;
        }
        let (missing, oid) = {
            let r = self.rel(relid);
            (r.missing, r.local_oid)
        };
        // Local DDL (a column or index added, the table dropped) changes
        // how the peer's rows map here.
        let changed = !missing && self.changed_since_mapped(oid);
        if changed || (missing && self.rel_exists_now(relid)) {
            let remote = self.rel(relid).remote.clone();
            let map = self.map_relation(remote);
            self.rels.insert(relid, map);
        }
        if !self.rel(relid).missing {
            return true;
        }
        let recently_dropped = self.recently_dropped(relid);
        let detail = "the table does not exist on this node".to_string();
        self.conflict(
            Seen {
                t: ConflictType::TargetTableMissing,
                relid,
                index: None,
                key: &[],
                key_vals: vals,
                remote: Some(vals),
                local: None,
                applies_row: false,
                detail,
            },
            Facts {
                recently_dropped,
                ..Facts::default()
            },
        );
        false
    }

    fn rel_exists_now(&mut self, relid: u32) -> bool {
        let q = format!(
            "SELECT pg_catalog.to_regclass({})::oid",
            crate::walrcv::literal(&self.rel(relid).qualified)
        );
        let c = CString::new(q).unwrap_or_default();
        // SAFETY: a read-only query in the apply transaction's SPI connection.
        unsafe {
            spi_check(
                pg_sys::SPI_execute(c.as_ptr(), true, 1),
                "looking up a table",
            );
            first_datum_and_free().is_some()
        }
    }

    /// Whether a table of this name was dropped here within the last day.
    fn recently_dropped(&mut self, relid: u32) -> bool {
        let (nsp, name) = {
            let r = self.rel(relid);
            (r.remote.schema.clone(), r.remote.name.clone())
        };
        if self.dropped_plan.is_null() {
            self.dropped_plan = keep_plan(
                "SELECT 1 FROM bdr.dropped_relation WHERE nspname = $1 AND relname = $2
                    AND dropped_at > pg_catalog.now() - $3::text::interval",
                &mut [pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
            );
        }
        let window = format!("{} microseconds", conflict::RECENTLY_DROPPED_US);
        exec_texts(
            self.dropped_plan,
            &[Some(nsp), Some(name), Some(window)],
            self.row_cxt,
        )
        .is_some()
    }

    fn rel(&mut self, relid: u32) -> &mut RelMap {
        match self.rels.get_mut(&relid) {
            Some(r) => r,
            None => error!("bdr writer: change for relation {relid} before its description"),
        }
    }

    /// The node that made the local row's last write, from its origin.
    fn node_of_origin(&mut self, roident: u16) -> u32 {
        if roident == 0 || roident as u32 == pg_sys::DoNotReplicateId {
            return self.local_node_id;
        }
        if let Some(n) = self.origin_nodes.get(&roident) {
            return *n;
        }
        let q = CString::new(format!(
            "SELECT CASE WHEN {} THEN {} ELSE s.origin_node_id END
               FROM pg_catalog.pg_replication_origin o
               LEFT JOIN bdr.subscription s ON s.origin_name = o.roname WHERE o.roident = {roident}",
            bdr_core::hlc::local_origin_sql("o.roname"),
            self.local_node_id
        ))
        .unwrap_or_default();
        // SAFETY: read-only query inside the apply transaction's SPI connection.
        let node = unsafe {
            spi_check(
                pg_sys::SPI_execute(q.as_ptr(), true, 1),
                "looking up an origin",
            );
            let n = if pg_sys::SPI_processed == 0 {
                0
            } else {
                let mut isnull = false;
                let d = pg_sys::SPI_getbinval(
                    *(*pg_sys::SPI_tuptable).vals,
                    (*pg_sys::SPI_tuptable).tupdesc,
                    1,
                    &mut isnull,
                );
                if isnull {
                    0
                } else {
                    d.value() as u32
                }
            };
            if !pg_sys::SPI_tuptable.is_null() {
                pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
            }
            n
        };
        self.origin_nodes.insert(roident, node);
        node
    }

    fn remote_writer(&self) -> Writer {
        Writer {
            commit_ts: self.commit_ts,
            node_id: self.remote_node_id,
        }
    }

    /// Applies an incoming row as an INSERT of remote columns `cols`. `kind`
    /// is the conflict type to report when its key is taken (insert_exists,
    /// or update_pkey_exists for the new key of a key-changing UPDATE).
    /// `check_tombstone`: false when a resolver chose to insert over a newer
    /// delete (update_recently_deleted with insert_or_*).
    fn insert(
        &mut self,
        relid: u32,
        new: &[Value],
        cols: &[usize],
        kind: ConflictType,
        check_tombstone: bool,
    ) {
        let key = self.rel(relid).key.clone();
        if key.is_empty() {
            let others = self.unique_collisions(relid, new, None);
            if others.is_empty() {
                self.exec_insert(relid, cols, new);
            } else {
                self.resolve_insert_collisions(relid, new, cols, kind, None, others);
            }
            return;
        }
        let mut locked = false;
        // Rounds: look; if missing, lock the key and look again; then insert,
        // or, if a local session inserted the key meanwhile, resolve against it.
        for _ in 0..4 {
            let pk = self.find(relid, &key, new, false);
            let others = self.unique_collisions(relid, new, pk.as_ref().map(|f| f.ctid));
            if !others.is_empty() {
                self.resolve_insert_collisions(relid, new, cols, kind, pk, others);
                return;
            }
            match pk {
                Some(f) => {
                    let index = self.rel(relid).key_index;
                    let detail = format!("the key already exists: {}", self.local_desc(&f));
                    let o = self.conflict(
                        Seen {
                            t: kind,
                            relid,
                            index,
                            key: &key,
                            key_vals: new,
                            remote: Some(new),
                            local: Some(&f),
                            applies_row: true,
                            detail,
                        },
                        Facts {
                            full_row: true,
                            ..Facts::default()
                        },
                    );
                    if o == Outcome::ApplyRemote {
                        self.exec_update(relid, f.ctid, cols, new);
                    }
                    return;
                }
                None => {
                    if !locked {
                        locked = true;
                        if self.lock_key(relid, &key, new) {
                            continue;
                        }
                    }
                    // The tombstone is looked up after the insert, not
                    // before: the insert may have waited for a local
                    // transaction that inserted and deleted this key, whose
                    // tombstone only a snapshot taken after it can see.
                    if let Some(ctid) = self.exec_insert(relid, cols, new) {
                        if check_tombstone && self.deleted_later(relid, &key, new) {
                            self.exec_delete(relid, ctid);
                        }
                        return;
                    }
                }
            }
        }
        error!(
            "a row replicated into {} conflicts with a local row on a unique index bdr cannot check (partial, on expressions or deferred)",
            self.rel(relid).qualified
        );
    }

    /// Local rows other than `except` that hold the incoming row's values
    /// in a unique index other than the key's, each with the index.
    fn unique_collisions(
        &mut self,
        relid: u32,
        new: &[Value],
        except: Option<pg_sys::ItemPointerData>,
    ) -> Vec<(pg_sys::Oid, Found)> {
        let checks: Vec<(pg_sys::Oid, Vec<usize>)> = self
            .rel(relid)
            .uniques
            .iter()
            .filter(|u| {
                u.cols.iter().all(|&i| {
                    !matches!(
                        new.get(i),
                        None | Some(Value::Null) | Some(Value::UnchangedToast)
                    )
                })
            })
            .map(|u| (u.oid, u.cols.clone()))
            .collect();
        let mut found: Vec<(pg_sys::Oid, Found)> = Vec::new();
        for (oid, cols) in checks {
            if let Some(f) = self.find(relid, &cols, new, false) {
                if except.is_some_and(|e| same_tid(&e, &f.ctid))
                    || found.iter().any(|(_, g)| same_tid(&g.ctid, &f.ctid))
                {
                    continue;
                }
                found.push((oid, f));
            }
        }
        found
    }

    /// An incoming INSERT collides on unique indexes other than its key's.
    /// One local row and none with its key: `kind` (insert_exists) against
    /// that row; if the incoming row wins, the local row is deleted (its key
    /// noted as deleted) and the incoming one inserted, so that the nodes
    /// agree whichever side they see it from. More rows:
    /// multiple_unique_conflicts, which `update` resolves by deleting the
    /// others and keeping the row with the incoming key.
    fn resolve_insert_collisions(
        &mut self,
        relid: u32,
        new: &[Value],
        cols: &[usize],
        kind: ConflictType,
        pk: Option<Found>,
        mut others: Vec<(pg_sys::Oid, Found)>,
    ) {
        let key = self.rel(relid).key.clone();
        if pk.is_none() && others.len() == 1 {
            let (index, f) = others.remove(0);
            let detail = format!(
                "a local row with another key holds the same values in unique index {}: {}",
                relname_of(index).unwrap_or_default(),
                self.local_desc(&f)
            );
            let o = self.conflict(
                Seen {
                    t: kind,
                    relid,
                    index: Some(index),
                    key: &key,
                    key_vals: new,
                    remote: Some(new),
                    local: Some(&f),
                    applies_row: true,
                    detail,
                },
                Facts {
                    full_row: true,
                    ..Facts::default()
                },
            );
            if o == Outcome::ApplyRemote {
                self.delete_row(relid, &f);
                self.exec_insert(relid, cols, new);
            }
            return;
        }
        let local = pk.as_ref().or(others.first().map(|(_, f)| f));
        let index = if pk.is_some() {
            self.rel(relid).key_index
        } else {
            others.first().map(|(i, _)| *i)
        };
        if self.multiple_unique(relid, new, &key, new, index, local, &others) {
            for (_, f) in &others {
                self.delete_row(relid, f);
            }
            match pk {
                Some(f) => self.exec_update(relid, f.ctid, cols, new),
                None => {
                    self.exec_insert(relid, cols, new);
                }
            }
        }
    }

    /// Reports multiple_unique_conflicts; true when the incoming change is
    /// to be applied (resolver `update`).
    #[allow(clippy::too_many_arguments)]
    fn multiple_unique(
        &mut self,
        relid: u32,
        new: &[Value],
        key: &[usize],
        key_vals: &[Value],
        index: Option<pg_sys::Oid>,
        local: Option<&Found>,
        others: &[(pg_sys::Oid, Found)],
    ) -> bool {
        let mut names: Vec<String> = others
            .iter()
            .map(|(i, _)| relname_of(*i).unwrap_or_default())
            .collect();
        let mut nrows = others.len();
        if let (Some(i), Some(_)) = (index, local) {
            if !others.iter().any(|(o, _)| *o == i) {
                names.insert(0, relname_of(i).unwrap_or_default());
                nrows += 1;
            }
        }
        let detail = format!(
            "the incoming row collides with {nrows} local rows (unique indexes {})",
            names.join(", ")
        );
        self.conflict(
            Seen {
                t: ConflictType::MultipleUniqueConflicts,
                relid,
                index,
                key,
                key_vals,
                remote: Some(new),
                local,
                applies_row: true,
                detail,
            },
            Facts {
                full_row: true,
                ..Facts::default()
            },
        ) == Outcome::ApplyRemote
    }

    /// An incoming UPDATE of the row `f` (found by `lookup`'s `key`) gives
    /// it values another local row holds in a unique index (its key or
    /// another). One such row: update_pkey_exists, by default the newer
    /// write keeps the values and the other row is deleted; that is, when
    /// the update loses, the updated row goes, as it does on the node where
    /// the other row won. More rows: multiple_unique_conflicts.
    #[allow(clippy::too_many_arguments)]
    fn resolve_update_collisions(
        &mut self,
        relid: u32,
        new: &[Value],
        cols: &[usize],
        key: &[usize],
        lookup: &[Value],
        f: &Found,
        others: Vec<(pg_sys::Oid, Found)>,
    ) {
        if others.len() == 1 {
            let (index, l) = &others[0];
            let detail = format!(
                "the updated row would hold values another local row holds in unique index {}: {}",
                relname_of(*index).unwrap_or_default(),
                self.local_desc(l)
            );
            let o = self.conflict(
                Seen {
                    t: ConflictType::UpdatePkeyExists,
                    relid,
                    index: Some(*index),
                    key,
                    key_vals: lookup,
                    remote: Some(new),
                    local: Some(l),
                    applies_row: true,
                    detail,
                },
                Facts {
                    full_row: !new.contains(&Value::UnchangedToast),
                    ..Facts::default()
                },
            );
            match o {
                Outcome::ApplyRemote => {
                    self.delete_row(relid, l);
                    self.exec_update(relid, f.ctid, cols, new);
                }
                Outcome::Skip
                    if self.config.resolver(ConflictType::UpdatePkeyExists)
                        == Resolver::UpdateIfNewer =>
                {
                    self.delete_row(relid, f);
                }
                _ => {}
            }
            return;
        }
        let (index, local) = (Some(others[0].0), Some(&others[0].1));
        if self.multiple_unique(relid, new, key, lookup, index, local, &others) {
            for (_, l) in &others {
                self.delete_row(relid, l);
            }
            self.exec_update(relid, f.ctid, cols, new);
        }
    }

    /// Deletes a local row that lost a unique-key conflict, noting its key
    /// as deleted like any applied delete.
    fn delete_row(&mut self, relid: u32, f: &Found) {
        let key = self.rel(relid).key.clone();
        let vals = if key.is_empty() {
            Vec::new()
        } else {
            self.key_values_at(relid, &key, f.ctid)
        };
        self.exec_delete(relid, f.ctid);
        if !key.is_empty() {
            self.note_deleted(relid, &key, &vals);
        }
    }

    /// The key columns of the local row at `ctid`, as text values placed at
    /// their remote column indexes.
    fn key_values_at(
        &mut self,
        relid: u32,
        key: &[usize],
        mut ctid: pg_sys::ItemPointerData,
    ) -> Vec<Value> {
        let plan = self.plan(relid, PlanKey::KeyAt);
        let n = self.rel(relid).remote.columns.len();
        let mut vals = vec![Value::Null; n];
        let mut datums = [pg_sys::Datum::from(
            &mut ctid as *mut pg_sys::ItemPointerData,
        )];
        let nulls = [b' ' as std::ffi::c_char];
        // SAFETY: a kept plan with one tid parameter; the one result row is
        // read (and its strings freed) before the result is freed.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 1),
                "reading a local key",
            );
            let tt = pg_sys::SPI_tuptable;
            if !tt.is_null() && pg_sys::SPI_processed > 0 {
                for (j, &i) in key.iter().enumerate() {
                    let p = pg_sys::SPI_getvalue(*(*tt).vals, (*tt).tupdesc, j as i32 + 1);
                    if !p.is_null() {
                        vals[i] = Value::Text(CStr::from_ptr(p).to_string_lossy().into_owned());
                        pg_sys::pfree(p as *mut std::ffi::c_void);
                    }
                }
            }
            if !tt.is_null() {
                pg_sys::SPI_freetuptable(tt);
            }
        }
        vals
    }

    /// "written by node N at T" for log lines.
    fn local_desc(&mut self, f: &Found) -> String {
        match f.writer {
            Some(w) => format!(
                "the local row was last written by node {} at {}",
                w.node_id,
                timestamp_text(w.commit_ts)
            ),
            None => "the local row's last writer is unknown (frozen or older than track_commit_timestamp)".into(),
        }
    }

    /// Resolves a conflict with this node's resolver for its type, counts
    /// it, and logs it as configured. An `error` outcome stops the apply.
    fn conflict(&mut self, s: Seen<'_>, mut facts: Facts) -> Outcome {
        if self.stop.is_some() {
            return Outcome::Error;
        }
        if let Some(local) = s.local {
            facts.remote_newer = remote_wins(self.remote_writer(), local.writer);
        }
        let resolver = self.config.resolver(s.t);
        let outcome = conflict::resolve(s.t, resolver, facts);
        self.counts.conflict(s.t);
        let logs = self.config.logs(s.t, outcome);
        let qualified = self.rel(s.relid).qualified.clone();
        let line = format!(
            "CONFLICT: {} on {} from node {} (transaction {} committed at {}, LSN {}): {}; resolver {}, resolution {}",
            s.t.name(),
            qualified,
            self.remote_node_id,
            self.remote_xid,
            timestamp_text(self.commit_ts),
            bdr_core::lsn::format(self.remote_final_lsn),
            s.detail,
            resolver.name(),
            outcome.resolution()
        );
        if logs && self.config.log_to_file {
            log!("{line}");
        }
        // Read-only, so the subtransaction takes no transaction id.
        let history = if logs && self.config.log_to_table {
            match in_subtransaction(|| self.history_row(&s, outcome)) {
                Ok(row) => Some(row),
                Err(msg) => {
                    warning!("could not describe a conflict for bdr.conflict_history: {msg}");
                    None
                }
            }
        } else {
            None
        };
        if outcome == Outcome::Error {
            let code = match s.t {
                ConflictType::MultipleUniqueConflicts
                | ConflictType::InsertExists
                | ConflictType::UpdatePkeyExists => PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                ConflictType::TargetTableMissing => PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                ConflictType::TargetColumnMissing | ConflictType::SourceColumnMissing => {
                    PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN
                }
                _ => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            };
            let sub = self.sub_id;
            self.stop = Some(Stop {
                message: line,
                hint: format!(
                    "Fix the local data and the writer resumes by itself; or change the resolver with bdr.alter_node_set_conflict_resolver(); or skip the transaction: bdr.alter_subscription_disable(), bdr.alter_subscription_skip_changes_upto(<subscription {sub}>, '{}'), bdr.alter_subscription_enable().",
                    bdr_core::lsn::format(self.remote_final_lsn)
                ),
                code,
                conflict_type: s.t,
                history,
            });
        } else if let Some(row) = history {
            self.pending_history.push(row);
        }
        outcome
    }

    /// The parameters of one `bdr.conflict_history` row, as text.
    fn history_row(&mut self, s: &Seen<'_>, outcome: Outcome) -> Vec<Option<String>> {
        let (local_oid, nsp, rel) = {
            let r = self.rel(s.relid);
            (r.local_oid, r.remote.schema.clone(), r.remote.name.clone())
        };
        let key_json = if s.key.is_empty() {
            None
        } else {
            self.values_json(s.relid, s.key, s.key_vals)
        };
        let remote_json = s.remote.and_then(|v| {
            let cols: Vec<usize> = (0..v.len()).collect();
            self.values_json(s.relid, &cols, v)
        });
        let local_json = s.local.and_then(|f| self.local_json(s.relid, f.ctid));
        let apply_json = if outcome == Outcome::ApplyRemote && s.applies_row {
            remote_json.clone()
        } else {
            None
        };
        // SAFETY: WAL position and xid of the running apply transaction.
        let (xid, lsn) = unsafe {
            (
                pg_sys::GetTopTransactionIdIfAny(),
                pg_sys::GetXLogInsertRecPtr(),
            )
        };
        vec![
            Some(self.sub_id.to_string()),
            (xid != pg_sys::InvalidTransactionId).then(|| xid.into_inner().to_string()),
            Some(bdr_core::lsn::format(lsn)),
            Some(self.remote_xid.to_string()),
            Some(bdr_core::lsn::format(self.remote_final_lsn)),
            Some(self.commit_ts.to_string()),
            Some(s.t.name().to_string()),
            Some(outcome.resolution().to_string()),
            s.index.map(|i| i.to_u32().to_string()),
            (local_oid != pg_sys::InvalidOid).then(|| local_oid.to_u32().to_string()),
            Some(nsp),
            Some(rel),
            key_json,
            remote_json,
            local_json,
            apply_json,
            s.local.map(|f| f.xmin.to_string()),
            s.local
                .and_then(|f| f.writer)
                .map(|w| w.node_id.to_string()),
            s.local
                .and_then(|f| f.writer)
                .map(|w| w.commit_ts.to_string()),
        ]
    }

    fn history_plan(&mut self) -> pg_sys::SPIPlanPtr {
        if self.history_plan.is_null() {
            self.history_plan = keep_plan(&history_insert(), &mut [pg_sys::TEXTOID; 19]);
        }
        self.history_plan
    }

    /// Writes the conflicts this transaction logged to `bdr.conflict_history`,
    /// in one subtransaction just before commit, so that a failure to log
    /// never undoes the applied changes.
    fn flush_history(&mut self) {
        if self.pending_history.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut self.pending_history);
        let plan = self.history_plan();
        let cxt = self.row_cxt;
        // SAFETY: the inserts need a snapshot; popped right after.
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
        let r = in_subtransaction(|| {
            for row in &rows {
                exec_texts(plan, row, cxt);
            }
        });
        // SAFETY: pushed above; the subtransaction restored the stack.
        unsafe { pg_sys::PopActiveSnapshot() };
        // SAFETY: the per-row context holds only the insert's parameters.
        unsafe { pg_sys::MemoryContextReset(cxt) };
        if let Err(msg) = r {
            warning!(
                "could not record {} conflict(s) in bdr.conflict_history: {msg}; the changes are applied all the same",
                rows.len()
            );
        }
    }

    /// The values of remote columns `cols` as a JSON object (columns this
    /// node lacks as text), or NULL when there are none to show.
    fn values_json(&mut self, relid: u32, cols: &[usize], vals: &[Value]) -> Option<String> {
        let cols: Vec<usize> = cols
            .iter()
            .copied()
            .filter(|&i| vals.get(i).is_some_and(|v| *v != Value::UnchangedToast))
            .collect();
        if cols.is_empty() {
            return None;
        }
        let plan = self.plan(relid, PlanKey::Json(cols.clone()));
        let (mut datums, mut nulls) = self.datums(relid, &cols, vals);
        let (map, types): (Vec<Option<usize>>, Vec<u32>) = {
            let r = self.rel(relid);
            (
                r.map.clone(),
                r.remote.columns.iter().map(|c| c.type_oid).collect(),
            )
        };
        for (n, &i) in cols.iter().enumerate() {
            if map[i].is_some() {
                continue;
            }
            // A column this node lacks is shown as text. Binary values are
            // of built-in types, whose oids are the same on every node.
            let t = pg_sys::Oid::from(types[i]);
            // SAFETY: the type's own receive and output functions, in the
            // per-row context.
            let d = unsafe {
                let old = pg_sys::MemoryContextSwitchTo(self.row_cxt);
                let text = match vals.get(i) {
                    Some(Value::Text(v)) => Some(CString::new(v.as_str()).unwrap_or_default()),
                    Some(Value::Binary(b))
                        if types[i] != 0 && types[i] < pg_sys::FirstGenbkiObjectId =>
                    {
                        let (mut recv, mut param, mut out, mut varlena) = (
                            pg_sys::InvalidOid,
                            pg_sys::InvalidOid,
                            pg_sys::InvalidOid,
                            false,
                        );
                        pg_sys::getTypeBinaryInputInfo(t, &mut recv, &mut param);
                        pg_sys::getTypeOutputInfo(t, &mut out, &mut varlena);
                        let buf = pg_sys::makeStringInfo();
                        pg_sys::appendBinaryStringInfo(buf, b.as_ptr() as *const _, b.len() as i32);
                        let v = pg_sys::OidReceiveFunctionCall(recv, buf, param, -1);
                        Some(CStr::from_ptr(pg_sys::OidOutputFunctionCall(out, v)).to_owned())
                    }
                    _ => None,
                };
                let d = text.map(|c| pg_sys::Datum::from(pg_sys::cstring_to_text(c.as_ptr())));
                pg_sys::MemoryContextSwitchTo(old);
                d
            };
            if let Some(d) = d {
                datums[n] = d;
                nulls[n] = b' ' as std::ffi::c_char;
            }
        }
        // SAFETY: a kept plan with matching parameters.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 1),
                "describing a row",
            );
            first_text_and_free()
        }
    }

    /// The local row at `ctid` as JSON.
    fn local_json(&mut self, relid: u32, mut ctid: pg_sys::ItemPointerData) -> Option<String> {
        let plan = self.plan(relid, PlanKey::LocalJson);
        let mut datums = [pg_sys::Datum::from(
            &mut ctid as *mut pg_sys::ItemPointerData,
        )];
        let nulls = [b' ' as std::ffi::c_char];
        // SAFETY: a kept plan with one tid parameter; `ctid` outlives the call.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 1),
                "describing a local row",
            );
            first_text_and_free()
        }
    }

    /// The stop a conflict asked for, if any.
    pub fn take_stop(&mut self) -> Option<Stop> {
        self.stop.take()
    }

    /// Rolls back the transaction a stop interrupted and records the
    /// conflict in its own transaction (once per remote transaction and
    /// type, however often the writer retries it).
    pub fn abort_for(&mut self, stop: &Stop) {
        let history = stop.history.clone();
        let plan = history.as_ref().map(|_| self.history_error_plan());
        // SAFETY: aborts the apply transaction (SPI is cleaned up with it);
        // the history row is written in a transaction without the peer's
        // origin, so that origin progress does not move.
        unsafe {
            pg_sys::AbortCurrentTransaction();
            self.in_txn = false;
            if let (Some(row), Some(plan)) = (history, plan) {
                let origin = pg_sys::replorigin_session_origin;
                pg_sys::replorigin_session_origin = 0;
                pg_sys::StartTransactionCommand();
                pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
                spi_check(pg_sys::SPI_connect(), "connecting to SPI");
                exec_texts(plan, &row, self.row_cxt);
                pg_sys::SPI_finish();
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
                pg_sys::replorigin_session_origin = origin;
                pg_sys::MemoryContextReset(self.row_cxt);
            }
        }
        // The conflict that stopped the apply counts once, not per retry;
        // the others of this attempt count when the transaction commits.
        let lsn = self.remote_final_lsn;
        let t = stop.conflict_type;
        stats::update(self.dboid, self.sub_id, |s| {
            s.nabort += 1;
            if s.last_failed_lsn != lsn {
                s.conflicts[t as usize] += 1;
            }
        });
    }

    fn history_error_plan(&mut self) -> pg_sys::SPIPlanPtr {
        // Kept plans outlive the aborted transaction.
        let plan = keep_plan(
            &format!(
                "{} WHERE NOT EXISTS (SELECT 1 FROM bdr.conflict_history h
                   WHERE h.sub_id = $1::oid AND h.remote_commit_lsn = $5::pg_lsn
                     AND h.conflict_type = $7 AND h.conflict_resolution = 'error')",
                history_insert_select()
            ),
            &mut [pg_sys::TEXTOID; 19],
        );
        plan
    }

    /// The replica identity columns to find a row by, and whether that is
    /// the whole row (REPLICA IDENTITY FULL without a key).
    fn identity(&mut self, relid: u32, old: &[Value], what: &str) -> (Vec<usize>, bool) {
        let r = self.rel(relid);
        let (key, full) = if r.key.is_empty() && r.remote.replica_identity == b'f' {
            (
                (0..old.len())
                    .filter(|i| old[*i] != Value::UnchangedToast)
                    .collect(),
                true,
            )
        } else {
            (r.key.clone(), false)
        };
        if key.is_empty() {
            error!(
                "table {} has no replica identity; {what} cannot be applied",
                r.qualified
            );
        }
        (key, full)
    }

    /// Finds the row; when it is missing and has a key, locks the key and
    /// looks again, so that what is decided about a missing row is decided
    /// by one writer at a time and sees the others' committed work.
    fn find_or_lock(
        &mut self,
        relid: u32,
        key: &[usize],
        vals: &[Value],
        full: bool,
    ) -> Option<Found> {
        if let Some(f) = self.find(relid, key, vals, full) {
            return Some(f);
        }
        if full || !self.lock_key(relid, key, vals) {
            return None;
        }
        self.find(relid, key, vals, full)
    }

    fn update(&mut self, relid: u32, old: Option<&[Value]>, new: &[Value]) {
        let lookup = old.unwrap_or(new);
        let (key, full) = self.identity(relid, lookup, "UPDATE");
        let key_changed =
            !full && old.is_some() && key.iter().any(|&i| lookup.get(i) != new.get(i));
        let full_row = !new.contains(&Value::UnchangedToast);
        // Missing columns are resolved first, so that nothing of the change
        // is applied when it is to be skipped.
        let Some(cols) = self.present_cols(relid, new, false) else {
            return;
        };
        match self.find_or_lock(relid, &key, lookup, full) {
            Some(f) => {
                let newer = remote_wins(self.remote_writer(), f.writer);
                // The row was last written by another node than the one
                // updating it: concurrent changes met (update_origin_change).
                let apply = if f.writer.is_some_and(|w| w.node_id != self.remote_node_id) {
                    let detail = self.local_desc(&f);
                    let index = self.rel(relid).key_index;
                    match self.conflict(
                        Seen {
                            t: ConflictType::UpdateOriginChange,
                            relid,
                            index,
                            key: &key,
                            key_vals: lookup,
                            remote: Some(new),
                            local: Some(&f),
                            applies_row: true,
                            detail,
                        },
                        Facts {
                            full_row,
                            ..Facts::default()
                        },
                    ) {
                        Outcome::ApplyRemote => true,
                        Outcome::Skip => false,
                        Outcome::Error => return,
                    }
                } else {
                    newer
                };
                if key_changed && full_row {
                    // A key change is the old row going and the new one
                    // coming, each resolved on its own: the new key may be
                    // taken here by a newer row (update_pkey_exists), and then
                    // the old row still goes, as it did on the origin.
                    if apply {
                        self.exec_delete(relid, f.ctid);
                        self.note_deleted(relid, &key, lookup);
                    }
                    self.insert(relid, new, &cols, ConflictType::UpdatePkeyExists, true);
                } else if apply {
                    // In place (also a key change that kept TOASTed values,
                    // which only the local row has).
                    let mut others = Vec::new();
                    if key_changed {
                        if let Some(p) = self.find(relid, &key, new, false) {
                            let index = self.rel(relid).key_index.unwrap_or(pg_sys::InvalidOid);
                            others.push((index, p));
                        }
                    }
                    for (i, o) in self.unique_collisions(relid, new, Some(f.ctid)) {
                        if !others.iter().any(|(_, g)| same_tid(&g.ctid, &o.ctid)) {
                            others.push((i, o));
                        }
                    }
                    if others.is_empty() {
                        self.exec_update(relid, f.ctid, &cols, new);
                        if key_changed {
                            // The old key is gone, as after a delete.
                            self.note_deleted(relid, &key, lookup);
                        }
                    } else {
                        self.resolve_update_collisions(relid, new, &cols, &key, lookup, &f, others);
                    }
                }
            }
            None => {
                // The row is not here: deleted here by a newer delete
                // (update_recently_deleted), or not here (yet): an update
                // that overtook its insert from a third node, or one whose
                // row was deleted here earlier (update_missing). Inserting
                // the whole row keeps the update; an older insert arriving
                // later then loses against it.
                let recently_deleted = !full && self.deleted_later(relid, &key, lookup);
                let t = if recently_deleted {
                    ConflictType::UpdateRecentlyDeleted
                } else {
                    ConflictType::UpdateMissing
                };
                let detail = if recently_deleted {
                    "the row was deleted on this node by a newer transaction".to_string()
                } else {
                    "the row does not exist on this node".to_string()
                };
                let o = self.conflict(
                    Seen {
                        t,
                        relid,
                        index: None,
                        key: &key,
                        key_vals: lookup,
                        remote: Some(new),
                        local: None,
                        applies_row: true,
                        detail,
                    },
                    Facts {
                        full_row,
                        ..Facts::default()
                    },
                );
                if key_changed && !recently_deleted {
                    // The change deleted the old key on its origin: an
                    // older insert of that key, still on its way from a third
                    // node, must find the tombstone.
                    self.note_deleted(relid, &key, lookup);
                }
                if o == Outcome::ApplyRemote {
                    let kind = if key_changed {
                        ConflictType::UpdatePkeyExists
                    } else {
                        ConflictType::InsertExists
                    };
                    self.insert(relid, new, &cols, kind, !recently_deleted);
                }
            }
        }
    }

    fn delete(&mut self, relid: u32, old: &[Value]) {
        let (key, full) = self.identity(relid, old, "DELETE");
        match self.find_or_lock(relid, &key, old, full) {
            Some(f) => {
                // A row updated here after the delete was made stays.
                let newer = remote_wins(self.remote_writer(), f.writer);
                let apply = if newer {
                    true
                } else {
                    let detail = format!(
                        "the row was updated after the delete was made: {}",
                        self.local_desc(&f)
                    );
                    let index = self.rel(relid).key_index;
                    self.conflict(
                        Seen {
                            t: ConflictType::DeleteRecentlyUpdated,
                            relid,
                            index,
                            key: &key,
                            key_vals: old,
                            remote: Some(old),
                            local: Some(&f),
                            applies_row: false,
                            detail,
                        },
                        Facts::default(),
                    ) == Outcome::ApplyRemote
                };
                if apply {
                    self.exec_delete(relid, f.ctid);
                    if !full {
                        self.note_deleted(relid, &key, old);
                    }
                }
            }
            None => {
                let o = self.conflict(
                    Seen {
                        t: ConflictType::DeleteMissing,
                        relid,
                        index: None,
                        key: &key,
                        key_vals: old,
                        remote: Some(old),
                        local: None,
                        applies_row: false,
                        detail: "the row does not exist on this node".into(),
                    },
                    Facts::default(),
                );
                // Gone already, or not here yet: note the delete, so that an
                // older insert or update arriving later does not bring it back.
                if o != Outcome::Error && !full && !self.deleted_later(relid, &key, old) {
                    self.note_deleted(relid, &key, old);
                }
            }
        }
    }

    /// The tombstone text of the key columns `key` (remote indexes) of `vals`.
    fn key_text(&mut self, relid: u32, key: &[usize], vals: &[Value]) -> String {
        let (datums, nulls) = self.datums(relid, key, vals);
        let row_cxt = self.row_cxt;
        let r = self.rel(relid);
        let mut parts: Vec<(i16, Option<String>)> = crate::tombstone::with_canonical_output(|| {
            // SAFETY: switched back below; output strings belong to the row.
            let old = unsafe { pg_sys::MemoryContextSwitchTo(row_cxt) };
            let parts = key
                .iter()
                .enumerate()
                .map(|(n, &i)| {
                    let l = &r.local[r.map[i].expect("key columns exist locally")];
                    let text = (nulls[n] != b'n' as std::ffi::c_char)
                        // SAFETY: the datum was made by this column type's input function.
                        .then(|| unsafe { crate::tombstone::output_text(l.typid, datums[n]) });
                    (l.attnum, text)
                })
                .collect();
            // SAFETY: restores the context switched from above.
            unsafe { pg_sys::MemoryContextSwitchTo(old) };
            parts
        });
        parts.sort_by_key(|p| p.0);
        crate::tombstone::key_text(&parts.into_iter().map(|p| p.1).collect::<Vec<_>>())
    }

    /// Makes writers of different peers decide about the same missing key
    /// one after the other: an advisory lock on (relation, key) to the end of
    /// the transaction, under a shared lock on the relation. Every
    /// `MAX_KEY_LOCKS` key locks on one relation (a bulk change) the writer
    /// tries to take the relation's lock exclusively instead, so that the
    /// lock table does not fill up; it only tries, because two writers that
    /// waited for it would deadlock.
    ///
    /// Returns whether the caller must look for the row again (the lock may
    /// have waited for another writer's commit); not once the relation is
    /// held exclusively, since every lookup after that sees all there is.
    fn lock_key(&mut self, relid: u32, key: &[usize], vals: &[Value]) -> bool {
        if key.is_empty() || self.escalated.contains(&relid) {
            return false;
        }
        let local_oid = self.rel(relid).local_oid;
        let n = self.key_locks.entry(relid).or_insert(0);
        *n += 1;
        let count = *n;
        if count == 1 {
            if self.rel_lock_s.is_null() {
                self.rel_lock_s = keep_plan(
                    "SELECT pg_catalog.pg_advisory_xact_lock_shared($1::int8)",
                    &mut [pg_sys::OIDOID],
                );
            }
            self.exec_oid(self.rel_lock_s, local_oid, "locking a relation");
        } else if count % MAX_KEY_LOCKS == 1 {
            // Try, not wait: two writers that both hold the shared lock and
            // waited for the exclusive one would deadlock. If another writer
            // is busy here, go on with key locks and try again later.
            if self.rel_lock_x.is_null() {
                self.rel_lock_x = keep_plan(
                    "SELECT pg_catalog.pg_try_advisory_xact_lock($1::int8)",
                    &mut [pg_sys::OIDOID],
                );
            }
            let got = self
                .exec_oid(self.rel_lock_x, local_oid, "locking a relation")
                .is_some_and(|d| d.value() != 0);
            if got {
                self.escalated.insert(relid);
                return true;
            }
        }
        let text = self.key_text(relid, key, vals);
        if self.key_lock.is_null() {
            self.key_lock = keep_plan(
                "SELECT pg_catalog.pg_advisory_xact_lock($1::int4, pg_catalog.hashtext($2))",
                &mut [pg_sys::OIDOID, pg_sys::TEXTOID],
            );
        }
        self.exec_oid_text(self.key_lock, local_oid, &text, "locking a key");
        true
    }

    /// Runs a kept plan that takes (oid, text); returns the first column of
    /// its first row, if it returned one.
    fn exec_oid_text(
        &self,
        plan: pg_sys::SPIPlanPtr,
        oid: pg_sys::Oid,
        text: &str,
        what: &str,
    ) -> Option<pg_sys::Datum> {
        let ctext = CString::new(text).unwrap_or_default();
        // SAFETY: a kept plan with an oid and a text parameter; the text
        // datum is built in the per-row context; the result row is read
        // before it is freed.
        unsafe {
            let old = pg_sys::MemoryContextSwitchTo(self.row_cxt);
            let mut args = [
                pg_sys::Datum::from(oid),
                pg_sys::Datum::from(pg_sys::cstring_to_text(ctext.as_ptr())),
            ];
            pg_sys::MemoryContextSwitchTo(old);
            spi_check(
                pg_sys::SPI_execute_plan(plan, args.as_mut_ptr(), std::ptr::null(), false, 1),
                what,
            );
            first_datum_and_free()
        }
    }

    /// Runs a kept plan that takes one oid; returns the first column of
    /// its first row, if any.
    fn exec_oid(
        &self,
        plan: pg_sys::SPIPlanPtr,
        oid: pg_sys::Oid,
        what: &str,
    ) -> Option<pg_sys::Datum> {
        let mut args = [pg_sys::Datum::from(oid)];
        // SAFETY: a kept plan with one oid parameter, run in the apply
        // transaction's SPI connection.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, args.as_mut_ptr(), std::ptr::null(), false, 1),
                what,
            );
            first_datum_and_free()
        }
    }

    /// Whether this row was deleted here by a write newer than the incoming one.
    fn deleted_later(&mut self, relid: u32, key: &[usize], vals: &[Value]) -> bool {
        if key.is_empty() {
            return false;
        }
        let text = self.key_text(relid, key, vals);
        let local_oid = self.rel(relid).local_oid;
        if self.tomb_find.is_null() {
            self.tomb_find = keep_plan(
                "SELECT xmin FROM bdr.tombstone WHERE relid = $1 AND key_hash = pg_catalog.md5($2)",
                &mut [pg_sys::OIDOID, pg_sys::TEXTOID],
            );
        }
        let found = self
            .exec_oid_text(self.tomb_find, local_oid, &text, "looking up a deleted row")
            .map(commit_ts_of);
        match found {
            // Deletes the join target remembered when this node joined.
            None => match self.copied_writer(relid, key, vals, true) {
                Some(Some(tomb)) => !remote_wins(self.remote_writer(), Some(tomb)),
                _ => false,
            },
            Some((None, _)) => false,
            Some((Some(commit_ts), ro)) => {
                let tomb = Writer {
                    commit_ts,
                    node_id: self.node_of_origin(ro),
                };
                !remote_wins(self.remote_writer(), Some(tomb))
            }
        }
    }

    fn note_deleted(&mut self, relid: u32, key: &[usize], vals: &[Value]) {
        if key.is_empty() {
            return;
        }
        let text = self.key_text(relid, key, vals);
        let local_oid = self.rel(relid).local_oid;
        if self.tomb_put.is_null() {
            self.tomb_put = keep_plan(
                "INSERT INTO bdr.tombstone (relid, key_hash) VALUES ($1, pg_catalog.md5($2))
                 ON CONFLICT (relid, key_hash) DO UPDATE SET relid = EXCLUDED.relid",
                &mut [pg_sys::OIDOID, pg_sys::TEXTOID],
            );
        }
        self.exec_oid_text(self.tomb_put, local_oid, &text, "noting a deleted row");
    }

    fn truncate(&mut self, relids: &[u32], cascade: bool, restart_identity: bool) {
        let names: Vec<String> = relids
            .iter()
            .map(|r| self.rel(*r).qualified.clone())
            .collect();
        let sql = format!(
            "TRUNCATE {}{}{}",
            names.join(", "),
            if restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            },
            if cascade { " CASCADE" } else { "" }
        );
        let c = CString::new(sql).unwrap_or_default();
        // SAFETY: a utility statement inside the apply transaction.
        unsafe { spi_check(pg_sys::SPI_execute(c.as_ptr(), false, 0), "truncating") };
    }

    /// Converts remote values to local datums for the given remote columns.
    fn datums(
        &mut self,
        relid: u32,
        cols: &[usize],
        vals: &[Value],
    ) -> (Vec<pg_sys::Datum>, Vec<std::ffi::c_char>) {
        let row_cxt = self.row_cxt;
        let r = self.rel(relid);
        let mut datums = Vec::with_capacity(cols.len() + 1);
        let mut nulls = Vec::with_capacity(cols.len() + 1);
        // SPI calls leave the SPI procedure context current, which lives to
        // the remote commit; values belong to the row, reset after it.
        // SAFETY: switched back below.
        let old_cxt = unsafe { pg_sys::MemoryContextSwitchTo(row_cxt) };
        for &i in cols {
            let Some(li) = r.map[i] else {
                datums.push(pg_sys::Datum::from(0));
                nulls.push(b'n' as std::ffi::c_char);
                continue;
            };
            let l = &r.local[li];
            let v = vals.get(i).unwrap_or(&Value::Null);
            // SAFETY: type input/receive functions of the local column's type,
            // called with NUL-terminated text or a StringInfo over the bytes.
            let d = unsafe {
                match v {
                    Value::Null | Value::UnchangedToast => None,
                    Value::Text(s) => {
                        let c = CString::new(s.as_str()).unwrap_or_default();
                        Some(pg_sys::OidInputFunctionCall(
                            l.input,
                            c.as_ptr() as *mut _,
                            l.input_param,
                            l.typmod,
                        ))
                    }
                    Value::Binary(b) => {
                        if r.remote.columns[i].type_oid != l.typid.to_u32() {
                            error!(
                                "column \"{}\" of {} has type {} here but another type on the peer",
                                l.name,
                                r.qualified,
                                l.typid.to_u32()
                            );
                        }
                        let buf = pg_sys::makeStringInfo();
                        pg_sys::appendBinaryStringInfo(buf, b.as_ptr() as *const _, b.len() as i32);
                        let d = pg_sys::OidReceiveFunctionCall(l.recv, buf, l.recv_param, l.typmod);
                        if (*buf).cursor != (*buf).len {
                            pgrx::ereport!(
                                ERROR,
                                PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION,
                                format!(
                                    "incorrect binary data format in column \"{}\" of {}",
                                    l.name, r.qualified
                                )
                            );
                        }
                        Some(d)
                    }
                }
            };
            match d {
                Some(d) => {
                    datums.push(d);
                    nulls.push(b' ' as std::ffi::c_char);
                }
                None => {
                    datums.push(pg_sys::Datum::from(0));
                    nulls.push(b'n' as std::ffi::c_char);
                }
            }
        }
        // SAFETY: restores the context switched from above.
        unsafe { pg_sys::MemoryContextSwitchTo(old_cxt) };
        (datums, nulls)
    }

    fn plan(&mut self, relid: u32, key: PlanKey) -> pg_sys::SPIPlanPtr {
        let r = self.rel(relid);
        if let Some(p) = r.plans.get(&key) {
            return *p;
        }
        let col = |i: usize| -> (&str, pg_sys::Oid) {
            match r.map[i] {
                Some(li) => (r.local[li].name.as_str(), r.local[li].typid),
                None => error!(
                    "column \"{}\" of {} exists on the peer but not on this node",
                    r.remote.columns[i].name, r.qualified
                ),
            }
        };
        let mut types: Vec<pg_sys::Oid> = Vec::new();
        let sql = match &key {
            PlanKey::Find(cols, full) => {
                let conds: Vec<String> = cols
                    .iter()
                    .enumerate()
                    .map(|(n, &i)| {
                        let (name, t) = col(i);
                        types.push(t);
                        let op = if *full { "IS NOT DISTINCT FROM" } else { "=" };
                        format!("{} {op} ${}", quote_ident(name), n + 1)
                    })
                    .collect();
                format!(
                    // The commit timestamp is looked up from the xmin of the row
                    // version we locked: a join here would, after waiting for a
                    // concurrent writer, pair the new version with the old
                    // version's timestamp.
                    "SELECT t.ctid, t.xmin FROM ONLY {} t WHERE {} LIMIT 1 FOR UPDATE",
                    r.qualified,
                    conds.join(" AND ")
                )
            }
            PlanKey::Insert(cols) => {
                let names: Vec<String> = cols
                    .iter()
                    .map(|&i| {
                        let (name, t) = col(i);
                        types.push(t);
                        quote_ident(name)
                    })
                    .collect();
                let params: Vec<String> = (1..=cols.len()).map(|n| format!("${n}")).collect();
                format!(
                    "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING RETURNING ctid",
                    r.qualified,
                    names.join(", "),
                    params.join(", ")
                )
            }
            PlanKey::Update(cols) => {
                let sets: Vec<String> = cols
                    .iter()
                    .enumerate()
                    .map(|(n, &i)| {
                        let (name, t) = col(i);
                        types.push(t);
                        format!("{} = ${}", quote_ident(name), n + 1)
                    })
                    .collect();
                types.push(pg_sys::TIDOID);
                format!(
                    "UPDATE ONLY {} SET {} WHERE ctid = ${}",
                    r.qualified,
                    sets.join(", "),
                    cols.len() + 1
                )
            }
            PlanKey::Delete => {
                types.push(pg_sys::TIDOID);
                format!("DELETE FROM ONLY {} WHERE ctid = $1", r.qualified)
            }
            PlanKey::KeyAt => {
                types.push(pg_sys::TIDOID);
                let cols: Vec<String> = r
                    .key
                    .iter()
                    .map(|&i| format!("{}::text", quote_ident(col(i).0)))
                    .collect();
                format!(
                    "SELECT {} FROM ONLY {} WHERE ctid = $1",
                    cols.join(", "),
                    r.qualified
                )
            }
            PlanKey::LocalJson => {
                types.push(pg_sys::TIDOID);
                format!(
                    "SELECT pg_catalog.to_json(t)::text FROM ONLY {} t WHERE ctid = $1",
                    r.qualified
                )
            }
            PlanKey::Json(cols) => {
                // json_build_object takes at most 100 arguments: objects of
                // 50 columns are merged.
                let pairs: Vec<String> = cols
                    .iter()
                    .enumerate()
                    .map(|(n, &i)| {
                        let t = match r.map[i] {
                            Some(li) => r.local[li].typid,
                            None => pg_sys::TEXTOID,
                        };
                        types.push(t);
                        format!(
                            "{}, ${}",
                            bdr_core::quote::literal(&r.remote.columns[i].name),
                            n + 1
                        )
                    })
                    .collect();
                let objects: Vec<String> = pairs
                    .chunks(50)
                    .map(|c| format!("pg_catalog.jsonb_build_object({})", c.join(", ")))
                    .collect();
                if objects.len() == 1 {
                    format!(
                        "SELECT pg_catalog.json_build_object({})::text",
                        pairs.join(", ")
                    )
                } else {
                    format!("SELECT ({})::text", objects.join(" || "))
                }
            }
        };
        let c = CString::new(sql).unwrap_or_default();
        // SAFETY: prepared inside the apply transaction's SPI connection and
        // kept, so it outlives the transaction; freed when the RelMap goes.
        let plan = unsafe {
            let p = pg_sys::SPI_prepare(c.as_ptr(), types.len() as i32, types.as_mut_ptr());
            if p.is_null() {
                error!(
                    "bdr writer: could not prepare a statement for {}",
                    r.qualified
                );
            }
            pg_sys::SPI_keepplan(p);
            p
        };
        r.plans.insert(key, plan);
        plan
    }

    fn find(&mut self, relid: u32, key: &[usize], vals: &[Value], full: bool) -> Option<Found> {
        let plan = self.plan(relid, PlanKey::Find(key.to_vec(), full));
        let (mut datums, nulls) = self.datums(relid, key, vals);
        // SAFETY: executes a kept plan with as many datums as it has
        // parameters; reads the one result row before freeing it.
        let found = unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 1),
                "finding a row",
            );
            if pg_sys::SPI_processed == 0 {
                if !pg_sys::SPI_tuptable.is_null() {
                    pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
                }
                None
            } else {
                let tt = pg_sys::SPI_tuptable;
                let tup = *(*tt).vals;
                let desc = (*tt).tupdesc;
                let mut isnull = false;
                let ctid_d = pg_sys::SPI_getbinval(tup, desc, 1, &mut isnull);
                let ctid = *(ctid_d.cast_mut_ptr::<pg_sys::ItemPointerData>());
                let xmin = pg_sys::SPI_getbinval(tup, desc, 2, &mut isnull);
                pg_sys::SPI_freetuptable(tt);
                let (ts, ro) = commit_ts_of(xmin);
                Some((ctid, ts, ro, xmin.value() as u32))
            }
        };
        let (ctid, ts, ro, xmin) = found?;
        let mut writer = ts.map(|commit_ts| Writer {
            commit_ts,
            node_id: self.node_of_origin(ro),
        });
        if ts == Some(COPIED_COMMIT_TS) && !full {
            // A row a join copied here: its real writer was copied too.
            let key_vals;
            let (key_cols, vals) = if key == self.rel(relid).key.as_slice() {
                (key.to_vec(), vals)
            } else {
                let k = self.rel(relid).key.clone();
                key_vals = self.key_values_at(relid, &k, ctid);
                (k, key_vals.as_slice())
            };
            if !key_cols.is_empty() {
                writer = self.copied_writer(relid, &key_cols, vals, false).flatten();
            }
        }
        Some(Found { ctid, xmin, writer })
    }

    /// The real writer of a row (or, `deleted`, of a delete) a join copied
    /// here, from `bdr.copied_row`: `None` when there is no such entry,
    /// `Some(None)` when its writer was not known either.
    fn copied_writer(
        &mut self,
        relid: u32,
        key: &[usize],
        vals: &[Value],
        deleted: bool,
    ) -> Option<Option<Writer>> {
        let text = self.key_text(relid, key, vals);
        let local_oid = self.rel(relid).local_oid;
        if self.copied_plan.is_null() {
            self.copied_plan = keep_plan(
                "SELECT c.commit_us::text || ' ' || COALESCE(c.node_id, 0)::text FROM bdr.copied_row c
                  WHERE c.relid = $1::oid AND c.key_hash = pg_catalog.md5($2) AND c.deleted = $3::bool
                  LIMIT 1",
                &mut [pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
            );
        }
        let params = [
            Some(local_oid.to_u32().to_string()),
            Some(text),
            Some(deleted.to_string()),
        ];
        let row = exec_texts(self.copied_plan, &params, self.row_cxt);
        let row = row?;
        let mut it = row.split(' ');
        let ts = it.next().and_then(|t| t.parse::<i64>().ok());
        let node = it.next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
        Some(ts.map(|commit_ts| Writer {
            commit_ts,
            node_id: node,
        }))
    }

    /// The remote columns an insert or update sets here, after resolving the
    /// columns the two sides do not share: a column only the peer has is
    /// target_column_missing (by default ignored while its value is NULL,
    /// since a value would be lost), a column only this node has is
    /// source_column_missing (by default it keeps its default, or for an
    /// update its value). `None`: the row is not applied.
    fn present_cols(&mut self, relid: u32, vals: &[Value], inserting: bool) -> Option<Vec<usize>> {
        let r = self.rel(relid);
        if r.source_missing.is_empty() && r.map.iter().all(Option::is_some) {
            // Both sides have the same columns: the usual case, per row.
            return Some(present(r, vals));
        }
        let (unmapped, source_missing, key): (Vec<(usize, String)>, Vec<String>, Vec<usize>) = {
            let r = self.rel(relid);
            (
                r.remote
                    .columns
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| r.map[*i].is_none())
                    .map(|(i, c)| (i, c.name.clone()))
                    .collect(),
                r.source_missing.clone(),
                r.key.clone(),
            )
        };
        for (i, name) in unmapped {
            let value_is_null = matches!(
                vals.get(i),
                None | Some(Value::Null) | Some(Value::UnchangedToast)
            );
            if value_is_null
                && self.config.resolver(ConflictType::TargetColumnMissing) != Resolver::Error
            {
                continue;
            }
            let detail = format!(
                "column \"{name}\" exists on node {} but not on this node{}",
                self.remote_node_id,
                if value_is_null {
                    ""
                } else {
                    ", and the change sets it"
                }
            );
            let o = self.conflict(
                Seen {
                    t: ConflictType::TargetColumnMissing,
                    relid,
                    index: None,
                    key: &key,
                    key_vals: vals,
                    remote: Some(vals),
                    local: None,
                    applies_row: true,
                    detail,
                },
                Facts {
                    value_is_null,
                    ..Facts::default()
                },
            );
            if o != Outcome::ApplyRemote {
                return None;
            }
        }
        if !source_missing.is_empty() {
            let detail = format!(
                "column{} {} of this node {} not sent by node {}; {}",
                if source_missing.len() > 1 { "s" } else { "" },
                source_missing.join(", "),
                if source_missing.len() > 1 {
                    "are"
                } else {
                    "is"
                },
                self.remote_node_id,
                if inserting {
                    "the row gets their default values"
                } else {
                    "the update leaves them as they are"
                }
            );
            let o = self.conflict(
                Seen {
                    t: ConflictType::SourceColumnMissing,
                    relid,
                    index: None,
                    key: &key,
                    key_vals: vals,
                    remote: Some(vals),
                    local: None,
                    applies_row: true,
                    detail,
                },
                Facts::default(),
            );
            if o != Outcome::ApplyRemote {
                return None;
            }
        }
        Some(present(self.rel(relid), vals))
    }

    /// Inserts the row and returns where it went; `None` if a unique
    /// constraint already holds its key.
    fn exec_insert(
        &mut self,
        relid: u32,
        cols: &[usize],
        new: &[Value],
    ) -> Option<pg_sys::ItemPointerData> {
        let plan = self.plan(relid, PlanKey::Insert(cols.to_vec()));
        let (mut datums, nulls) = self.datums(relid, cols, new);
        // SAFETY: a kept plan with matching parameters; the one result row
        // (RETURNING ctid) is read before it is freed.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 0),
                "inserting a row",
            );
            let tt = pg_sys::SPI_tuptable;
            let ctid = (pg_sys::SPI_processed == 1 && !tt.is_null()).then(|| {
                let mut isnull = false;
                let d = pg_sys::SPI_getbinval(*(*tt).vals, (*tt).tupdesc, 1, &mut isnull);
                *(d.cast_mut_ptr::<pg_sys::ItemPointerData>())
            });
            if !tt.is_null() {
                pg_sys::SPI_freetuptable(tt);
            }
            ctid
        }
    }

    fn exec_update(
        &mut self,
        relid: u32,
        mut ctid: pg_sys::ItemPointerData,
        cols: &[usize],
        new: &[Value],
    ) {
        let plan = self.plan(relid, PlanKey::Update(cols.to_vec()));
        let (mut datums, mut nulls) = self.datums(relid, cols, new);
        datums.push(pg_sys::Datum::from(
            &mut ctid as *mut pg_sys::ItemPointerData,
        ));
        nulls.push(b' ' as std::ffi::c_char);
        // SAFETY: a kept plan with matching parameters; `ctid` outlives the call.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 0),
                "updating a row",
            )
        };
    }

    fn exec_delete(&mut self, relid: u32, mut ctid: pg_sys::ItemPointerData) {
        let plan = self.plan(relid, PlanKey::Delete);
        let mut datums = [pg_sys::Datum::from(
            &mut ctid as *mut pg_sys::ItemPointerData,
        )];
        let nulls = [b' ' as std::ffi::c_char];
        // SAFETY: a kept plan with one tid parameter; `ctid` outlives the call.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 0),
                "deleting a row",
            )
        };
    }
}
