//! Applying a peer's transactions: each remote transaction becomes one local
//! transaction, run under the peer's replication origin so that the origin's
//! progress commits atomically with the data and the local commit timestamp
//! equals the remote one. Rows are found by replica identity and changed with
//! SPI plans prepared once per relation and column set, and kept.
//!
//! A change that meets a local row written elsewhere is resolved by
//! `bdr_core::conflict::remote_wins` (last update wins, ties to the higher
//! node id), so every node keeps the same row.

use bdr_core::conflict::{remote_wins, ConflictType, Writer};
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
    writer: Option<Writer>,
}

pub struct Applier {
    local_node_id: u32,
    remote_node_id: u32,
    rels: HashMap<u32, RelMap>,
    origin_nodes: HashMap<u16, u32>,
    tomb_find: pg_sys::SPIPlanPtr,
    tomb_put: pg_sys::SPIPlanPtr,
    key_lock: pg_sys::SPIPlanPtr,
    rel_lock_s: pg_sys::SPIPlanPtr,
    rel_lock_x: pg_sys::SPIPlanPtr,
    /// Key locks taken per relation in the current transaction.
    key_locks: HashMap<u32, u32>,
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

/// Key locks one transaction takes on one relation before it locks the
/// whole relation instead (see `Applier::lock_key`).
const MAX_KEY_LOCKS: u32 = 256;

fn spi_check(rc: i32, what: &str) {
    if rc < 0 {
        error!("bdr writer: SPI failed ({rc}) while {what}");
    }
}

impl Applier {
    pub fn new(local_node_id: u32, remote_node_id: u32, applied_up_to: u64) -> Applier {
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
        Applier {
            local_node_id,
            remote_node_id,
            rels: HashMap::new(),
            origin_nodes: HashMap::new(),
            tomb_find: std::ptr::null_mut(),
            tomb_put: std::ptr::null_mut(),
            key_lock: std::ptr::null_mut(),
            rel_lock_s: std::ptr::null_mut(),
            rel_lock_x: std::ptr::null_mut(),
            key_locks: HashMap::new(),
            escalated: std::collections::HashSet::new(),
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
                final_lsn,
                commit_time,
                ..
            } => {
                self.commit_ts = commit_time;
                // Streaming resumes at the origin's progress, so this only
                // catches a peer that sends again what we already have.
                self.skip_txn = final_lsn != 0 && final_lsn < self.applied_up_to;
                if !self.skip_txn {
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
            Message::Insert { relid, new } => {
                self.row(|a| a.insert(relid, &new));
                None
            }
            Message::Update { relid, old, new } => {
                self.row(|a| a.update(relid, old.as_deref(), &new));
                None
            }
            Message::Delete { relid, old } => {
                self.row(|a| a.delete(relid, &old));
                None
            }
            Message::Truncate {
                relids,
                cascade,
                restart_identity,
            } => {
                self.row(|a| a.truncate(&relids, cascade, restart_identity));
                None
            }
        }
    }

    fn begin(&mut self) {
        // SAFETY: starts the local transaction the remote one is applied in.
        unsafe {
            pg_sys::SetCurrentStatementStartTimestamp();
            pg_sys::StartTransactionCommand();
            spi_check(pg_sys::SPI_connect(), "connecting to SPI");
        }
        self.in_txn = true;
        self.key_locks.clear();
        self.escalated.clear();
    }

    fn commit(&mut self, end_lsn: u64, commit_time: i64) -> u64 {
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
        // SAFETY: set by the commit just made (0 if it wrote no WAL).
        unsafe { pg_sys::XactLastCommitEnd }
    }

    /// Runs one row change with a fresh snapshot and per-row memory.
    fn row(&mut self, f: impl FnOnce(&mut Self)) {
        if !self.in_txn {
            error!("bdr writer: change outside a transaction from the peer");
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
            pg_sys::SPI_finish();
            pg_sys::PopActiveSnapshot();
            if own_txn {
                pg_sys::CommitTransactionCommand();
            }
        }
        if local.is_empty() {
            error!(
                "table {qualified} replicated from node {} does not exist on this node",
                self.remote_node_id
            );
        }
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
        RelMap {
            remote: r,
            local_oid,
            qualified,
            map,
            local,
            key,
            plans: HashMap::new(),
        }
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
            "SELECT s.origin_node_id FROM pg_catalog.pg_replication_origin o
               JOIN bdr.subscription s ON s.origin_name = o.roname WHERE o.roident = {roident}"
        ))
        .unwrap_or_default();
        // SAFETY: read-only query inside the apply transaction's SPI connection.
        let node = unsafe {
            spi_check(
                pg_sys::SPI_execute(q.as_ptr(), true, 1),
                "looking up an origin",
            );
            if pg_sys::SPI_processed == 0 {
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
            }
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

    fn insert(&mut self, relid: u32, new: &[Value]) {
        let key = self.rel(relid).key.clone();
        if key.is_empty() {
            self.exec_insert(relid, new);
            return;
        }
        let mut locked = false;
        // Rounds: look; if missing, lock the key and look again; then insert,
        // or, if a local session inserted the key meanwhile, resolve against it.
        for _ in 0..4 {
            match self.find(relid, &key, new, false) {
                Some(f) => {
                    // insert_exists: the newer write wins.
                    let wins = remote_wins(self.remote_writer(), f.writer);
                    self.report(ConflictType::InsertExists, relid, f.writer, wins);
                    if wins {
                        self.exec_update(relid, f.ctid, new);
                    }
                    return;
                }
                None if !locked => {
                    locked = true;
                    if self.lock_key(relid, &key, new) {
                        continue;
                    }
                    if self.deleted_later(relid, &key, new) || self.exec_insert(relid, new) {
                        return;
                    }
                }
                None => {
                    if self.deleted_later(relid, &key, new) || self.exec_insert(relid, new) {
                        return;
                    }
                }
            }
        }
        error!(
            "a row replicated into {} conflicts with a local row on a unique constraint other than its replica identity",
            self.rel(relid).qualified
        );
    }

    /// Writes a detected conflict and how it was resolved to the server log.
    fn report(&mut self, t: ConflictType, relid: u32, local: Option<Writer>, remote_applied: bool) {
        let local = match local {
            Some(w) => format!(
                "the local row was last written by node {} at {}",
                w.node_id,
                timestamp_text(w.commit_ts)
            ),
            None => "no local row".to_string(),
        };
        let remote_ts = timestamp_text(self.commit_ts);
        let remote_node = self.remote_node_id;
        tracing::info!(
            "CONFLICT: {} on {} from node {} (commit at {}); {}; resolution: {}",
            t.name(),
            self.rel(relid).qualified,
            remote_node,
            remote_ts,
            local,
            if remote_applied {
                "apply_remote"
            } else {
                "skip"
            }
        );
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
        match self.find_or_lock(relid, &key, lookup, full) {
            Some(f) => {
                let wins = remote_wins(self.remote_writer(), f.writer);
                // The row was last written by another node than the one
                // updating it: concurrent changes met (update_origin_change).
                if f.writer.is_some_and(|w| w.node_id != self.remote_node_id) {
                    self.report(ConflictType::UpdateOriginChange, relid, f.writer, wins);
                }
                let key_changed = !full
                    && old.is_some()
                    && key.iter().any(|&i| lookup.get(i) != new.get(i))
                    && !new.contains(&Value::UnchangedToast);
                if key_changed {
                    // A key change is the old row going and the new one
                    // coming, each resolved on its own: the new key may be
                    // taken here by a newer row (update_pkey_exists), and then
                    // the old row still goes, as it did on the origin.
                    if wins {
                        self.exec_delete(relid, f.ctid);
                        self.note_deleted(relid, &key, lookup);
                    }
                    self.insert(relid, new);
                } else if wins {
                    self.exec_update(relid, f.ctid, new);
                }
            }
            None => {
                // update_missing: the row was not here (yet). Insert it when
                // the change carries the whole row, so that an update that
                // overtook its insert (from a third node) is not lost; the
                // older insert then loses against it. Not when a newer
                // delete was made here.
                if !full && self.deleted_later(relid, &key, lookup) {
                    self.report(ConflictType::UpdateRecentlyDeleted, relid, None, false);
                } else if new.contains(&Value::UnchangedToast) {
                    self.report(ConflictType::UpdateMissing, relid, None, false);
                } else {
                    self.report(ConflictType::UpdateMissing, relid, None, true);
                    // Resolves like an insert, also when the new key is taken.
                    self.insert(relid, new);
                }
            }
        }
    }

    fn delete(&mut self, relid: u32, old: &[Value]) {
        let (key, full) = self.identity(relid, old, "DELETE");
        match self.find_or_lock(relid, &key, old, full) {
            Some(f) => {
                // A row updated here after the delete was made stays.
                let wins = remote_wins(self.remote_writer(), f.writer);
                if !wins {
                    self.report(ConflictType::DeleteRecentlyUpdated, relid, f.writer, false);
                }
                if wins {
                    self.exec_delete(relid, f.ctid);
                    if !full {
                        self.note_deleted(relid, &key, old);
                    }
                }
            }
            None => {
                self.report(ConflictType::DeleteMissing, relid, None, false);
                // Gone already, or not here yet: note the delete, so that an
                // older insert or update arriving later does not bring it back.
                if !full && !self.deleted_later(relid, &key, old) {
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
            None => false,
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
                    "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING",
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
                Some((ctid, ts, ro))
            }
        };
        found.map(|(ctid, ts, ro)| Found {
            ctid,
            writer: ts.map(|commit_ts| Writer {
                commit_ts,
                node_id: self.node_of_origin(ro),
            }),
        })
    }

    /// The remote columns an insert or update sets here. A column the peer
    /// has and this node lacks is ignored while its value is NULL; a value
    /// in it would be lost, so that stops the apply (target_column_missing).
    fn present_cols(&mut self, relid: u32, vals: &[Value]) -> Vec<usize> {
        let r = self.rel(relid);
        for (i, c) in r.remote.columns.iter().enumerate() {
            if r.map[i].is_none()
                && !matches!(
                    vals.get(i),
                    None | Some(Value::Null) | Some(Value::UnchangedToast)
                )
            {
                pgrx::ereport!(
                    ERROR,
                    PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                    format!(
                        "column \"{}\" of {} exists on the peer but not on this node, and a change sets it",
                        c.name, r.qualified
                    ),
                    "Add the column on this node; DDL is not replicated yet."
                );
            }
        }
        (0..r.remote.columns.len())
            .filter(|i| r.map[*i].is_some() && vals.get(*i) != Some(&Value::UnchangedToast))
            .collect()
    }

    /// Inserts the row; false if a unique constraint already holds its key.
    fn exec_insert(&mut self, relid: u32, new: &[Value]) -> bool {
        let cols = self.present_cols(relid, new);
        let plan = self.plan(relid, PlanKey::Insert(cols.clone()));
        let (mut datums, nulls) = self.datums(relid, &cols, new);
        // SAFETY: a kept plan with matching parameters.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 0),
                "inserting a row",
            );
            pg_sys::SPI_processed == 1
        }
    }

    fn exec_update(&mut self, relid: u32, mut ctid: pg_sys::ItemPointerData, new: &[Value]) {
        let cols = self.present_cols(relid, new);
        let plan = self.plan(relid, PlanKey::Update(cols.clone()));
        let (mut datums, mut nulls) = self.datums(relid, &cols, new);
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
