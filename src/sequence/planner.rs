//! The planner hook that makes `nextval` of a global sequence take its
//! value from bdr: PostgreSQL 15 has no sequence access methods, so every
//! query is looked at before it is planned, and
//! - `nextval('seq')` and `currval('seq')` with a constant sequence of kind
//!   snowflakeid, timeshard or galloc call bdr's functions instead,
//! - identity columns of a snowflakeid or timeshard sequence (the
//!   rewriter's `NextValueExpr`) call bdr's `nextval`,
//! - `setval('seq', ...)` of a global sequence is refused.
//!
//! Column defaults reach the planner as `nextval` calls, so INSERT, UPDATE
//! and MERGE are covered; what bypasses the planner (COPY's defaults, a
//! `nextval` with a computed argument) takes plain `nextval`, which the
//! sequence's own setup keeps unique (see `super`).

use super::{galloc, generator};
use crate::error::BdrError;
use crate::pg::user::as_bdr;
use bdr_core::sequence::Kind;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};

static mut PREV_PLANNER: pg_sys::planner_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster before any backend exists.
    unsafe {
        PREV_PLANNER = pg_sys::planner_hook;
        pg_sys::planner_hook = Some(bdr_planner);
    }
}

thread_local! {
    /// Kinds by sequence oid (`None`: local), and bdr's function oids;
    /// cleared on every relcache invalidation (ALTER SEQUENCE, which
    /// `bdr.alter_sequence_set_kind` runs, sends one).
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

#[derive(Default)]
struct Cache {
    registered: bool,
    kinds: HashMap<u32, Option<Kind>>,
    nextval_fn: Option<pg_sys::Oid>,
    currval_fn: Option<pg_sys::Oid>,
}

#[pg_guard]
unsafe extern "C-unwind" fn invalidate(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    CACHE.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.kinds.clear();
            c.nextval_fn = None;
            c.currval_fn = None;
        }
    });
}

/// The kind of a sequence (`None`: no bdr here, or not a sequence of it).
pub fn kind_of(seqid: u32) -> Option<Kind> {
    let cached = CACHE.with(|c| c.borrow().kinds.get(&seqid).copied());
    if let Some(k) = cached {
        return k;
    }
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if !c.registered {
            // SAFETY: registers a callback once per backend.
            unsafe {
                pg_sys::CacheRegisterRelcacheCallback(Some(invalidate), pg_sys::Datum::from(0))
            };
            c.registered = true;
        }
    });
    // SAFETY: a catalog lookup by name in a connected backend.
    let has_bdr = unsafe { pg_sys::get_extension_oid(c"bdr".as_ptr(), true) } != pg_sys::InvalidOid;
    let k = if has_bdr {
        as_bdr(|| crate::catalog::sequences::kind_of(seqid))
            .ok()
            .flatten()
            .map(|r| r.kind)
    } else {
        None
    };
    // Under REPEATABLE READ the lookup saw the transaction's snapshot,
    // which may be older than the invalidation that cleared the cache:
    // keep it for this lookup only.
    // SAFETY: reads a backend-global setting.
    if unsafe { pg_sys::XactIsoLevel } < pg_sys::XACT_REPEATABLE_READ as i32 {
        CACHE.with(|c| c.borrow_mut().kinds.insert(seqid, k));
    }
    k
}

fn function_oid(signature: &str) -> pg_sys::Oid {
    as_bdr(|| {
        Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT pg_catalog.to_regprocedure($1)::oid",
            &[signature.into()],
        )
    })
    .ok()
    .flatten()
    .unwrap_or(pg_sys::InvalidOid)
}

fn nextval_fn() -> pg_sys::Oid {
    if let Some(o) = CACHE.with(|c| c.borrow().nextval_fn) {
        return o;
    }
    let o = function_oid("bdr._seq_nextval(oid)");
    CACHE.with(|c| c.borrow_mut().nextval_fn = Some(o));
    o
}

fn currval_fn() -> pg_sys::Oid {
    if let Some(o) = CACHE.with(|c| c.borrow().currval_fn) {
        return o;
    }
    let o = function_oid("bdr._seq_currval(oid)");
    CACHE.with(|c| c.borrow_mut().currval_fn = Some(o));
    o
}

/// What the walk found: calls with a constant sequence, and places that
/// hold an identity column's `NextValueExpr`.
#[derive(Default)]
struct Found {
    calls: Vec<*mut pg_sys::FuncExpr>,
    slots: Vec<*mut *mut pg_sys::Node>,
}

