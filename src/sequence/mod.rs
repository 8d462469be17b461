//! Global sequences: the kind of a sequence (`bdr.alter_sequence_set_kind`,
//! `bdr.default_sequence_kind` for new ones), how the ordinary sequence
//! behind each kind is set up so that every way of taking a value stays
//! unique in the group, the generator of snowflakeid and timeshard values
//! (`generator`), the planner hook that routes `nextval` to it
//! (`planner`) and galloc's chunks (`galloc`).
//!
//! What the sequence itself holds, per kind, on each node:
//! - snowflakeid / timeshard: the generator's durable mark, as a value of
//!   the layout with this node's id and the counter the generator never
//!   issues; its increment is one millisecond of the layout. A plain
//!   `nextval` bdr cannot see (COPY's defaults) still yields values with
//!   this node's id that no other path yields.
//! - galloc: the current chunk as MINVALUE..MAXVALUE, so plain `nextval`
//!   cannot leave it.

pub mod galloc;
pub mod generator;
pub mod planner;

use crate::catalog::sequences::{self as cat, SeqInfo};
use crate::error::{BdrError, BdrResult};
use crate::pg::user::as_bdr;
use bdr_core::quote::literal;
use bdr_core::sequence::{self as layout, Chunk, Kind};
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    static INTERNAL: Cell<bool> = const { Cell::new(false) };
    /// Relations created since the last utility statement ended (the
    /// object access hook notes them): the sequences among them are the
    /// ones a statement created.
    static CREATED: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

