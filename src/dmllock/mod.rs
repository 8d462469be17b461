//! The global DML lock: stops writes to a relation on every node of the
//! group and waits until every node has applied what every other node
//! committed to it before, so that what the DDL holding it does (a new
//! constraint checks the rows, a rewrite or a computed column reads them)
//! sees the same rows everywhere. Unlike the DDL lock it needs every node,
//! not a majority; a node that is down makes it fail within
//! `bdr.global_lock_timeout`.
//!
//! How, for a lock asked for on node R:
//! 1. On every node (R in its own backend, the others through a connection
//!    R holds open) a `ShareLock` on the relation waits for the writes in
//!    progress there to end (PostgreSQL's lock manager queues it ahead of
//!    new writers and detects deadlocks), then an entry in this node's
//!    table of DML locks stops new writes: the executor hook, COPY FROM and
//!    TRUNCATE wait while an entry of someone else names their relation.
//!    bdr's writers are exempt: they bring the others' changes in.
//! 2. Each node commits a marker transaction (`bdr_core::dmllock::
//!    MARKER_PREFIX`): once a node has applied another's marker, it has
//!    applied every change that node made before its writes stopped.
//! 3. R asks every node until each has applied every other's marker.
//!
//! Then R's DDL runs. Just before R commits, each peer's entry is handed
//! over to its writer: it holds until that peer applies a transaction of R
//! that ends after R's commit started, which is R's DDL transaction (or,
//! if that failed, R's next one), so no node writes the relation before it
//! has the DDL. A peer's entry owned by R's connection ends with that
//! connection (R failed, gave up, or its backend died).

use crate::error::{BdrError, BdrResult};
use crate::peer::Peer;
use bdr_core::dmllock::{self as rules};
use bdr_core::lsn;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, Ordering};

mod progress;
pub use progress::{global_lock_table, wait_for_xid_progress, xid_status};

/// The most DML lock entries a node's table holds
/// (`bdr.global_lock_max_locks` may only lower it).
pub const SLOTS: usize = 10_000;

#[derive(Clone, Copy, Default)]
pub struct Entry {
    in_use: bool,
    dboid: u32,
    relid: u32,
    /// The node that asked for the lock.
    origin: u32,
    lock_id: i64,
    /// The backend whose lock it is: the requester's own on its node, the
    /// requester's connection on the others; 0 once handed over.
    owner_pid: i32,
    /// Handed over: released when a transaction of `origin` that ends
    /// after this LSN has been applied here.
    release_after: u64,
    acquired_us: i64,
    /// The lock is taken (the requester's own entry once every node caught
    /// up, a peer's once handed over): the DDL holding it is about to take
    /// its lock-manager lock, which a waiting write would block.
    held: bool,
}

#[derive(Clone, Copy)]
pub struct Table {
    e: [Entry; SLOTS],
}

impl Default for Table {
    fn default() -> Self {
        Table {
            e: [Entry::default(); SLOTS],
        }
    }
}

// SAFETY: plain data.
unsafe impl PGRXSharedMemory for Table {}

#[derive(Default)]
pub struct Count {
    /// Entries in use, in every database: 0 lets every write through
    /// without looking at the table.
    n: AtomicU32,
}

// SAFETY: an atomic.
unsafe impl PGRXSharedMemory for Count {}

// SAFETY: the only shared memory of these names.
static LOCKS: PgLwLock<Table> = unsafe { PgLwLock::new(c"bdr_dml_locks") };
// SAFETY: as above.
static COUNT: PgAtomic<Count> = unsafe { PgAtomic::new(c"bdr_dml_lock_count") };

static mut PREV_EXECUTOR_START: pg_sys::ExecutorStart_hook_type = None;

pub fn init() {
    pg_shmem_init!(LOCKS);
    pg_shmem_init!(COUNT);
    // SAFETY: _PG_init runs once in the postmaster before any backend exists.
    unsafe {
        PREV_EXECUTOR_START = pg_sys::ExecutorStart_hook;
        pg_sys::ExecutorStart_hook = Some(executor_start);
    }
}