const F_NEXTVAL: u32 = pg_sys::F_NEXTVAL;
const F_CURRVAL: u32 = pg_sys::F_CURRVAL;
const F_SETVAL2: u32 = pg_sys::F_SETVAL_REGCLASS_INT8;
const F_SETVAL3: u32 = pg_sys::F_SETVAL_REGCLASS_INT8_BOOL;

/// The constant sequence a call names, if it names one.
unsafe fn const_seq(f: *mut pg_sys::FuncExpr) -> Option<u32> {
    // SAFETY: the caller passes a FuncExpr of the query being planned.
    unsafe {
        let args = pgrx::PgList::<pg_sys::Node>::from_pg((*f).args);
        let a = args.get_ptr(0)?;
        if (*a).type_ != pg_sys::NodeTag::T_Const {
            return None;
        }
        let c = a as *mut pg_sys::Const;
        if (*c).constisnull {
            return None;
        }
        Some(pg_sys::Oid::from((*c).constvalue.value() as u32).to_u32())
    }
}

unsafe fn note_slot(found: &mut Found, slot: *mut *mut pg_sys::Node) {
    // SAFETY: the caller passes a pointer into a node of the query.
    unsafe {
        if !(*slot).is_null() && (**slot).type_ == pg_sys::NodeTag::T_NextValueExpr {
            found.slots.push(slot);
        }
    }
}

