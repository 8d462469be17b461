//! Global locks on the group's consensus: the DDL lock that
//! `bdr.ddl_locking = on` takes for every statement that replicates (one
//! DDL transaction in the group at a time) and advisory locks
//! (`bdr.global_advisory_lock`). A lock is a key of the consensus
//! key-value store, set by compare-and-set when absent, so a majority
//! decides who holds it; its value names the holder.
//!
//! A lock is let go when its transaction (DDL) or session (advisory) ends,
//! by a request that nobody waits for; whatever that misses (a crash, a
//! node cut off, a node parted) the manager of the holder's node, or of
//! any node once the holder is parted, lets go when it sees the holder's
//! transaction or session is gone.

use crate::consensus;
use crate::error::{BdrError, BdrResult};
use bdr_core::consensus::{Command, Request};
use pgrx::prelude::*;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// The prefix of every lock's key in the consensus store.
pub const PREFIX: &str = "bdr.global_lock.";
const DDL_KEY: &str = "bdr.global_lock.ddl";
/// The longest one attempt to take a lock waits for the group's answer.
const ATTEMPT_MS: i64 = 3000;

/// Who holds a lock, as the lock's value says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Holder {
    pub node_id: u32,
    pub node_name: String,
    pub pid: i32,
    /// The backend's start, to tell a pid used again.
    pub backend_start_us: i64,
    /// The holding transaction (DDL lock); 0 for a session's lock.
    pub xid: u64,
    pub lock_type: String,
    pub acquired_us: i64,
    pub statement: String,
}