fn my_database() -> u32 {
    // SAFETY: set for the life of a connected backend.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

fn my_pid() -> i32 {
    // SAFETY: set for the life of the process.
    unsafe { pg_sys::MyProcPid }
}

fn capacity() -> usize {
    (crate::guc::get_int(crate::guc::GLOBAL_LOCK_MAX_LOCKS).max(1) as usize).min(SLOTS)
}

fn insert(e: Entry) -> BdrResult<()> {
    let mut t = LOCKS.exclusive();
    let used = t.e.iter().filter(|x| x.in_use).count();
    let free = t.e.iter().position(|x| !x.in_use);
    match free {
        Some(i) if used < capacity() => {
            t.e[i] = Entry { in_use: true, ..e };
            COUNT.get().n.fetch_add(1, Ordering::AcqRel);
            Ok(())
        }
        _ => Err(BdrError::GlobalLock {
            msg: format!(
                "this node holds {used} global DML locks, the most bdr.global_lock_max_locks allows"
            ),
            hint: "Retry once other DDL has finished, or raise bdr.global_lock_max_locks (needs a restart).".into(),
        }),
    }
}

/// Removes the entries `pred` picks; how many it removed.
fn remove(pred: impl Fn(&Entry) -> bool) -> usize {
    if COUNT.get().n.load(Ordering::Acquire) == 0 {
        return 0;
    }
    let mut t = LOCKS.exclusive();
    let mut n = 0;
    for e in t.e.iter_mut().filter(|e| e.in_use && pred(e)) {
        e.in_use = false;
        n += 1;
    }
    if n > 0 {
        COUNT.get().n.fetch_sub(n as u32, Ordering::AcqRel);
    }
    n
}

/// The entry that stops this backend from writing `relid`, if any.
fn blocking(relid: u32) -> Option<Entry> {
    if COUNT.get().n.load(Ordering::Acquire) == 0 {
        return None;
    }
    let (db, me) = (my_database(), my_pid());
    let t = LOCKS.share();
    t.e.iter()
        .find(|e| e.in_use && e.dboid == db && e.relid == relid && e.owner_pid != me)
        .copied()
}

/// A write to `relids` is about to run: waits while a global DML lock of
/// someone else stops writes to one of them. bdr's writers never wait.
pub fn check_write(relids: &[pg_sys::Oid]) {
    if relids.is_empty() || COUNT.get().n.load(Ordering::Acquire) == 0 || crate::hlc::is_exempt() {
        return;
    }
    let timeout_ms = crate::guc::get_int(crate::guc::GLOBAL_LOCK_TIMEOUT).max(0) as i64;
    // SAFETY: reads backend-global state.
    let (has_xid, deadlock_ms) = unsafe {
        (
            pg_sys::GetTopTransactionIdIfAny() != pg_sys::InvalidTransactionId,
            pg_sys::DeadlockTimeout as i64,
        )
    };
    let started = crate::shmem::now();
    for relid in relids {
        while let Some(e) = blocking(relid.to_u32()) {
            let waited = (crate::shmem::now() - started) / 1000;
            // A waiting write holds its lock-manager lock on the relation
            // (taken before the executor starts), which the DDL under the
            // lock needs: once the lock is taken the write gives up rather
            // than block it. While the lock is being taken it waits; a
            // transaction that has written already may hold what the lock
            // waits for (a row a peer's change must update), so it waits
            // no longer than PostgreSQL waits before it looks for deadlocks.
            let limit = if has_xid {
                deadlock_ms.max(1)
            } else {
                timeout_ms
            };
            let held = e.held || e.owner_pid == 0;
            if held || (limit > 0 && waited >= limit) {
                BdrError::GlobalLock {
                    msg: format!(
                        "could not write to {}: the global DML lock of node {} stops writes to it ({} ms so far)",
                        relation_name(*relid),
                        node_name(e.origin),
                        (crate::shmem::now() - e.acquired_us) / 1000
                    ),
                    hint: if held {
                        "DDL is changing the table on every node: retry the transaction in a moment (bdr.global_locks shows the lock).".into()
                    } else if has_xid {
                        "This transaction has written already and might block the lock: retry it.".into()
                    } else {
                        "Retry when the DDL holding it has replicated (bdr.global_locks shows it); bdr.global_lock_timeout bounds this wait.".into()
                    },
                }
                .raise();
            }
            crate::pg::latch::wait(None, 10);
        }
    }
}

pub(crate) fn relation_name(relid: pg_sys::Oid) -> String {
    Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[relid.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| relid.to_u32().to_string())
}

pub(crate) fn node_name(id: u32) -> String {
    crate::pg::user::as_bdr(|| crate::catalog::node_by_id(id))
        .ok()
        .flatten()
        .map(|n| format!("\"{}\"", n.node_name))
        .unwrap_or_else(|| id.to_string())
}

#[pg_guard]
unsafe extern "C-unwind" fn executor_start(query_desc: *mut pg_sys::QueryDesc, eflags: i32) {
    if COUNT.get().n.load(Ordering::Acquire) != 0
        && eflags & pg_sys::EXEC_FLAG_EXPLAIN_ONLY as i32 == 0
    {
        // SAFETY: the planned statement of the query about to run; its
        // result relations are range table indexes (1-based). Their locks
        // are held already (taken when the query was parsed or its plan
        // was checked), which is what makes the check race-free: the lock
        // waits for every holder before it stops writes.
        let relids = unsafe {
            let stmt = (*query_desc).plannedstmt;
            let results = (*stmt).resultRelations;
            let mut out = Vec::new();
            if !results.is_null() {
                for i in 0..(*results).length as usize {
                    let rti = (*(*results).elements.add(i)).int_value;
                    let rte =
                        pg_sys::list_nth((*stmt).rtable, rti - 1) as *mut pg_sys::RangeTblEntry;
                    out.push((*rte).relid);
                }
            }
            out
        };
        check_write(&relids);
    }
    // SAFETY: forwarding the hook's own arguments.
    unsafe {
        match PREV_EXECUTOR_START {
            Some(prev) => prev(query_desc, eflags),
            None => pg_sys::standard_ExecutorStart(query_desc, eflags),
        }
    }
}

/// COPY FROM and TRUNCATE, which do not go through the executor: locks
/// the relations as the statement will, then waits like any write.
///
/// # Safety
/// `stmt` is the utility hook's statement.
pub unsafe fn check_utility(stmt: *mut pg_sys::Node) {
    if stmt.is_null() || COUNT.get().n.load(Ordering::Acquire) == 0 || crate::hlc::is_exempt() {
        return;
    }
    // SAFETY: the caller upholds this function's contract.
    let rels = unsafe {
        let mut rvs = Vec::new();
        match (*stmt).type_ {
            pg_sys::NodeTag::T_CopyStmt => {
                let c = stmt as *mut pg_sys::CopyStmt;
                if (*c).is_from && !(*c).relation.is_null() {
                    rvs.push((*c).relation);
                }
            }
            pg_sys::NodeTag::T_TruncateStmt => {
                let t = stmt as *mut pg_sys::TruncateStmt;
                let l = (*t).relations;
                if !l.is_null() {
                    for i in 0..(*l).length as usize {
                        rvs.push((*(*l).elements.add(i)).ptr_value as *mut pg_sys::RangeVar);
                    }
                }
            }
            _ => {}
        }
        let mut out = Vec::new();
        for rv in rvs {
            let relid = crate::ddl::existing_relid(rv);
            if relid != pg_sys::InvalidOid {
                pg_sys::LockRelationOid(relid, pg_sys::RowExclusiveLock as i32);
                out.push(relid);
            }
        }
        out
    };
    check_write(&rels);
}

/// The relation and its partitions, every level.
fn with_partitions(relid: pg_sys::Oid) -> BdrResult<Vec<pg_sys::Oid>> {
    let mut out = vec![relid];
    Spi::connect(|c| -> BdrResult<()> {
        for row in c.select(
            "SELECT relid FROM pg_catalog.pg_partition_tree($1) WHERE relid <> $1",
            None,
            &[relid.into()],
        )? {
            if let Some(r) = row.get::<pg_sys::Oid>(1)? {
                out.push(r);
            }
        }
        Ok(())
    })?;
    Ok(out)
}

/// Sets `lock_timeout` for this transaction to at most `ms` (0: leaves it);
/// returns what it was.
fn bound_lock_timeout(ms: i64) -> BdrResult<Option<String>> {
    if ms <= 0 {
        return Ok(None);
    }
    // SAFETY: reads a setting's current value.
    let current = unsafe { pg_sys::LockTimeout } as i64;
    if current > 0 && current <= ms {
        return Ok(None);
    }
    Spi::run_with_args(
        "SELECT pg_catalog.set_config('lock_timeout', $1, true)",
        &[format!("{}ms", ms.clamp(1, i32::MAX as i64)).into()],
    )?;
    Ok(Some(format!("{current}ms")))
}

fn restore_lock_timeout(was: Option<String>) -> BdrResult<()> {
    if let Some(v) = was {
        Spi::run_with_args(
            "SELECT pg_catalog.set_config('lock_timeout', $1, true)",
            &[v.into()],
        )?;
    }
    Ok(())
}

/// Step 1 on this node: waits (at most `timeout_ms`) for the writes to
/// `relid` and its partitions in progress here, then stops new ones with
/// entries owned by `owner_pid`.
fn stop_writes_here(
    relid: pg_sys::Oid,
    origin: u32,
    lock_id: i64,
    owner_pid: i32,
    timeout_ms: i64,
) -> BdrResult<()> {
    let rels = with_partitions(relid)?;
    let was = bound_lock_timeout(timeout_ms)?;
    for r in &rels {
        // SAFETY: a lock the transaction lets go below (or at its end).
        unsafe { pg_sys::LockRelationOid(*r, pg_sys::ShareLock as i32) };
    }
    restore_lock_timeout(was)?;
    let now = crate::shmem::now();
    for r in &rels {
        insert(Entry {
            in_use: true,
            dboid: my_database(),
            relid: r.to_u32(),
            origin,
            lock_id,
            owner_pid,
            release_after: 0,
            acquired_us: now,
            held: false,
        })
        .inspect_err(|_| {
            remove(|e| e.lock_id == lock_id && e.owner_pid == owner_pid);
        })?;
    }
    // The entries stop writes from here on; bdr's writers must not wait
    // behind the lock-manager lock for the rest of this transaction.
    for r in &rels {
        // SAFETY: taken above by this transaction.
        unsafe { pg_sys::UnlockRelationOid(*r, pg_sys::ShareLock as i32) };
    }
    Ok(())
}

/// Step 2: commits (with the caller's transaction) a marker message;
/// returns an LSN the marker's commit ends after.
pub fn write_marker() -> BdrResult<u64> {
    crate::pg::user::as_bdr(|| {
        Spi::run_with_args(
            "SELECT pg_catalog.pg_logical_emit_message(true, $1, '')",
            &[rules::MARKER_PREFIX.into()],
        )
    })?;
    // SAFETY: reads the WAL insert position.
    Ok(unsafe { pg_sys::GetXLogInsertRecPtr() })
}

thread_local! {
    static EXIT_HOOK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn release_at_exit(_code: i32, _arg: pg_sys::Datum) {
    let me = my_pid();
    remove(|e| e.owner_pid == me);
}

fn register_exit_hook() {
    if !EXIT_HOOK.with(|c| c.replace(true)) {
        // SAFETY: registers a callback for this backend's exit, once.
        unsafe { pg_sys::before_shmem_exit(Some(release_at_exit), pg_sys::Datum::from(0)) };
    }
}

/// `bdr._dml_lock_acquire`, on a peer for node `origin`'s lock: steps 1
/// and 2; the entries belong to this session (the requester's connection)
/// until handed over.
pub fn acquire_for_peer(
    relation: &str,
    lock_id: i64,
    origin: u32,
    timeout_ms: i64,
) -> BdrResult<u64> {
    let relid = Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT pg_catalog.to_regclass($1)::oid",
        &[relation.into()],
    )?
    .ok_or_else(|| BdrError::GlobalLock {
        msg: format!("relation {relation} does not exist on this node"),
        hint: "Every node must have the relation for the global DML lock; see bdr.worker_errors for DDL that did not apply here.".into(),
    })?;
    register_exit_hook();
    stop_writes_here(relid, origin, lock_id, my_pid(), timeout_ms)?;
    write_marker()
}

/// The requester's own entries of `lock_id`: taken.
fn mark_held(lock_id: i64, owner: i32) {
    let mut t = LOCKS.exclusive();
    for e in
        t.e.iter_mut()
            .filter(|e| e.in_use && e.lock_id == lock_id && e.owner_pid == owner)
    {
        e.held = true;
    }
}

/// `bdr._dml_lock_handover`: this session's entries of lock `lock_id` go
/// to the writer (released when the origin's transaction ending after
/// `after` has been applied here).
pub fn handover(lock_id: i64, after: u64) -> bool {
    let me = my_pid();
    let mut t = LOCKS.exclusive();
    let mut any = false;
    for e in
        t.e.iter_mut()
            .filter(|e| e.in_use && e.lock_id == lock_id && e.owner_pid == me)
    {
        e.owner_pid = 0;
        e.release_after = after;
        any = true;
    }
    any
}

/// The writer applied a transaction of node `origin` that ended at
/// `end_lsn`: lets go of that node's handed-over locks it completes.
pub fn applied(origin: u32, end_lsn: u64) {
    if COUNT.get().n.load(Ordering::Acquire) == 0 {
        return;
    }
    let db = my_database();
    remove(|e| {
        e.dboid == db && e.origin == origin && e.owner_pid == 0 && e.release_after < end_lsn
    });
}

/// How far this node has applied each peer's stream (its origin's LSN).
fn applied_progress() -> BdrResult<Vec<(u32, u64)>> {
    let subs = crate::pg::user::as_bdr(crate::catalog::local_subscriptions)?;
    let mut out = Vec::new();
    for s in subs {
        let p = Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.pg_replication_origin_progress($1, false)::text",
            &[s.origin_name.as_str().into()],
        )?;
        out.push((
            s.origin_node_id,
            p.as_deref().and_then(lsn::parse).unwrap_or(0),
        ));
    }
    Ok(out)
}