static mut PREV_OBJECT_ACCESS: pg_sys::object_access_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster before any backend exists.
    unsafe {
        PREV_OBJECT_ACCESS = pg_sys::object_access_hook;
        pg_sys::object_access_hook = Some(object_access);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn object_access(
    access: pg_sys::ObjectAccessType::Type,
    class_id: pg_sys::Oid,
    object_id: pg_sys::Oid,
    sub_id: std::ffi::c_int,
    arg: *mut std::ffi::c_void,
) {
    if access == pg_sys::ObjectAccessType::OAT_POST_CREATE
        && class_id == pg_sys::RelationRelationId
        && sub_id == 0
    {
        CREATED.with(|c| c.borrow_mut().push(object_id.to_u32()));
    }
    // SAFETY: the previous hook with the arguments we were given.
    unsafe {
        if let Some(prev) = PREV_OBJECT_ACCESS {
            prev(access, class_id, object_id, sub_id, arg);
        }
    }
}

/// Resets the flag when bdr's own statement ends, also by an ERROR (which
/// unwinds through here as a panic).
struct Internal(bool);

impl Drop for Internal {
    fn drop(&mut self) {
        INTERNAL.with(|c| c.set(self.0));
    }
}

/// Whether bdr itself is running the statement (its ALTER SEQUENCE of a
/// global sequence): not to be captured as DDL or refused.
pub fn is_internal() -> bool {
    INTERNAL.with(|c| c.get())
}

fn internally<R>(f: impl FnOnce() -> R) -> R {
    let _restore = Internal(INTERNAL.with(|c| c.replace(true)));
    f()
}

/// Runs one ALTER SEQUENCE (or setval) of bdr's own on a global sequence.
fn run_internal(sql: &str) -> BdrResult<()> {
    internally(|| as_bdr(|| Spi::run(sql)))?;
    Ok(())
}

/// The local node's sequence id, checked against the layouts.
pub fn node_seq_id() -> BdrResult<i64> {
    let id = as_bdr(cat::local_seq_id)?;
    layout::check_node_seq_id(id).map_err(|msg| BdrError::Prerequisite {
        msg: format!("the local node cannot take values of a global sequence: {msg}"),
        hint: "A node gets its sequence id when it creates or joins a group; see bdr.node_summary.node_seq_id.".into(),
    })?;
    Ok(id)
}

/// The clock in milliseconds since 1970 (the layouts' unit).
fn now_ms() -> i64 {
    crate::shmem::now() / 1000 + bdr_core::time::PG_EPOCH_UNIX_SECONDS * 1000
}

/// Once this transaction commits (a node created a group, joined one or
/// was dropped), the generator reads the node's sequence id again.
pub fn node_changed_at_commit() {
    // SAFETY: MyDatabaseId is set for the life of a connected backend.
    let db = unsafe { pg_sys::MyDatabaseId.to_u32() };
    pgrx::callbacks::register_xact_callback(
        pgrx::callbacks::PgXactCallbackEvent::Commit,
        move || generator::forget_database(db),
    );
}

/// Sets up the sequence behind `kind` on this node. `chunk`: galloc's
/// current chunk, `None` before this node holds one (every `nextval` fails
/// until the manager installs one).
fn configure(
    info: &SeqInfo,
    kind: Kind,
    node: i64,
    chunk: Option<Chunk>,
    start: Option<i64>,
) -> BdrResult<()> {
    let rc = &info.regclass;
    let sql = match kind {
        Kind::Local => {
            let next = if info.is_called {
                info.last_value.saturating_add(1)
            } else {
                info.last_value
            };
            let restart = start.unwrap_or(next.max(1));
            format!(
                "ALTER SEQUENCE {rc} INCREMENT BY 1 NO MINVALUE NO MAXVALUE START WITH 1 RESTART WITH {restart}"
            )
        }
        Kind::Snowflakeid | Kind::Timeshard => {
            let ms = now_ms() + layout::FLOOR_AHEAD_MS;
            let (v, tick) = if kind == Kind::Snowflakeid {
                (
                    layout::snowflake_compose(ms, node, layout::FALLBACK_COUNTER),
                    layout::SNOWFLAKE_TICK,
                )
            } else {
                (
                    layout::timeshard_compose(ms, node, layout::TIMESHARD_FALLBACK_COUNTER),
                    layout::TIMESHARD_TICK,
                )
            };
            generator::forget(info.oid);
            // START is the same on every node (the schema compares equal);
            // RESTART, which is this node's own, is the value.
            format!(
                "ALTER SEQUENCE {rc} INCREMENT BY {tick} MINVALUE 1 NO MAXVALUE NO CYCLE START WITH 1 RESTART WITH {v}"
            )
        }
        Kind::Galloc => match chunk {
            Some(c) => format!(
                "ALTER SEQUENCE {rc} NO CYCLE MINVALUE {a} MAXVALUE {b} START WITH {a} RESTART WITH {a}",
                a = c.start,
                b = c.end
            ),
            None => {
                // A range of two values whose last is taken: nextval fails
                // until a chunk is installed.
                let m = -info.ty.max_value();
                run_internal(&format!(
                    "ALTER SEQUENCE {rc} NO CYCLE MINVALUE {m} MAXVALUE {n} START WITH {m} RESTART WITH {n}",
                    n = m + 1
                ))?;
                format!("SELECT pg_catalog.setval('{}', {}, true)", rc.replace('\'', "''"), m + 1)
            }
        },
    };
    run_internal(&sql)
}

/// `bdr.alter_sequence_set_kind`: makes `seqid` of `kind_name` on this
/// node and, where this session's DDL goes to the group, on every node.
pub fn alter_sequence_set_kind(seqid: u32, kind_name: &str, start: Option<i64>) -> BdrResult<()> {
    let info = as_bdr(|| cat::seq_info(seqid))?;
    // SAFETY: a catalog lookup of a relation that exists (seq_info found it).
    let owner =
        unsafe { pg_sys::pg_class_ownercheck(pg_sys::Oid::from(seqid), pg_sys::GetUserId()) };
    if !owner {
        return Err(BdrError::NotOwner(format!("sequence {}", info.regclass)));
    }
    let kind = Kind::parse(kind_name, info.ty).map_err(|msg| BdrError::Sequence {
        msg,
        hint: "Use one of local, snowflakeid, timeshard, galloc or distributed.".into(),
    })?;
    kind.fits(info.ty).map_err(|msg| BdrError::Sequence {
        msg: format!("sequence {}: {msg}", info.regclass),
        hint: "Use galloc for integer and smallint sequences, or change the sequence's type with ALTER SEQUENCE ... AS bigint first.".into(),
    })?;
    if info.persistence != 'p' && kind != Kind::Local {
        return Err(BdrError::Sequence {
            msg: format!("sequence {} is not logged; a global sequence must be", info.regclass),
            hint: "An unlogged sequence starts over after a crash and would hand out its values again; make it logged with ALTER SEQUENCE ... SET LOGGED first.".into(),
        });
    }
    let how = if crate::hlc::is_exempt() {
        How::Replaying
    } else {
        How::Origin
    };
    set_kind(seqid, &info, kind, start, how)
}

/// Where a sequence gets its kind.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// A session's own statement: galloc takes its chunks now, and the
    /// statement goes to the group (where DDL does).
    Origin,
    /// A writer replaying the origin's statement, or a join copying the
    /// group's kinds: the manager fetches galloc chunks after commit.
    Replaying,
}

