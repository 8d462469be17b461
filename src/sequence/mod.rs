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
use bdr_core::sequence::{self as layout, Chunk, Kind, SeqType};
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    static INTERNAL: Cell<bool> = const { Cell::new(false) };
}

/// Whether bdr itself is running the statement (its ALTER SEQUENCE of a
/// global sequence): not to be captured as DDL or refused.
pub fn is_internal() -> bool {
    INTERNAL.with(|c| c.get())
}

fn internally<R>(f: impl FnOnce() -> R) -> R {
    let was = INTERNAL.with(|c| c.replace(true));
    let r = f();
    INTERNAL.with(|c| c.set(was));
    r
}

/// Runs one ALTER SEQUENCE (or setval) of bdr's own on a global sequence.
fn run_internal(sql: &str) -> BdrResult<()> {
    // An ERROR aborts the transaction, and with it the flag's meaning.
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

fn now_ms() -> i64 {
    // µs since 2000-01-01 to ms since 1970.
    crate::shmem::now() / 1000 + 946_684_800_000
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
            generator::forget(info_oid(info)?);
            format!(
                "ALTER SEQUENCE {rc} INCREMENT BY {tick} MINVALUE 1 NO MAXVALUE NO CYCLE START WITH {v} RESTART WITH {v}"
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

fn info_oid(info: &SeqInfo) -> BdrResult<u32> {
    Ok(Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT $1::regclass::oid",
        &[info.regclass.as_str().into()],
    )?
    .map(|o| o.to_u32())
    .unwrap_or(0))
}

/// `bdr.alter_sequence_set_kind`: makes `seqid` of `kind_name` on this
/// node and, where this session's DDL goes to the group, on every node.
pub fn alter_sequence_set_kind(seqid: u32, kind_name: &str, start: Option<i64>) -> BdrResult<()> {
    let info = as_bdr(|| cat::seq_info(seqid))?;
    // SAFETY: a catalog lookup of a relation that exists (seq_info found it).
    let owner =
        unsafe { pg_sys::pg_class_ownercheck(pg_sys::Oid::from(seqid), pg_sys::GetUserId()) };
    if !owner {
        return Err(BdrError::NotOwner(info.regclass.clone()));
    }
    let kind = Kind::parse(kind_name, info.ty).map_err(|msg| BdrError::Sequence {
        msg,
        hint: "Use one of local, snowflakeid, timeshard, galloc or distributed.".into(),
    })?;
    kind.fits(info.ty).map_err(|msg| BdrError::Sequence {
        msg: format!("sequence {}: {msg}", info.regclass),
        hint: "Use galloc for integer and smallint sequences, or change the sequence's type with ALTER SEQUENCE ... AS bigint first.".into(),
    })?;
    set_kind(seqid, &info, kind, start)
}

fn set_kind(seqid: u32, info: &SeqInfo, kind: Kind, start: Option<i64>) -> BdrResult<()> {
    let replaying = crate::hlc::is_exempt();
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
            galloc::take_chunks_now(seqid, info)?;
        }
    }
    if !replaying && crate::ddl::in_group() {
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

/// After a utility statement: sequences it created get
/// `bdr.default_sequence_kind` (a session's own statements in a group;
/// writers get the origin's choice by its replicated
/// `bdr.alter_sequence_set_kind`), and the kinds of dropped ones are
/// forgotten.
///
/// # Safety
/// `pstmt` is the utility hook's statement, which has just run.
pub unsafe fn after_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    context: pg_sys::ProcessUtilityContext::Type,
) {
    // SAFETY: the caller upholds this function's contract.
    let tag = unsafe {
        let stmt = (*pstmt).utilityStmt;
        if stmt.is_null() {
            return;
        }
        (*stmt).type_
    };
    use pg_sys::NodeTag::*;
    let drops = matches!(tag, T_DropStmt | T_DropOwnedStmt);
    let creates = matches!(
        tag,
        T_CreateSeqStmt | T_CreateStmt | T_AlterTableStmt | T_CreateForeignTableStmt
    );
    if !drops && !creates {
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
        if crate::hlc::is_exempt()
            || extension_script
            || is_internal()
            || (context != pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL
                && context != pg_sys::ProcessUtilityContext::PROCESS_UTILITY_QUERY)
            || !crate::ddl::in_group()
        {
            return;
        }
        apply_default_kind()
    };
    if let Err(e) = r {
        e.raise();
    }
}

fn apply_default_kind() -> BdrResult<()> {
    let setting = crate::guc::get_enum(crate::guc::DEFAULT_SEQUENCE_KIND);
    for (seqid, xmin) in as_bdr(cat::sequences_without_kind)? {
        // SAFETY: asks whether an xid is this transaction's (or a
        // subtransaction's); no preconditions.
        if !unsafe {
            pg_sys::TransactionIdIsCurrentTransactionId(pg_sys::TransactionId::from(xmin))
        } {
            continue;
        }
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
        set_kind(seqid, &info, kind, None)?;
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
        pg_sys::RangeVarGetRelidExtended(
            (*alter).sequence,
            pg_sys::NoLock as i32,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    };
    if seqid == pg_sys::InvalidOid {
        return;
    }
    if let Some(k) = planner::kind_of(seqid.to_u32()).filter(|k| *k != Kind::Local) {
        BdrError::Sequence {
            msg: format!(
                "cannot change the numbers of {} sequence with oid {} by ALTER SEQUENCE",
                k.name(),
                seqid.to_u32()
            ),
            hint: "bdr sets its range and increment; convert it with bdr.alter_sequence_set_kind(seq, 'local') first, or pass a new start to bdr.alter_sequence_set_kind.".into(),
        }
        .raise();
    }
}

/// The type of a sequence, for the planner hook's casts.
pub fn seq_type(seqid: u32) -> Option<SeqType> {
    as_bdr(|| cat::seq_info(seqid)).ok().map(|i| i.ty)
}