/// `bdr._caught_up`: "" when this node has applied every other node's
/// target, else which one it has not.
pub fn caught_up(targets: &str) -> BdrResult<String> {
    let targets = rules::parse_targets(targets).ok_or_else(|| BdrError::InvalidValue {
        what: "targets",
        msg: format!("\"{targets}\" is not a list of node:lsn"),
    })?;
    let me = crate::pg::user::as_bdr(crate::catalog::local_node)?
        .ok_or(BdrError::NoLocalNode)?
        .node_id;
    let progress = applied_progress()?;
    Ok(
        match rules::lagging(me, &targets, |n| {
            progress.iter().find(|(o, _)| *o == n).map(|(_, l)| *l)
        }) {
            None => String::new(),
            Some((n, None, _)) => format!("it does not receive from node {}", node_name(n)),
            Some((n, Some(have), want)) => format!(
                "it has applied node {}'s changes up to {}, not yet {}",
                node_name(n),
                lsn::format(have),
                lsn::format(want)
            ),
        },
    )
}

/// A lock this transaction holds: the connections that hold it on the
/// peers (closing one lets go there).
struct Held {
    relid: pg_sys::Oid,
    lock_id: i64,
    peers: Vec<Peer>,
}

thread_local! {
    static HELD: RefCell<Vec<Held>> = const { RefCell::new(Vec::new()) };
}