fn set_kind(seqid: u32, info: &SeqInfo, kind: Kind, start: Option<i64>, how: How) -> BdrResult<()> {
    let replaying = how == How::Replaying;
    let mut info = info.clone();
    let previous = as_bdr(|| cat::kind_of(seqid))?.map(|r| r.kind);
    if kind == Kind::Galloc && previous.is_some_and(|k| k.generated()) {
        // A snowflakeid's increment is one millisecond of its layout.
        run_internal(&format!("ALTER SEQUENCE {} INCREMENT BY 1", info.regclass))?;
        info.increment = 1;
    }
    let info = &info;
    let node = if kind == Kind::Local {
        0
    } else {
        node_seq_id()?
    };
    if kind != Kind::Local && info.increment < 1 {
        return Err(BdrError::Sequence {
            msg: format!(
                "sequence {} descends; a global sequence must ascend",
                info.regclass
            ),
            hint: "Give it a positive INCREMENT with ALTER SEQUENCE first.".into(),
        });
    }
    let mut start = start;
    if kind == Kind::Galloc {
        if info.increment >= info.ty.chunk_size() {
            return Err(BdrError::Sequence {
                msg: format!(
                    "sequence {}: INCREMENT {} is not below the galloc chunk size {}",
                    info.regclass,
                    info.increment,
                    info.ty.chunk_size()
                ),
                hint: "Lower the sequence's INCREMENT with ALTER SEQUENCE first.".into(),
            });
        }
        // The group starts where this node's sequence is (peers replay the
        // origin's value): pass the largest value any node handed out.
        let next = if info.is_called {
            info.last_value.saturating_add(info.increment)
        } else {
            info.last_value
        };
        start = Some(start.unwrap_or(next).max(1));
    }
    configure(info, kind, node, None, start)?;
    as_bdr(|| cat::set_kind(seqid, kind, start, &info.qualified))?;
    if kind == Kind::Galloc {
        if replaying {
            // A writer does not wait for the group's consensus: this
            // node's manager fetches the chunks once this commits.
            crate::shmem::wake_workers_at_commit();
        } else {
            galloc::take_chunks_now(info, start.unwrap_or(1))?;
        }
    }
    // Only where the statement that created the sequence went to the group.
    if !replaying && crate::ddl::in_group() && crate::guc::get_bool(crate::guc::DDL_REPLICATION) {
        crate::globallock::ddl_lock_for(&format!(
            "bdr.alter_sequence_set_kind({})",
            info.regclass
        ))?;
        let start = start
            .map(|s| s.to_string())
            .unwrap_or_else(|| "NULL".into());
        crate::ddl::queue_statement(format!(
            "SELECT bdr.alter_sequence_set_kind({}::regclass, {}, {start})",
            literal(&info.qualified),
            literal(kind.name())
        ));
    }
    Ok(())
}

/// At the end of a join: every sequence the target has of a global kind,
/// if it exists here, gets that kind (galloc: the group's allocation, its
/// chunks fetched by the manager once the join commits).
pub fn copy_kinds(seqs: &[crate::peer::GlobalSeq]) -> BdrResult<()> {
    for g in seqs {
        let Some(kind) = Kind::from_code(&g.kind) else {
            continue;
        };
        let oid = as_bdr(|| {
            Spi::get_one_with_args::<pg_sys::Oid>(
                "SELECT pg_catalog.to_regclass($1)::oid",
                &[g.name.as_str().into()],
            )
        })?;
        let Some(oid) = oid.map(|o| o.to_u32()).filter(|o| *o != 0) else {
            continue;
        };
        let mut info = as_bdr(|| cat::seq_info(oid))?;
        if let Some(key) = &g.alloc_key {
            info.qualified = key.clone();
        }
        set_kind(oid, &info, kind, g.start, How::Replaying)?;
    }
    Ok(())
}