unsafe fn note_list(found: &mut Found, list: *mut pg_sys::List) {
    if list.is_null() {
        return;
    }
    // SAFETY: a List of the query's nodes; its cells hold node pointers.
    unsafe {
        for i in 0..(*list).length as usize {
            let cell = (*list).elements.add(i);
            note_slot(
                found,
                std::ptr::addr_of_mut!((*cell).ptr_value) as *mut *mut pg_sys::Node,
            );
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn walker(node: *mut pg_sys::Node, ctx: *mut c_void) -> bool {
    if node.is_null() {
        return false;
    }
    // SAFETY: ctx is the Found the walk started with; node a node of it.
    unsafe {
        let found = &mut *(ctx as *mut Found);
        match (*node).type_ {
            pg_sys::NodeTag::T_Query => {
                return pg_sys::query_tree_walker(
                    node as *mut pg_sys::Query,
                    Some(walker),
                    ctx,
                    pg_sys::QTW_EXAMINE_RTES_BEFORE as c_int,
                );
            }
            pg_sys::NodeTag::T_FuncExpr => {
                let f = node as *mut pg_sys::FuncExpr;
                let id = (*f).funcid.to_u32();
                if matches!(id, F_NEXTVAL | F_CURRVAL | F_SETVAL2 | F_SETVAL3)
                    && const_seq(f).is_some()
                {
                    found.calls.push(f);
                }
                note_list(found, (*f).args);
            }
            pg_sys::NodeTag::T_TargetEntry => {
                let te = node as *mut pg_sys::TargetEntry;
                note_slot(
                    found,
                    std::ptr::addr_of_mut!((*te).expr) as *mut *mut pg_sys::Node,
                );
            }
            pg_sys::NodeTag::T_CoalesceExpr => {
                note_list(found, (*(node as *mut pg_sys::CoalesceExpr)).args);
            }
            pg_sys::NodeTag::T_RangeTblEntry => {
                let rte = node as *mut pg_sys::RangeTblEntry;
                if (*rte).rtekind == pg_sys::RTEKind::RTE_VALUES {
                    let rows = pgrx::PgList::<pg_sys::List>::from_pg((*rte).values_lists);
                    for row in rows.iter_ptr() {
                        note_list(found, row);
                    }
                }
                // range_table_walker walks the entry's contents itself.
                return false;
            }
            _ => {}
        }
        pg_sys::expression_tree_walker(node, Some(walker), ctx)
    }
}

/// A call of bdr's `nextval` for sequence `seqid`, in place of an identity
/// column's `NextValueExpr`.
unsafe fn nextval_call(seqid: pg_sys::Oid, fnoid: pg_sys::Oid) -> *mut pg_sys::Node {
    // SAFETY: builds nodes in the planner's memory context.
    unsafe {
        let arg = pg_sys::makeConst(
            pg_sys::REGCLASSOID,
            -1,
            pg_sys::InvalidOid,
            4,
            pg_sys::Datum::from(seqid.to_u32()),
            false,
            true,
        );
        pg_sys::makeFuncExpr(
            fnoid,
            pg_sys::INT8OID,
            pg_sys::list_make1_impl(
                pg_sys::NodeTag::T_List,
                pg_sys::ListCell {
                    ptr_value: arg as *mut c_void,
                },
            ),
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
        ) as *mut pg_sys::Node
    }
}

unsafe fn rewrite(parse: *mut pg_sys::Query) {
    let mut found = Found::default();
    // SAFETY: the query about to be planned; the walk only reads it.
    unsafe {
        pg_sys::query_tree_walker(
            parse,
            Some(walker),
            &mut found as *mut Found as *mut c_void,
            pg_sys::QTW_EXAMINE_RTES_BEFORE as c_int,
        );
    }
    if found.calls.is_empty() && found.slots.is_empty() {
        return;
    }
    for f in found.calls {
        // SAFETY: a FuncExpr the walk found in this query.
        let (id, seq) = unsafe { ((*f).funcid.to_u32(), const_seq(f).unwrap_or(0)) };
        let Some(kind) = kind_of(seq).filter(|k| *k != Kind::Local) else {
            continue;
        };
        match id {
            F_SETVAL2 | F_SETVAL3 => BdrError::Sequence {
                msg: format!(
                    "setval cannot be used on {} sequence with oid {seq}",
                    kind.name()
                ),
                hint: "Its values are assigned by bdr across the group; to start elsewhere, pass the start to bdr.alter_sequence_set_kind(seq, kind, start), or convert it to local first.".into(),
            }
            .raise(),
            F_NEXTVAL => {
                let fnoid = nextval_fn();
                if fnoid != pg_sys::InvalidOid {
                    // SAFETY: same arguments (a regclass is an oid); only
                    // the function changes.
                    unsafe { (*f).funcid = fnoid };
                }
            }
            _ => {
                let fnoid = currval_fn();
                if fnoid != pg_sys::InvalidOid && kind.generated() {
                    // SAFETY: as above.
                    unsafe { (*f).funcid = fnoid };
                }
            }
        }
    }
    for slot in found.slots {
        // SAFETY: a slot the walk found, holding a NextValueExpr.
        unsafe {
            let nve = *slot as *mut pg_sys::NextValueExpr;
            let seq = (*nve).seqid;
            if (*nve).typeId != pg_sys::INT8OID {
                continue;
            }
            if !kind_of(seq.to_u32()).is_some_and(|k| k.generated()) {
                continue;
            }
            let fnoid = nextval_fn();
            if fnoid != pg_sys::InvalidOid {
                *slot = nextval_call(seq, fnoid);
            }
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn bdr_planner(
    parse: *mut pg_sys::Query,
    query_string: *const c_char,
    cursor_options: c_int,
    bound_params: pg_sys::ParamListInfo,
) -> *mut pg_sys::PlannedStmt {
    // SAFETY: the query PostgreSQL is about to plan.
    unsafe {
        if !parse.is_null()
            && (*parse).commandType != pg_sys::CmdType::CMD_UTILITY
            && !super::is_internal()
        {
            rewrite(parse);
        }
        match PREV_PLANNER {
            Some(prev) => prev(parse, query_string, cursor_options, bound_params),
            None => pg_sys::standard_planner(parse, query_string, cursor_options, bound_params),
        }
    }
}

/// `bdr.seq_nextval`: the next value of any sequence, by its kind.
pub fn nextval(seqid: u32) -> i64 {
    match kind_of(seqid) {
        Some(k) if k.generated() => match generator::next_value(seqid, k, super::node_seq_id) {
            Ok(v) => v,
            Err(e) => e.raise(),
        },
        Some(Kind::Galloc) => galloc::nextval(seqid),
        _ => plain_nextval(seqid),
    }
}

/// PostgreSQL's own `nextval`.
pub fn plain_nextval(seqid: u32) -> i64 {
    // SAFETY: the built-in nextval(regclass) with a valid oid; it raises
    // its own errors.
    unsafe {
        pgrx::direct_function_call::<i64>(
            pg_sys::nextval_oid,
            &[pg_sys::Oid::from(seqid).into_datum()],
        )
    }
    .unwrap_or(0)
}

/// `bdr.seq_currval`.
pub fn currval(seqid: u32) -> i64 {
    match kind_of(seqid) {
        Some(k) if k.generated() => match generator::current_value(seqid) {
            Ok(v) => v,
            Err(e) => e.raise(),
        },
        _ => {
            // SAFETY: the built-in currval(regclass) with a valid oid.
            unsafe {
                pgrx::direct_function_call::<i64>(
                    pg_sys::currval_oid,
                    &[pg_sys::Oid::from(seqid).into_datum()],
                )
            }
            .unwrap_or(0)
        }
    }
}