/// A node: `(id, name, dsn)`.
pub(crate) type Member = (u32, String, String);

/// Every member of the group that is not parted: `(id, name, dsn)`, this
/// node first.
pub(crate) fn members() -> BdrResult<(u32, Vec<Member>)> {
    crate::pg::user::as_bdr(|| {
        let local = crate::catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
        let me = crate::catalog::node_by_id(local.node_id)?.ok_or(BdrError::NoLocalNode)?;
        let mut out = vec![(me.node_id, me.node_name, me.node_dsn)];
        for p in crate::catalog::group_peers(&local)? {
            if p.node_state != bdr_core::node::NodeState::Parted {
                out.push((p.node_id, p.node_name, p.node_dsn));
            }
        }
        Ok((local.node_id, out))
    })
}

/// What is left of a `timeout_ms` wait after `waited` ms (at least 1);
/// 0 when there is no timeout.
fn left_ms(timeout_ms: i64, waited: i64) -> i64 {
    if timeout_ms > 0 {
        (timeout_ms - waited).max(1)
    } else {
        0
    }
}

/// A connection to a node for the lock, which fails within `left_ms`.
pub(crate) fn connect(name: &str, dsn: &str, left_ms: i64) -> BdrResult<Peer> {
    let dsn = match bdr_core::dsn::Dsn::parse(dsn) {
        Ok(mut d) => {
            if d.get("connect_timeout").is_none() {
                // libpq counts whole seconds, at least 2.
                d.set(
                    "connect_timeout",
                    &((left_ms / 1000).clamp(2, 30)).to_string(),
                );
            }
            d.to_conninfo()
        }
        Err(_) => dsn.to_string(),
    };
    Peer::connect(name, &dsn, "bdr global lock")
}