/// After a utility statement: sequences it created get
/// `bdr.default_sequence_kind` (a session's own statements in a group;
/// writers get the origin's choice by its replicated
/// `bdr.alter_sequence_set_kind`), and the kinds of dropped ones are
/// forgotten.
///
/// # Safety
/// `pstmt` is the utility hook's statement, which has just run.
pub unsafe fn after_utility(pstmt: *mut pg_sys::PlannedStmt, outermost: bool) {
    // SAFETY: the caller upholds this function's contract.
    let tag = unsafe {
        let stmt = (*pstmt).utilityStmt;
        if stmt.is_null() {
            return;
        }
        (*stmt).type_
    };
    // Statements inside another (a serial column's sequence, the
    // triggers bdr adds to a new table, DDL in a DO block) leave what they
    // created for the outermost one, whose own entry in the queue comes
    // after theirs.
    let created: Vec<u32> = if outermost {
        CREATED.with(|c| std::mem::take(&mut *c.borrow_mut()))
    } else {
        Vec::new()
    };
    let drops = matches!(
        tag,
        pg_sys::NodeTag::T_DropStmt | pg_sys::NodeTag::T_DropOwnedStmt
    );
    if !drops && created.is_empty() {
        return;
    }
    // SAFETY: a catalog lookup by name in a connected backend.
    if unsafe { pg_sys::get_extension_oid(c"bdr".as_ptr(), true) } == pg_sys::InvalidOid {
        return;
    }
    let r = if drops {
        as_bdr(cat::purge_dropped)
    } else {
        // SAFETY: reads a backend-global flag.
        let extension_script = unsafe { pg_sys::creating_extension };
        if crate::hlc::is_exempt() || extension_script || is_internal() || !crate::ddl::in_group() {
            return;
        }
        apply_default_kind(&created)
    };
    if let Err(e) = r {
        e.raise();
    }
}

fn apply_default_kind(created: &[u32]) -> BdrResult<()> {
    let setting = crate::guc::get_enum(crate::guc::DEFAULT_SEQUENCE_KIND);
    for seqid in as_bdr(|| cat::new_logged_sequences(created))? {
        let info = as_bdr(|| cat::seq_info(seqid))?;
        let kind = Kind::parse(setting, info.ty).map_err(|msg| BdrError::InvalidValue {
            what: "bdr.default_sequence_kind",
            msg,
        })?;
        if kind.fits(info.ty).is_err() {
            return Err(BdrError::Sequence {
                msg: format!(
                    "bdr.default_sequence_kind is {setting}, which needs bigint, but sequence {} is {}",
                    info.regclass,
                    info.ty.name()
                ),
                hint: "Use a bigint column (bigserial), or set bdr.default_sequence_kind to distributed or galloc.".into(),
            });
        }
        if kind == Kind::Local {
            as_bdr(|| cat::set_kind(seqid, Kind::Local, None, &info.qualified))?;
            continue;
        }
        set_kind(seqid, &info, kind, None, How::Origin)?;
    }
    Ok(())
}

