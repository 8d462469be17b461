//! The ProcessUtility hook: tells the `bdr.xact_replication` check whether it
//! runs inside `SET LOCAL`, which PostgreSQL does not pass to check hooks,
//! and hands DDL to `crate::ddl` for the group.

use crate::guc;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::c_char;

static mut PREV_UTILITY_HOOK: pg_sys::ProcessUtility_hook_type = None;
/// How many utility statements are running inside each other.
static mut DEPTH: u32 = 0;

pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster before any backend exists.
    unsafe {
        PREV_UTILITY_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(utility_hook);
    }
}

#[allow(clippy::too_many_arguments)]
#[pg_guard]
unsafe extern "C-unwind" fn utility_hook(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: PostgreSQL hands us a valid planned utility statement.
    let is_set_local = unsafe {
        let stmt = (*pstmt).utilityStmt;
        !stmt.is_null()
            && (*stmt).type_ == pg_sys::NodeTag::T_VariableSetStmt
            && (*(stmt as *mut pg_sys::VariableSetStmt)).is_local
    };
    // SAFETY: as above.
    if unsafe { drops_bdr_extension((*pstmt).utilityStmt) } {
        // The tombstone triggers on user tables depend on bdr's trigger
        // function but are not part of the extension; they go first.
        Spi::run(
            "DO $$ DECLARE r record; BEGIN
               FOR r IN SELECT tgrelid::regclass AS rel, tgname FROM pg_catalog.pg_trigger WHERE tgname IN ('bdr_tombstone', 'bdr_tombstone_key') AND tgparentid = 0 LOOP
                 EXECUTE format('DROP TRIGGER %I ON %s', r.tgname, r.rel);
               END LOOP; END $$",
        )
        .unwrap_or_else(|e| crate::fail!(ERRCODE_INTERNAL_ERROR, "could not remove bdr's triggers: {e}"));
    }
    // SAFETY: the hook's own arguments.
    unsafe {
        crate::ddl::truncate_lock(pstmt, query_string, context);
        // COPY FROM and TRUNCATE wait while a global DML lock stops writes.
        crate::dmllock::check_utility((*pstmt).utilityStmt);
    }
    // DDL for the group is decided before it runs (refusals change
    // nothing) and queued once it succeeded.
    // SAFETY: the hook's own arguments.
    let ddl = unsafe { crate::ddl::capture(pstmt, query_string, context) };
    // SAFETY: as above.
    let new_table = unsafe { crate::ddl::creates_new_table(pstmt, context) };
    // SAFETY: as above.
    unsafe { crate::sequence::before_utility(pstmt) };
    // SAFETY: single-threaded backend; restored below even on error.
    let saved = unsafe { guc::IN_SET_LOCAL };
    // SAFETY: as above.
    unsafe { guc::IN_SET_LOCAL = is_set_local };
    // SAFETY: single-threaded backend; restored below even on error.
    let depth = unsafe { DEPTH };
    // SAFETY: as above.
    unsafe { DEPTH = depth + 1 };
    PgTryBuilder::new(|| unsafe {
        // SAFETY: forwarding the arguments we were given, unchanged.
        macro_rules! forward {
            ($f:expr) => {
                $f(
                    pstmt,
                    query_string,
                    read_only_tree,
                    context,
                    params,
                    query_env,
                    dest,
                    qc,
                )
            };
        }
        match PREV_UTILITY_HOOK {
            Some(prev) => pg_sys::ffi::pg_guard_ffi_boundary(|| forward!(prev)),
            None => forward!(pg_sys::standard_ProcessUtility),
        }
    })
    .finally(|| {
        // SAFETY: single-threaded backend; puts back what was saved above.
        unsafe {
            guc::IN_SET_LOCAL = saved;
            DEPTH = depth;
        }
        if depth == 0 {
            crate::globallock::release_statement_lock();
        }
    })
    .execute();
    if let Some(p) = ddl {
        // SAFETY: the statement that has just run.
        if unsafe { crate::ddl::still_replicates(pstmt) } {
            crate::ddl::queue(p);
        }
    }
    if new_table {
        // SAFETY: the statement that has just run.
        unsafe { crate::ddl::apply_default_replica_identity(pstmt) };
    }
    // After the statement's own queue entry: its sequences' kinds follow it.
    // SAFETY: the statement that has just run.
    unsafe { crate::sequence::after_utility(pstmt, depth == 0) };
}

/// Whether the statement is `DROP EXTENSION ... bdr ...` in a database that has it.
unsafe fn drops_bdr_extension(stmt: *mut pg_sys::Node) -> bool {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_DropStmt {
            return false;
        }
        let drop = stmt as *mut pg_sys::DropStmt;
        if (*drop).removeType != pg_sys::ObjectType::OBJECT_EXTENSION {
            return false;
        }
        let objects = (*drop).objects;
        if objects.is_null() {
            return false;
        }
        let named_bdr = (0..(*objects).length as usize).any(|i| {
            let node = (*(*objects).elements.add(i)).ptr_value as *mut pg_sys::Node;
            !node.is_null()
                && (*node).type_ == pg_sys::NodeTag::T_String
                && std::ffi::CStr::from_ptr((*(node as *mut pg_sys::String)).sval).to_bytes()
                    == b"bdr"
        });
        named_bdr && pg_sys::get_extension_oid(c"bdr".as_ptr(), true) != pg_sys::InvalidOid
    }
}