fn failed(what: &str, rel: &str, waited: i64, why: String) -> BdrError {
    BdrError::GlobalLock {
        msg: format!("could not acquire the global DML lock on {rel} within {waited} ms: {why}"),
        hint: format!("The global DML lock needs every node of the group up and caught up ({what}); retry when they are, or SET bdr.ddl_locking = off for a statement that may run without it."),
    }
}

/// Takes the global DML lock on `relid` for this transaction (held until
/// it ends), waiting at most `bdr.global_lock_timeout`.
pub fn lock_relation(relid: pg_sys::Oid) -> BdrResult<()> {
    if HELD.with(|h| h.borrow().iter().any(|l| l.relid == relid)) {
        return Ok(());
    }
    // Qualified: peers' connections run with an empty search_path.
    let rel = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname)
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = $1",
        &[relid.into()],
    )?
    .unwrap_or_else(|| relation_name(relid));
    let timeout_ms = crate::guc::get_int(crate::guc::GLOBAL_LOCK_TIMEOUT).max(0) as i64;
    let started = crate::shmem::now();
    let waited = || (crate::shmem::now() - started) / 1000;
    let left = || left_ms(timeout_ms, waited());
    let (me, nodes) = members()?;
    let lock_id = rules::lock_id(me, my_pid(), started);
    register_exit_hook();
    stop_writes_here(relid, me, lock_id, my_pid(), left())?;
    let mut held = Held {
        relid,
        lock_id,
        peers: Vec::new(),
    };
    let r = lock_everywhere(&rel, me, &nodes, lock_id, &mut held, timeout_ms, &waited);
    if let Err(e) = r {
        let pid = my_pid();
        remove(|x| x.lock_id == lock_id && x.owner_pid == pid);
        // Dropping the connections lets go on the peers.
        drop(held);
        return Err(e);
    }
    mark_held(lock_id, my_pid());
    let first = HELD.with(|h| {
        let mut h = h.borrow_mut();
        h.push(held);
        h.len() == 1
    });
    if first {
        register_callbacks();
    }
    crate::globallock::bound_statement_and_idle();
    Ok(())
}