thread_local! {
    /// The DDL lock this transaction holds, as its stored value.
    static DDL_HELD: RefCell<Option<String>> = const { RefCell::new(None) };
    /// Advisory locks this session holds: (key, stored value).
    static ADVISORY_HELD: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
    static EXIT_HOOK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn me(lock_type: &str, xid: u64, statement: &str) -> BdrResult<Holder> {
    let local =
        crate::pg::user::as_bdr(crate::catalog::local_node)?.ok_or(BdrError::NoLocalNode)?;
    // SAFETY: backend-global values set for every connected backend.
    let (pid, start) = unsafe { (pg_sys::MyProcPid, pg_sys::MyStartTimestamp) };
    let mut statement = statement.to_string();
    if statement.len() > 200 {
        let mut cut = 200;
        while !statement.is_char_boundary(cut) {
            cut -= 1;
        }
        statement.truncate(cut);
    }
    Ok(Holder {
        node_id: local.node_id,
        node_name: local.node_name,
        pid,
        backend_start_us: start,
        xid,
        lock_type: lock_type.to_string(),
        acquired_us: crate::shmem::now(),
        statement,
    })
}

fn lock_timeout(holder: &Holder, what: &str, waited_ms: i64) -> BdrError {
    BdrError::GlobalLock {
        msg: format!(
            "could not acquire the global {what} within {waited_ms} ms: it is held by node \"{}\" (pid {}, {})",
            holder.node_name, holder.pid, holder.statement
        ),
        hint: "Retry when that transaction or session has ended; if the node is down, its lock is let go when it comes back or when it is parted (bdr.global_locks shows the holder).".into(),
    }
}

/// `bdr.predictive_checks`: before asking the group, whether this node
/// sees a leader it could reach a majority through.
fn predictive_check(what: &str) -> BdrResult<()> {
    let s = consensus::status();
    if s.running && s.raft.leader != 0 {
        return Ok(());
    }
    let msg = format!(
        "global {what}: this node's consensus knows no leader, so a majority is unlikely to answer"
    );
    match crate::guc::get_enum(crate::guc::PREDICTIVE_CHECKS) {
        "error" => Err(BdrError::GlobalLock {
            msg,
            hint: "bdr.predictive_checks is error: check bdr.monitor_group_raft() and the nodes that are down.".into(),
        }),
        "warning" => {
            warning!("{msg}");
            Ok(())
        }
        "log" => {
            log!("{msg}");
            Ok(())
        }
        _ => {
            debug1!("{msg}");
            Ok(())
        }
    }
}

/// Takes lock `key` for `holder`, waiting up to `bdr.global_lock_timeout`
/// while another holds it; returns the stored value.
fn acquire(key: &str, holder: &Holder, what: &str) -> BdrResult<String> {
    predictive_check(what)?;
    let value = serde_json::to_string(holder).unwrap_or_default();
    let timeout_ms = crate::guc::get_int(crate::guc::GLOBAL_LOCK_TIMEOUT).max(0) as i64;
    let started = crate::shmem::now();
    loop {
        let cmd = take(key, &value);
        let waited = (crate::shmem::now() - started) / 1000;
        let response_ms = crate::guc::get_int(crate::guc::RAFT_RESPONSE_TIMEOUT).max(0) as i64;
        let attempt_ms = response_ms.min(ATTEMPT_MS);
        let a = match consensus::submit_within(
            &cmd,
            &format!("acquiring the global {what}"),
            attempt_ms,
        ) {
            Ok(a) => a,
            // A lost proposal (the leader changed): try again while there
            // is time; a late one that takes effect is ours (see below).
            // Without a majority this gives up after bdr.raft_response_timeout.
            Err(BdrError::OutcomeUnknown { .. } | BdrError::NoMajority { .. })
                if waited + attempt_ms <= response_ms =>
            {
                crate::pg::latch::wait(None, 100);
                pgrx::check_for_interrupts!();
                continue;
            }
            Err(e) => {
                // A proposal that still takes effect later is let go.
                release_detached(key, &value);
                return Err(e);
            }
        };
        if a.ok {
            return Ok(value);
        }
        let current: Option<Holder> = a
            .value
            .as_deref()
            .and_then(|v| serde_json::from_str(v).ok());
        let waited = (crate::shmem::now() - started) / 1000;
        match current {
            Some(h)
                if h.node_id == holder.node_id
                    && h.pid == holder.pid
                    && h.backend_start_us == holder.backend_start_us
                    && h.xid == holder.xid =>
            {
                return Ok(a.value.unwrap_or_default());
            }
            // 0: no timeout (statement_timeout still ends the wait).
            Some(h) if timeout_ms > 0 && waited >= timeout_ms => {
                return Err(lock_timeout(&h, what, waited))
            }
            None if timeout_ms > 0 && waited >= timeout_ms => {
                return Err(BdrError::GlobalLock {
                    msg: format!("could not acquire the global {what} within {waited} ms"),
                    hint: "See bdr.global_locks.".into(),
                })
            }
            _ => {}
        }
        let left = if timeout_ms > 0 {
            timeout_ms - waited
        } else {
            200
        };
        crate::pg::latch::wait(None, left.clamp(1, 200));
        pgrx::check_for_interrupts!();
    }
}

/// The request that takes lock `key` for `value` if nobody holds it.
fn take(key: &str, value: &str) -> Request {
    Request::Command(Command::KvStore {
        key: key.to_string(),
        value: Some(value.to_string()),
        prev: Some(None),
        ttl_ms: None,
        now_us: crate::shmem::now(),
    })
}

/// The request that lets lock `key` go if it still holds `value`.
fn let_go(key: &str, value: &str) -> Request {
    Request::Command(Command::KvStore {
        key: key.to_string(),
        value: None,
        prev: Some(Some(value.to_string())),
        ttl_ms: None,
        now_us: crate::shmem::now(),
    })
}

/// Lets lock `key` go if it still holds `value`, without waiting.
fn release_detached(key: &str, value: &str) {
    if let Err(e) = consensus::submit_detached(&let_go(key, value), "releasing a global lock") {
        // The manager lets it go once it sees the holder is gone.
        tracing::warn!("could not release global lock {key} now: {e}");
    }
}

/// `bdr.ddl_locking = on`: the global DDL lock for this transaction,
/// before a statement that replicates runs.
pub fn ddl_lock_for(statement: &str) -> BdrResult<()> {
    if !wants_ddl_lock() || DDL_HELD.with(|h| h.borrow().is_some()) {
        return Ok(());
    }
    // SAFETY: assigns (or reads) this transaction's id; a DDL statement is
    // about to take one anyway.
    let xid = unsafe { pg_sys::GetTopFullTransactionId().value };
    let holder = me("ddl", xid, statement)?;
    let value = acquire(DDL_KEY, &holder, "DDL lock")?;
    DDL_HELD.with(|h| *h.borrow_mut() = Some(value));
    bound_statement_and_idle();
    for event in [
        pgrx::callbacks::PgXactCallbackEvent::Commit,
        pgrx::callbacks::PgXactCallbackEvent::Abort,
    ] {
        pgrx::callbacks::register_xact_callback(event, || {
            if let Some(v) = DDL_HELD.with(|h| h.borrow_mut().take()) {
                release_detached(DDL_KEY, &v);
            }
        });
    }
    // A prepared transaction would outlive its backend, which is how the
    // manager tells a lock is stale.
    pgrx::callbacks::register_xact_callback(
        pgrx::callbacks::PgXactCallbackEvent::PrePrepare,
        || {
            if DDL_HELD.with(|h| h.borrow().is_some()) {
                BdrError::GlobalLock {
                msg: "a transaction that holds the global DDL lock cannot be prepared".into(),
                hint: "Run the DDL outside the prepared transaction, or SET bdr.ddl_locking = off for it.".into(),
            }
            .raise();
            }
        },
    );
    Ok(())
}

/// `bdr.ddl_locking = on`: every statement that replicates takes the DDL
/// lock (`dml` and `off` do not).
fn wants_ddl_lock() -> bool {
    crate::guc::get_enum(crate::guc::DDL_LOCKING) == "on"
}

/// Whether a statement that needs the global DML lock takes it: with
/// `bdr.ddl_locking` `on` or `dml`; `off` skips it with a WARNING naming
/// the statement, as BDR 4 does.
pub fn wants_dml_lock(statement: &str) -> bool {
    if crate::guc::get_enum(crate::guc::DDL_LOCKING) == "off" {
        warning!("bdr.ddl_locking is off: skipping the global DML lock this statement needs: {statement}");
        return false;
    }
    true
}

thread_local! {
    /// The DDL lock held for one statement that commits on its own
    /// (CREATE INDEX CONCURRENTLY): let go when the statement returns.
    static STATEMENT_HELD: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// The DDL lock for a statement that commits transactions of its own
/// (the CONCURRENTLY ones): held by the session until the statement ends
/// (`release_statement_lock`), not by a transaction.
pub fn ddl_lock_for_statement(statement: &str) -> BdrResult<()> {
    if !wants_ddl_lock()
        || DDL_HELD.with(|h| h.borrow().is_some())
        || STATEMENT_HELD.with(|h| h.borrow().is_some())
    {
        return Ok(());
    }
    let holder = me("ddl", 0, statement)?;
    let value = acquire(DDL_KEY, &holder, "DDL lock")?;
    register_exit_hook();
    STATEMENT_HELD.with(|h| *h.borrow_mut() = Some(value));
    Ok(())
}

/// After a utility statement, also one that failed: lets go of the lock
/// `ddl_lock_for_statement` took.
pub fn release_statement_lock() {
    if let Some(v) = STATEMENT_HELD.with(|h| h.borrow_mut().take()) {
        release_detached(DDL_KEY, &v);
    }
}

fn register_exit_hook() {
    if !EXIT_HOOK.with(|c| c.replace(true)) {
        // SAFETY: registers a callback for this backend's exit, once.
        unsafe { pg_sys::before_shmem_exit(Some(release_at_exit), pg_sys::Datum::from(0)) };
    }
}

fn advisory_key(k1: i64, k2: Option<i32>) -> String {
    match k2 {
        Some(k2) => format!("{PREFIX}advisory.{k1}.{k2}"),
        None => format!("{PREFIX}advisory.{k1}"),
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn release_at_exit(_code: i32, _arg: pg_sys::Datum) {
    let held = ADVISORY_HELD.with(|h| std::mem::take(&mut *h.borrow_mut()));
    for (k, v) in held {
        release_detached(&k, &v);
    }
    release_statement_lock();
}

/// `bdr.global_advisory_lock`: a session-level lock of the group.
pub fn advisory_lock(k1: i64, k2: Option<i32>) -> BdrResult<()> {
    let key = advisory_key(k1, k2);
    if ADVISORY_HELD.with(|h| h.borrow().iter().any(|(k, _)| *k == key)) {
        return Ok(());
    }
    let name = key.trim_start_matches(PREFIX).to_string();
    let holder = me("advisory", 0, &name)?;
    let value = acquire(&key, &holder, &format!("advisory lock {name}"))?;
    register_exit_hook();
    ADVISORY_HELD.with(|h| h.borrow_mut().push((key, value)));
    Ok(())
}

/// `bdr.global_advisory_unlock`: whether this session held the lock.
pub fn advisory_unlock(k1: i64, k2: Option<i32>) -> BdrResult<bool> {
    let key = advisory_key(k1, k2);
    let held = ADVISORY_HELD.with(|h| h.borrow().iter().find(|(k, _)| *k == key).cloned());
    let Some((k, v)) = held else {
        return Ok(false);
    };
    // Still this session's (and let go at its end) if this fails.
    consensus::submit(&let_go(&k, &v), "releasing a global advisory lock")?;
    ADVISORY_HELD.with(|h| h.borrow_mut().retain(|(hk, _)| *hk != k));
    Ok(true)
}

/// Every global lock as this node's copy of the consensus state holds it.
pub fn locks() -> BdrResult<Vec<(String, String, Holder)>> {
    let state = consensus::applied_state()?;
    Ok(state
        .entries(crate::shmem::now())
        .into_iter()
        .filter(|(k, _)| k.starts_with(PREFIX))
        .filter_map(|(k, v)| serde_json::from_str::<Holder>(&v).ok().map(|h| (k, v, h)))
        .collect())
}

/// The manager's round: lets go of locks whose holder is gone — held by
/// this node for a transaction or session that ended, or by a node that
/// was parted.
pub fn reap(my_node: u32) {
    let stale = pgrx::bgworkers::BackgroundWorker::transaction(
        || -> Result<Vec<(String, String)>, String> {
            let mut out = Vec::new();
            for (key, value, h) in locks().map_err(|e| e.to_string())? {
                let gone = if h.node_id == my_node {
                    holder_gone(&h).map_err(|e| e.to_string())?
                } else {
                    // A node this one does not know yet is not gone.
                    crate::catalog::node_by_id(h.node_id)
                        .map_err(|e| e.to_string())?
                        .is_some_and(|n| n.node_state == bdr_core::node::NodeState::Parted)
                };
                if gone {
                    out.push((key, value));
                }
            }
            Ok(out)
        },
    );
    let stale = match stale {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("could not read the global locks: {e}");
            return;
        }
    };
    for (key, value) in stale {
        // Only if it is still that holder's (compare-and-set).
        match consensus::submit(&let_go(&key, &value), "releasing a stale global lock") {
            Ok(a) if a.ok => tracing::info!("released global lock {key} of a holder that is gone"),
            Ok(_) => {}
            Err(e) => tracing::warn!("could not release stale global lock {key}: {e}"),
        }
    }
}

/// Whether this node's holder (a backend, and for the DDL lock its
/// transaction) no longer exists.
fn holder_gone(h: &Holder) -> BdrResult<bool> {
    // The backend first: after a crash the holder's xid may not have been
    // handed out again yet (pg_xact_status calls it "in the future"), or
    // be another transaction's.
    let alive = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity
                         WHERE pid = $1 AND backend_start = bdr._ts($2))",
        &[h.pid.into(), h.backend_start_us.into()],
    )?;
    if alive != Some(true) {
        return Ok(true);
    }
    if h.xid == 0 {
        return Ok(false);
    }
    let xid = h.xid.to_string();
    let status = crate::pg::xact::in_subtransaction(|| {
        Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.pg_xact_status($1::text::xid8)",
            &[xid.as_str().into()],
        )
    });
    Ok(matches!(status, Ok(Ok(Some(ref s))) if s != "in progress"))
}