/// Before a utility statement: refuses what would break a global
/// sequence: changing its numbers with ALTER SEQUENCE (its range and
/// increment are bdr's).
///
/// # Safety
/// The utility hook's statement, before it runs.
pub unsafe fn before_utility(pstmt: *mut pg_sys::PlannedStmt) {
    if is_internal() {
        return;
    }
    // SAFETY: the caller upholds this function's contract.
    unsafe { refuse_restart_identity((*pstmt).utilityStmt) };
    // SAFETY: the caller upholds this function's contract.
    unsafe { refuse_unlogged((*pstmt).utilityStmt) };
    // SAFETY: the caller upholds this function's contract.
    let seqid = unsafe {
        let stmt = (*pstmt).utilityStmt;
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_AlterSeqStmt {
            return;
        }
        let alter = stmt as *mut pg_sys::AlterSeqStmt;
        let options = pgrx::PgList::<pg_sys::DefElem>::from_pg((*alter).options);
        let numeric = options.iter_ptr().any(|d| {
            let name = std::ffi::CStr::from_ptr((*d).defname).to_bytes();
            name != b"owned_by"
        });
        if !numeric || pg_sys::get_extension_oid(c"bdr".as_ptr(), true) == pg_sys::InvalidOid {
            return;
        }
        crate::ddl::existing_relid((*alter).sequence)
    };
    refuse_if_global(
        seqid,
        |k| format!("cannot change the numbers of a {} sequence by ALTER SEQUENCE", k.name()),
        "bdr sets its range and increment; convert it with bdr.alter_sequence_set_kind(seq, 'local') first, or pass a new start to bdr.alter_sequence_set_kind.",
    );
}

/// Raises `what` if `seqid` is a global sequence.
fn refuse_if_global(seqid: pg_sys::Oid, what: impl Fn(Kind) -> String, hint: &str) {
    if seqid == pg_sys::InvalidOid {
        return;
    }
    if let Some(k) = planner::kind_of(seqid.to_u32()).filter(|k| *k != Kind::Local) {
        BdrError::Sequence {
            msg: format!("{} (sequence oid {})", what(k), seqid.to_u32()),
            hint: hint.into(),
        }
        .raise();
    }
}

/// `ALTER SEQUENCE ... SET UNLOGGED` of a global sequence: an unlogged
/// sequence starts over after a crash, to hand its values out again.
///
/// # Safety
/// `stmt` is the utility hook's statement, before it runs.
unsafe fn refuse_unlogged(stmt: *mut pg_sys::Node) {
    // SAFETY: the caller upholds this function's contract.
    let seqid = unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_AlterTableStmt {
            return;
        }
        let a = stmt as *mut pg_sys::AlterTableStmt;
        let cmds = pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*a).cmds);
        if !cmds
            .iter_ptr()
            .any(|c| (*c).subtype == pg_sys::AlterTableType::AT_SetUnLogged)
            || pg_sys::get_extension_oid(c"bdr".as_ptr(), true) == pg_sys::InvalidOid
        {
            return;
        }
        crate::ddl::existing_relid((*a).relation)
    };
    refuse_if_global(
        seqid,
        |k| format!("a {} sequence cannot be made unlogged", k.name()),
        "An unlogged sequence starts over after a crash and would hand out its values again; convert it with bdr.alter_sequence_set_kind(seq, 'local') first.",
    );
}

/// `TRUNCATE ... RESTART IDENTITY` would set a global sequence back to
/// its start (a snowflakeid to the epoch, a galloc one to the start of its
/// chunk), to hand its values out again.
///
/// # Safety
/// `stmt` is the utility hook's statement, before it runs.
unsafe fn refuse_restart_identity(stmt: *mut pg_sys::Node) {
    // SAFETY: the caller upholds this function's contract.
    let rels: Vec<u32> = unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_TruncateStmt {
            return;
        }
        let t = stmt as *mut pg_sys::TruncateStmt;
        if !(*t).restart_seqs
            || pg_sys::get_extension_oid(c"bdr".as_ptr(), true) == pg_sys::InvalidOid
        {
            return;
        }
        pgrx::PgList::<pg_sys::RangeVar>::from_pg((*t).relations)
            .iter_ptr()
            .map(|rv| crate::ddl::existing_relid(rv).to_u32())
            .filter(|o| *o != 0)
            .collect()
    };
    match as_bdr(|| cat::global_sequences_of(&rels)) {
        Ok(seqs) if seqs.is_empty() => {}
        Ok(seqs) => BdrError::Sequence {
            msg: format!(
                "TRUNCATE ... RESTART IDENTITY would restart global sequence {}",
                seqs.join(", ")
            ),
            hint: "Truncate without RESTART IDENTITY (CONTINUE IDENTITY): a global sequence must not hand out its values again.".into(),
        }
        .raise(),
        Err(e) => e.raise(),
    }
}