/// Steps 1 and 2 on every other node, then step 3 everywhere.
fn lock_everywhere(
    rel: &str,
    me: u32,
    nodes: &[Member],
    lock_id: i64,
    held: &mut Held,
    timeout_ms: i64,
    waited: &dyn Fn() -> i64,
) -> BdrResult<()> {
    let out_of_time = || timeout_ms > 0 && waited() >= timeout_ms;
    let left = || left_ms(timeout_ms, waited());
    let mut targets = Vec::new();
    // One attempt per node and round, so that a node that is restarting
    // gets another chance while there is time.
    let mut pending: Vec<&Member> = nodes.iter().collect();
    let mut last_err = String::new();
    while !pending.is_empty() {
        let mut still = Vec::new();
        for node in pending {
            let (id, name, dsn) = node;
            let step = connect(name, dsn, left()).and_then(|p| {
                let lsn = if *id == me {
                    p.progress_marker()?
                } else {
                    p.dml_lock_acquire(rel, lock_id, me, left())?
                };
                Ok((p, lsn))
            });
            match step {
                Ok((p, lsn)) => {
                    targets.push((*id, lsn));
                    if *id != me {
                        held.peers.push(p);
                    }
                }
                // A node that is down or restarting gets another chance
                // while there is time; one that refuses fails the lock.
                Err(e @ BdrError::PeerUnreachable { .. }) => {
                    last_err = format!("node \"{name}\": {e}");
                    still.push(node);
                }
                Err(e) => {
                    return Err(failed(
                        "a node refused it",
                        rel,
                        waited(),
                        format!("node \"{name}\": {e}"),
                    ))
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            if out_of_time() {
                return Err(failed("a node did not answer", rel, waited(), last_err));
            }
            crate::pg::latch::wait(None, 200);
        }
    }
    let targets = rules::encode_targets(&targets);
    loop {
        let mut behind =
            caught_up(&targets).map(|b| (!b.is_empty()).then(|| format!("this node: {b}")))?;
        if behind.is_none() {
            for p in &held.peers {
                let b = p.caught_up(&targets)?;
                if !b.is_empty() {
                    behind = Some(format!("node \"{}\": {b}", p.name));
                    break;
                }
            }
        }
        match behind {
            None => return Ok(()),
            Some(why) if out_of_time() => {
                return Err(failed("a node did not catch up", rel, waited(), why))
            }
            Some(_) => crate::pg::latch::wait(None, 20),
        }
    }
}

fn register_callbacks() {
    use pgrx::callbacks::{register_xact_callback, PgXactCallbackEvent};
    register_xact_callback(PgXactCallbackEvent::PreCommit, || {
        // The commit record comes after this point, so it ends after it.
        // SAFETY: reads the WAL insert position.
        let after = unsafe { pg_sys::GetXLogInsertRecPtr() };
        HELD.with(|h| {
            for l in h.borrow().iter() {
                for p in &l.peers {
                    // A peer that lost its connection let go already and
                    // may take writes before it has this DDL.
                    match p.dml_lock_handover(l.lock_id, after) {
                        Ok(true) => {}
                        Ok(false) => BdrError::GlobalLock {
                            msg: format!("node \"{}\" no longer holds the global DML lock", p.name),
                            hint: "Retry the transaction.".into(),
                        }
                        .raise(),
                        Err(e) => e.raise(),
                    }
                }
            }
        });
    });
    let end = || {
        let pid = my_pid();
        let held = HELD.with(|h| std::mem::take(&mut *h.borrow_mut()));
        for l in &held {
            remove(|e| e.lock_id == l.lock_id && e.owner_pid == pid);
        }
        // Closing the connections lets go on the peers of what was not
        // handed over.
        drop(held);
    };
    register_xact_callback(PgXactCallbackEvent::Commit, end);
    register_xact_callback(PgXactCallbackEvent::Abort, end);
    register_xact_callback(PgXactCallbackEvent::PrePrepare, || {
        if HELD.with(|h| !h.borrow().is_empty()) {
            BdrError::GlobalLock {
                msg: "a transaction that holds a global DML lock cannot be prepared".into(),
                hint: "Run the DDL outside the prepared transaction.".into(),
            }
            .raise();
        }
    });
}

/// The DML locks this node's table holds, for `bdr.global_locks`:
/// `(origin node, relation, pid (0 once handed over), acquired)`.
pub fn locks_here() -> Vec<(u32, u32, i32, i64)> {
    if COUNT.get().n.load(Ordering::Acquire) == 0 {
        return vec![];
    }
    let db = my_database();
    let t = LOCKS.share();
    t.e.iter()
        .filter(|e| e.in_use && e.dboid == db)
        .map(|e| (e.origin, e.relid, e.owner_pid, e.acquired_us))
        .collect()
}

/// The manager's round: lets go of locks whose holder is gone — entries
/// of a backend that no longer exists, handed-over ones of a node that was
/// parted or whose later transaction was applied without the writer
/// seeing it (a restart in between).
pub fn reap() {
    if COUNT.get().n.load(Ordering::Acquire) == 0 {
        return;
    }
    let db = my_database();
    let entries: Vec<Entry> = {
        let t = LOCKS.share();
        t.e.iter()
            .filter(|e| e.in_use && e.dboid == db)
            .copied()
            .collect()
    };
    let r = pgrx::bgworkers::BackgroundWorker::transaction(|| -> BdrResult<Vec<i64>> {
        let progress = applied_progress()?;
        let mut gone = Vec::new();
        for e in entries {
            let stale = if e.owner_pid != 0 {
                Spi::get_one_with_args::<bool>(
                    "SELECT NOT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity WHERE pid = $1)",
                    &[e.owner_pid.into()],
                )? == Some(true)
            } else {
                let parted = crate::catalog::node_by_id(e.origin)?
                    .is_none_or(|n| n.node_state == bdr_core::node::NodeState::Parted);
                parted
                    || progress
                        .iter()
                        .any(|(o, l)| *o == e.origin && *l > e.release_after)
            };
            if stale {
                gone.push(e.lock_id);
            }
        }
        Ok(gone)
    });
    match r {
        Ok(gone) => {
            for id in gone {
                if remove(|e| e.lock_id == id && e.dboid == db) > 0 {
                    tracing::info!("released a global DML lock whose holder is gone");
                }
            }
        }
        Err(e) => tracing::warn!("could not check the global DML locks: {e}"),
    }
}