extern "C" {
    // utils/timeout.h; not in pgrx's bindings. TimeoutId is a C enum (int).
    fn enable_timeout_after(id: std::ffi::c_int, delay_ms: std::ffi::c_int);
}
/// `STATEMENT_TIMEOUT` of PostgreSQL 15's `TimeoutId`.
const STATEMENT_TIMEOUT_ID: std::ffi::c_int = 3;

/// A transaction that holds a global lock: its statements may run at most
/// `bdr.global_lock_statement_timeout` (this one counted from now) and it
/// may sit idle at most `bdr.global_lock_idle_timeout`, by lowering
/// PostgreSQL's own `statement_timeout` and
/// `idle_in_transaction_session_timeout` for the transaction.
pub fn bound_statement_and_idle() {
    let statement_ms = crate::guc::get_int(crate::guc::GLOBAL_LOCK_STATEMENT_TIMEOUT);
    let idle_ms = crate::guc::get_int(crate::guc::GLOBAL_LOCK_IDLE_TIMEOUT);
    // SAFETY: reads the settings' current values.
    let (statement_now, idle_now) = unsafe {
        (
            pg_sys::StatementTimeout,
            pg_sys::IdleInTransactionSessionTimeout,
        )
    };
    let lower = |now: i32, want: i32| want > 0 && (now == 0 || now > want);
    let set = |name: &str, ms: i32| {
        let r = Spi::run_with_args(
            "SELECT pg_catalog.set_config($1, $2, true)",
            &[name.into(), format!("{ms}ms").into()],
        );
        if let Err(e) = r {
            warning!("could not bound {name} for a transaction holding a global lock: {e}");
        }
    };
    if lower(statement_now, statement_ms) {
        set("statement_timeout", statement_ms);
        // SAFETY: restarts this statement's timer, as PostgreSQL does at
        // each statement's start; the handler is the backend's own.
        unsafe { enable_timeout_after(STATEMENT_TIMEOUT_ID, statement_ms) };
    }
    if lower(idle_now, idle_ms) {
        set("idle_in_transaction_session_timeout", idle_ms);
    }
}
