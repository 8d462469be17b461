//! DDL replication, the origin's side: the utility hook asks `capture`
//! before a statement runs whether it replicates (`bdr_core::ddl`
//! classifies it; temporary objects stay local; what would make nodes
//! diverge is refused), and `queue` after it succeeded writes it, with its
//! search path and role, as a transactional logical message: it reaches
//! the peers in commit order with the transaction's row changes, and their
//! writers run it (`src/apply/ddl.rs`).

use crate::error::{BdrError, BdrResult};
use bdr_core::ddl::{self as rules, DdlCommand, Kind, DDL_PREFIX};
use bdr_core::dmllock as dmlrules;
use pgrx::pg_sys;
use pgrx::prelude::*;
use std::ffi::CStr;

/// A statement to queue once it has run.
pub struct Pending {
    cmd: DdlCommand,
    /// Columns whose values this node sends as rows once it ran.
    pub value_columns: Vec<(pg_sys::Oid, String)>,
}

/// The command tag of a utility statement ("CREATE TABLE", ...).
///
/// # Safety
/// `stmt` is a valid utility statement node.
unsafe fn tag_of(stmt: *mut pg_sys::Node) -> String {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        let tag = pg_sys::CreateCommandTag(stmt);
        CStr::from_ptr(pg_sys::GetCommandTagName(tag))
            .to_string_lossy()
            .into_owned()
    }
}

/// The statement's own text, sliced from a string of several.
///
/// # Safety
/// `pstmt` and `query_string` are the utility hook's arguments.
unsafe fn statement_text(pstmt: *mut pg_sys::PlannedStmt, query_string: *const i8) -> String {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        if query_string.is_null() {
            return String::new();
        }
        let all = CStr::from_ptr(query_string).to_bytes();
        let start = ((*pstmt).stmt_location.max(0) as usize).min(all.len());
        let len = (*pstmt).stmt_len.max(0) as usize;
        let end = if len == 0 {
            all.len()
        } else {
            (start + len).min(all.len())
        };
        String::from_utf8_lossy(&all[start..end]).trim().to_string()
    }
}

/// The relation a range variable names now, InvalidOid if none.
///
/// # Safety
/// `rv` is a valid RangeVar.
pub unsafe fn existing_relid(rv: *mut pg_sys::RangeVar) -> pg_sys::Oid {
    // SAFETY: the caller upholds this function's contract; no lock, no error
    // when it is missing.
    unsafe {
        pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::NoLock as i32,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    }
}

/// Whether a CREATE makes its relation temporary: TEMP, or an explicit
/// pg_temp schema (never by looking up a relation of that name: a
/// temporary one may hide a permanent one being created).
///
/// # Safety
/// `rv` is null or a valid RangeVar.
unsafe fn creates_temp(rv: *mut pg_sys::RangeVar) -> bool {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        !rv.is_null()
            && ((*rv).relpersistence as u8 == pg_sys::RELPERSISTENCE_TEMP
                || (!(*rv).schemaname.is_null()
                    && CStr::from_ptr((*rv).schemaname)
                        .to_bytes()
                        .starts_with(b"pg_temp")))
    }
}

/// Whether a range variable names an existing temporary relation (or one
/// a CREATE makes temporary).
///
/// # Safety
/// `rv` is null or a valid RangeVar.
unsafe fn is_temp(rv: *mut pg_sys::RangeVar) -> bool {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        if rv.is_null() {
            return false;
        }
        if (*rv).relpersistence as u8 == pg_sys::RELPERSISTENCE_TEMP {
            return true;
        }
        let relid = existing_relid(rv);
        relid != pg_sys::InvalidOid
            && pg_sys::get_rel_persistence(relid) as u8 == pg_sys::RELPERSISTENCE_TEMP
    }
}

/// The temporary-ness of what a statement works on: `Some(true)` all
/// temporary, `Some(false)` none, `None` both.
///
/// # Safety
/// `stmt` is a valid utility statement node.
unsafe fn temp_targets(stmt: *mut pg_sys::Node) -> Option<bool> {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        use pg_sys::NodeTag::*;
        let one = |rv: *mut pg_sys::RangeVar| Some(is_temp(rv));
        let new = |rv: *mut pg_sys::RangeVar| Some(creates_temp(rv));
        match (*stmt).type_ {
            T_CreateStmt => new((*(stmt as *mut pg_sys::CreateStmt)).relation),
            T_ViewStmt => new((*(stmt as *mut pg_sys::ViewStmt)).view),
            T_CreateSeqStmt => new((*(stmt as *mut pg_sys::CreateSeqStmt)).sequence),
            T_AlterSeqStmt => one((*(stmt as *mut pg_sys::AlterSeqStmt)).sequence),
            T_IndexStmt => one((*(stmt as *mut pg_sys::IndexStmt)).relation),
            T_AlterTableStmt => one((*(stmt as *mut pg_sys::AlterTableStmt)).relation),
            T_CreateTrigStmt => one((*(stmt as *mut pg_sys::CreateTrigStmt)).relation),
            // Also what REFRESH MATERIALIZED VIEW CONCURRENTLY runs itself.
            T_CreateTableAsStmt => {
                let into = (*(stmt as *mut pg_sys::CreateTableAsStmt)).into;
                new(if into.is_null() {
                    std::ptr::null_mut()
                } else {
                    (*into).rel
                })
            }
            T_DropStmt => {
                let d = stmt as *mut pg_sys::DropStmt;
                use pg_sys::ObjectType::*;
                if !matches!(
                    (*d).removeType,
                    OBJECT_TABLE | OBJECT_INDEX | OBJECT_SEQUENCE | OBJECT_VIEW | OBJECT_MATVIEW
                ) || (*d).objects.is_null()
                {
                    return Some(false);
                }
                let objs = (*d).objects;
                let (mut temp, mut other) = (false, false);
                for i in 0..(*objs).length as usize {
                    let names = (*(*objs).elements.add(i)).ptr_value as *mut pg_sys::List;
                    let rv = pg_sys::makeRangeVarFromNameList(names);
                    if is_temp(rv) {
                        temp = true;
                    } else {
                        other = true;
                    }
                }
                match (temp, other) {
                    (true, true) => None,
                    (t, _) => Some(t),
                }
            }
            _ => Some(false),
        }
    }
}

/// Whether a statement adds an exclusion constraint.
///
/// # Safety
/// `stmt` is a valid utility statement node.
unsafe fn adds_exclusion(stmt: *mut pg_sys::Node) -> bool {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        let exclusion = |n: *mut pg_sys::Node| {
            !n.is_null()
                && (*n).type_ == pg_sys::NodeTag::T_Constraint
                && (*(n as *mut pg_sys::Constraint)).contype == pg_sys::ConstrType::CONSTR_EXCLUSION
        };
        let any = |l: *mut pg_sys::List, f: &dyn Fn(*mut pg_sys::Node) -> bool| {
            !l.is_null()
                && (0..(*l).length as usize)
                    .any(|i| f((*(*l).elements.add(i)).ptr_value as *mut pg_sys::Node))
        };
        match (*stmt).type_ {
            pg_sys::NodeTag::T_CreateStmt => {
                let c = stmt as *mut pg_sys::CreateStmt;
                any((*c).tableElts, &exclusion) || any((*c).constraints, &exclusion)
            }
            pg_sys::NodeTag::T_AlterTableStmt => {
                let a = stmt as *mut pg_sys::AlterTableStmt;
                any((*a).cmds, &|n| {
                    let cmd = n as *mut pg_sys::AlterTableCmd;
                    (*cmd).subtype == pg_sys::AlterTableType::AT_AddConstraint
                        && exclusion((*cmd).def)
                })
            }
            _ => false,
        }
    }
}

/// Whether the statement is about bdr itself: the extension, or the
/// tombstone triggers bdr's event trigger makes on every node by itself.
///
/// # Safety
/// `stmt` is a valid utility statement node.
unsafe fn about_bdr(stmt: *mut pg_sys::Node) -> bool {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        // bdr's own names exactly: users may name things bdr_something.
        let named_bdr = |p: *const i8| {
            !p.is_null()
                && matches!(
                    CStr::from_ptr(p).to_bytes(),
                    b"bdr" | b"bdr_tombstone" | b"bdr_tombstone_key"
                )
        };
        match (*stmt).type_ {
            pg_sys::NodeTag::T_CreateExtensionStmt => {
                named_bdr((*(stmt as *mut pg_sys::CreateExtensionStmt)).extname)
            }
            pg_sys::NodeTag::T_AlterExtensionStmt => {
                named_bdr((*(stmt as *mut pg_sys::AlterExtensionStmt)).extname)
            }
            pg_sys::NodeTag::T_CreateTrigStmt => {
                named_bdr((*(stmt as *mut pg_sys::CreateTrigStmt)).trigname)
            }
            pg_sys::NodeTag::T_DropStmt => {
                let d = stmt as *mut pg_sys::DropStmt;
                matches!(
                    (*d).removeType,
                    pg_sys::ObjectType::OBJECT_EXTENSION | pg_sys::ObjectType::OBJECT_TRIGGER
                ) && {
                    let objs = (*d).objects;
                    !objs.is_null()
                        && (0..(*objs).length as usize).any(|i| {
                            let n = (*(*objs).elements.add(i)).ptr_value as *mut pg_sys::Node;
                            let last = if (*n).type_ == pg_sys::NodeTag::T_List {
                                let l = n as *mut pg_sys::List;
                                (*(*l).elements.add((*l).length as usize - 1)).ptr_value
                                    as *mut pg_sys::Node
                            } else {
                                n
                            };
                            (*last).type_ == pg_sys::NodeTag::T_String
                                && named_bdr((*(last as *mut pg_sys::String)).sval)
                        })
                }
            }
            _ => false,
        }
    }
}

/// Whether this session's DDL goes to the group: a BDR database whose
/// local node is in a group, and not a bdr writer replaying a peer's.
pub fn in_group() -> bool {
    if crate::hlc::is_exempt() {
        return false;
    }
    // SAFETY: a catalog lookup by name in a connected backend.
    if unsafe { pg_sys::get_extension_oid(c"bdr".as_ptr(), true) } == pg_sys::InvalidOid {
        return false;
    }
    crate::pg::user::as_bdr(crate::catalog::local_node)
        .ok()
        .flatten()
        .is_some_and(|l| l.node_group_id != 0)
}

fn current_setting(name: &std::ffi::CStr) -> String {
    // SAFETY: reads a setting by name; NULL means it does not exist.
    unsafe {
        let v = pg_sys::GetConfigOptionByName(name.as_ptr(), std::ptr::null_mut(), true);
        if v.is_null() {
            String::new()
        } else {
            CStr::from_ptr(v).to_string_lossy().into_owned()
        }
    }
}

fn current_role() -> String {
    // SAFETY: the current user's name; it exists while the session runs.
    unsafe {
        let n = pg_sys::GetUserNameFromId(pg_sys::GetUserId(), true);
        if n.is_null() {
            String::new()
        } else {
            CStr::from_ptr(n).to_string_lossy().into_owned()
        }
    }
}

/// Decides, before a utility statement runs, whether it is to be queued
/// for the group; raises the refusals.
///
/// # Safety
/// The utility hook's arguments.
pub unsafe fn capture(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const i8,
    context: pg_sys::ProcessUtilityContext::Type,
) -> Option<Pending> {
    // Sub-commands (of CREATE SCHEMA, ALTER TABLE) come with their statement.
    if context != pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL
        && context != pg_sys::ProcessUtilityContext::PROCESS_UTILITY_QUERY
    {
        return None;
    }
    // An extension's script is the extension's: CREATE EXTENSION replicates.
    // bdr's own set-up of a global sequence is done on every node by the
    // replicated bdr.alter_sequence_set_kind.
    // SAFETY: reads a backend-global flag.
    if unsafe { pg_sys::creating_extension } || crate::sequence::is_internal() {
        return None;
    }
    // SAFETY: the hook's statement.
    let stmt = unsafe { (*pstmt).utilityStmt };
    if stmt.is_null() {
        return None;
    }
    // SAFETY: as above.
    let tag = unsafe { tag_of(stmt) };
    let kind = rules::classify(&tag, crate::guc::get_bool(crate::guc::ROLE_REPLICATION));
    if kind == Kind::Local {
        return None;
    }
    // SAFETY: as above.
    if unsafe { about_bdr(stmt) } || !in_group() {
        return None;
    }
    let unsafe_ok = crate::guc::get_bool(crate::guc::PERMIT_UNSAFE_COMMANDS);
    // SAFETY: as above.
    let (temp, exclusion) = unsafe { (temp_targets(stmt), adds_exclusion(stmt)) };
    let kind = match (kind, temp) {
        (_, Some(true)) => return None,
        (_, None) => rules::TEMP_MIX_REFUSAL,
        (Kind::Replicate, _) if exclusion && !unsafe_ok => rules::EXCLUSION_REFUSAL,
        (k, _) => k,
    };
    // SAFETY: as above.
    let sql = unsafe { statement_text(pstmt, query_string) };
    if let Kind::Refuse { reason, hint } = kind {
        BdrError::Refused {
            msg: format!("{reason}: {sql}"),
            hint: hint.to_string(),
        }
        .raise();
    }
    if !crate::guc::get_bool(crate::guc::DDL_REPLICATION) {
        warning!("bdr.ddl_replication is off: this statement is not replicated to the other nodes: {sql}");
        return None;
    }
    // Before it runs: one DDL transaction in the group at a time. A
    // CONCURRENTLY statement commits transactions of its own: its lock is
    // held until it returns.
    let concurrently = rules::without_concurrently(&sql) != sql;
    let locked = if concurrently {
        crate::globallock::ddl_lock_for_statement(&sql)
    } else {
        crate::globallock::ddl_lock_for(&sql)
    };
    if let Err(e) = locked {
        e.raise();
    }
    // Then the DML lock, where the statement reads or rewrites rows.
    // SAFETY: as above.
    let needs = match unsafe { dml_needs(stmt, &sql) } {
        Ok(n) => n,
        Err(e) => e.raise(),
    };
    if !needs.relids.is_empty() && crate::globallock::wants_dml_lock(&sql) {
        for relid in &needs.relids {
            if let Err(e) = crate::dmllock::lock_relation(*relid) {
                e.raise();
            }
        }
    }
    Some(Pending {
        cmd: DdlCommand {
            sql,
            search_path: current_setting(c"search_path"),
            role: current_role(),
        },
        value_columns: needs.value_columns,
    })
}

/// Whether a statement about to run is a CREATE TABLE of a new table
/// that `apply_default_replica_identity` is to give its replica identity
/// once it ran: a statement of the session's own (not a sub-command, an
/// extension script or a writer's replay), and not `IF NOT EXISTS` of a
/// table that is there already.
///
/// # Safety
/// The utility hook's arguments, before the statement runs.
pub unsafe fn creates_new_table(
    pstmt: *mut pg_sys::PlannedStmt,
    context: pg_sys::ProcessUtilityContext::Type,
) -> bool {
    if crate::guc::get_enum(crate::guc::DEFAULT_REPLICA_IDENTITY) == "default"
        || crate::hlc::is_exempt()
        || (context != pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL
            && context != pg_sys::ProcessUtilityContext::PROCESS_UTILITY_QUERY)
    {
        return false;
    }
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        if pg_sys::creating_extension {
            return false;
        }
        let stmt = (*pstmt).utilityStmt;
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_CreateStmt {
            return false;
        }
        let rv = (*(stmt as *mut pg_sys::CreateStmt)).relation;
        !creates_temp(rv) && existing_relid(rv) == pg_sys::InvalidOid
    }
}

/// Whether a statement that has run still goes to the group: a view that
/// selects from a temporary relation became temporary itself.
///
/// # Safety
/// `pstmt` is the utility hook's statement, which has just run.
pub unsafe fn still_replicates(pstmt: *mut pg_sys::PlannedStmt) -> bool {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        let stmt = (*pstmt).utilityStmt;
        stmt.is_null()
            || (*stmt).type_ != pg_sys::NodeTag::T_ViewStmt
            || !is_temp((*(stmt as *mut pg_sys::ViewStmt)).view)
    }
}

/// `bdr.default_replica_identity`: a table this session just created
/// (`creates_new_table` said so before it ran; not a temporary or
/// partitioned one) gets that replica identity, by an ALTER TABLE that
/// replicates after its CREATE TABLE. Writers replaying a peer's CREATE
/// TABLE do not apply their own default: the origin's ALTER reaches them.
///
/// # Safety
/// `pstmt` is the utility hook's statement, which has just run.
pub unsafe fn apply_default_replica_identity(pstmt: *mut pg_sys::PlannedStmt) {
    let identity = crate::guc::get_enum(crate::guc::DEFAULT_REPLICA_IDENTITY);
    // SAFETY: the caller upholds this function's contract.
    let relid = unsafe {
        let stmt = (*pstmt).utilityStmt;
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_CreateStmt {
            return;
        }
        let rv = (*(stmt as *mut pg_sys::CreateStmt)).relation;
        if creates_temp(rv)
            || pg_sys::get_extension_oid(c"bdr".as_ptr(), true) == pg_sys::InvalidOid
        {
            return;
        }
        let relid = existing_relid(rv);
        if relid == pg_sys::InvalidOid
            || pg_sys::get_rel_relkind(relid) as u8 != pg_sys::RELKIND_RELATION
        {
            return;
        }
        relid
    };
    // The regclass text is the name quoted and qualified as needed.
    let r = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[relid.into()])
        .and_then(|name| {
            Spi::run(&format!(
                "ALTER TABLE {} REPLICA IDENTITY {}",
                name.unwrap_or_default(),
                identity.to_ascii_uppercase()
            ))
        });
    if let Err(e) = r {
        crate::fail!(
            ERRCODE_INTERNAL_ERROR,
            "could not apply bdr.default_replica_identity: {e}"
        );
    }
}

/// Queues a statement that has run, in this transaction, then the values
/// it computed that the peers would compute differently.
pub fn queue(p: Pending) {
    let values = p.value_columns.clone();
    queue_command(p);
    send_values(&values);
}

fn queue_command(p: Pending) {
    let r = crate::pg::user::as_bdr(|| {
        Spi::run_with_args(
            "SELECT pg_catalog.pg_logical_emit_message(true, $1, $2)",
            &[DDL_PREFIX.into(), p.cmd.encode().into()],
        )
    });
    if let Err(e) = r {
        crate::fail!(
            ERRCODE_INTERNAL_ERROR,
            "could not queue the statement for the other nodes: {e}"
        );
    }
}

/// Queues a statement bdr itself wrote (a DDL-like function call) for the
/// group, as if this session had run it.
pub fn queue_statement(sql: String) {
    queue(Pending {
        cmd: DdlCommand {
            sql,
            search_path: current_setting(c"search_path"),
            role: current_role(),
        },
        value_columns: vec![],
    });
}

/// `bdr.replicate_ddl_command`: runs `sql` here and queues it for the
/// group, whatever `bdr.ddl_replication` says.
pub fn replicate_ddl_command(
    sql: &str,
    replication_sets: Option<Vec<Option<String>>>,
    ddl_locking: Option<&str>,
) -> BdrResult<()> {
    if let Some(sets) = replication_sets {
        if sets.iter().any(|s| s.as_deref() != Some("default")) {
            return Err(BdrError::NotSupported(
                "replication sets other than 'default' (bdr.replicate_ddl_command)".into(),
            ));
        }
    }
    let locking_was = crate::guc::get_enum(crate::guc::DDL_LOCKING);
    match ddl_locking {
        None => {}
        Some(mode @ ("off" | "on" | "dml")) => {
            Spi::run_with_args(
                "SELECT pg_catalog.set_config('bdr.ddl_locking', $1, true)",
                &[mode.into()],
            )?;
        }
        Some(other) => {
            return Err(BdrError::InvalidValue {
                what: "ddl_locking",
                msg: format!("\"{other}\" is not one of 'on', 'dml', 'off'"),
            })
        }
    }
    if !in_group() {
        return Err(BdrError::Prerequisite {
            msg: "the local node is not a member of a BDR group".into(),
            hint: "Run DDL directly; it replicates once the node is in a group.".into(),
        });
    }
    let was = crate::guc::get_bool(crate::guc::DDL_REPLICATION);
    Spi::run("SELECT pg_catalog.set_config('bdr.ddl_replication', 'on', true)")?;
    let r = Spi::run(sql);
    if !was {
        Spi::run("SELECT pg_catalog.set_config('bdr.ddl_replication', 'off', true)")?;
    }
    if ddl_locking.is_some() {
        Spi::run_with_args(
            "SELECT pg_catalog.set_config('bdr.ddl_locking', $1, true)",
            &[locking_was.into()],
        )?;
    }
    r?;
    Ok(())
}

/// What a statement asks of the global DML lock: the relations it locks
/// and the columns whose values the origin sends as rows once it ran.
#[derive(Default)]
pub struct DmlNeeds {
    pub relids: Vec<pg_sys::Oid>,
    pub value_columns: Vec<(pg_sys::Oid, String)>,
}

/// A raw expression every node evaluates to the same value for the same
/// row: a literal, a column, a cast of one.
///
/// # Safety
/// `n` is null or a valid raw expression node.
unsafe fn expr_shape(n: *mut pg_sys::Node) -> dmlrules::Expr {
    /// # Safety
    /// `n` is a valid raw expression node.
    unsafe fn simple(n: *mut pg_sys::Node) -> bool {
        // SAFETY: as above.
        unsafe {
            match (*n).type_ {
                pg_sys::NodeTag::T_A_Const | pg_sys::NodeTag::T_ColumnRef => true,
                pg_sys::NodeTag::T_TypeCast => {
                    let arg = (*(n as *mut pg_sys::TypeCast)).arg;
                    !arg.is_null() && simple(arg)
                }
                _ => false,
            }
        }
    }
    if n.is_null() {
        dmlrules::Expr::None
    // SAFETY: the caller upholds this function's contract.
    } else if unsafe { simple(n) } {
        dmlrules::Expr::Simple
    } else {
        dmlrules::Expr::Computed
    }
}

/// # Safety
/// `l` is null or a valid List of nodes.
unsafe fn nodes(l: *mut pg_sys::List) -> Vec<*mut pg_sys::Node> {
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        if l.is_null() {
            return vec![];
        }
        (0..(*l).length as usize)
            .map(|i| (*(*l).elements.add(i)).ptr_value as *mut pg_sys::Node)
            .collect()
    }
}

/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: the caller upholds this function's contract.
        unsafe { CStr::from_ptr(p).to_string_lossy().into_owned() }
    }
}

/// One ALTER TABLE sub-command as `bdr_core::dmllock` sees it, and the
/// column it is about.
///
/// # Safety
/// `cmd` is a valid raw AlterTableCmd.
#[allow(non_upper_case_globals)]
unsafe fn alter_piece(cmd: *mut pg_sys::AlterTableCmd) -> (dmlrules::AlterPiece, String) {
    use dmlrules::{AlterPiece as P, Expr};
    use pg_sys::AlterTableType::*;
    use pg_sys::ConstrType::*;
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        let def = (*cmd).def;
        match (*cmd).subtype {
            AT_AddColumn | AT_AddColumnRecurse
                if !def.is_null() && (*def).type_ == pg_sys::NodeTag::T_ColumnDef =>
            {
                let col = def as *mut pg_sys::ColumnDef;
                let mut default = expr_shape((*col).raw_default);
                let mut constraints = (*col).is_not_null;
                let mut generated = (*col).identity != 0 || (*col).generated != 0;
                for c in nodes((*col).constraints) {
                    if (*c).type_ != pg_sys::NodeTag::T_Constraint {
                        continue;
                    }
                    let c = c as *mut pg_sys::Constraint;
                    match (*c).contype {
                        CONSTR_DEFAULT => default = expr_shape((*c).raw_expr),
                        CONSTR_IDENTITY | CONSTR_GENERATED => generated = true,
                        CONSTR_NOTNULL | CONSTR_CHECK | CONSTR_UNIQUE | CONSTR_PRIMARY
                        | CONSTR_FOREIGN | CONSTR_EXCLUSION => constraints = true,
                        _ => {}
                    }
                }
                // serial and friends: a nextval() default.
                let ty = (*col).typeName;
                if !ty.is_null() {
                    if let Some(last) = nodes((*ty).names).last() {
                        if (**last).type_ == pg_sys::NodeTag::T_String {
                            let name = cstr((*(*last as *mut pg_sys::String)).sval);
                            if matches!(
                                name.as_str(),
                                "serial"
                                    | "serial2"
                                    | "serial4"
                                    | "serial8"
                                    | "smallserial"
                                    | "bigserial"
                            ) {
                                default = Expr::Computed;
                            }
                        }
                    }
                }
                (
                    P::AddColumn {
                        default,
                        constraints,
                        generated,
                    },
                    cstr((*col).colname),
                )
            }
            AT_AddConstraint | AT_AddConstraintRecurse
                if !def.is_null() && (*def).type_ == pg_sys::NodeTag::T_Constraint =>
            {
                let c = def as *mut pg_sys::Constraint;
                (
                    P::AddConstraint {
                        not_valid: (*c).skip_validation,
                    },
                    String::new(),
                )
            }
            AT_AddIndex | AT_AddIndexConstraint => {
                (P::AddConstraint { not_valid: false }, String::new())
            }
            AT_SetNotNull => (P::SetNotNull, cstr((*cmd).name)),
            AT_ValidateConstraint | AT_ValidateConstraintRecurse => {
                (P::ValidateConstraint, String::new())
            }
            AT_AlterColumnType => {
                let using = if !def.is_null() && (*def).type_ == pg_sys::NodeTag::T_ColumnDef {
                    expr_shape((*(def as *mut pg_sys::ColumnDef)).raw_default)
                } else {
                    Expr::None
                };
                (P::AlterType { using }, cstr((*cmd).name))
            }
            _ => (P::Other, String::new()),
        }
    }
}

/// Whether the DML lock applies to a relation: a table (not a
/// materialized view, whose rows do not replicate) that the peers have
/// already (not one this transaction created or changed).
fn lockable(relid: pg_sys::Oid) -> BdrResult<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT c.relkind IN ('r', 'p')
            AND c.xmin IS DISTINCT FROM pg_catalog.xid(pg_catalog.pg_current_xact_id_if_assigned())
           FROM pg_catalog.pg_class c WHERE c.oid = $1",
        &[relid.into()],
    )?
    .unwrap_or(false))
}

/// Whether a table's UPDATEs replicate with a key the peers find rows by.
fn has_replica_key(relid: pg_sys::Oid) -> BdrResult<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT c.relreplident = 'f'
             OR (c.relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisreplident))
             OR (c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_catalog.pg_index i WHERE i.indrelid = c.oid AND i.indisprimary))
           FROM pg_catalog.pg_class c WHERE c.oid = $1",
        &[relid.into()],
    )?
    .unwrap_or(false))
}

/// What the global DML lock must cover for a statement that replicates:
/// the ALTER TABLE pieces and unique indexes of `bdr_core::dmllock`.
/// Refuses what would send values of a table whose UPDATEs cannot find
/// their rows on the peers.
///
/// # Safety
/// `stmt` is a valid raw utility statement.
pub unsafe fn dml_needs(stmt: *mut pg_sys::Node, sql: &str) -> BdrResult<DmlNeeds> {
    let mut needs = DmlNeeds::default();
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_AlterTableStmt => {
                let a = stmt as *mut pg_sys::AlterTableStmt;
                if (*a).objtype != pg_sys::ObjectType::OBJECT_TABLE {
                    return Ok(needs);
                }
                let relid = existing_relid((*a).relation);
                if relid == pg_sys::InvalidOid {
                    return Ok(needs);
                }
                let pieces: Vec<_> = nodes((*a).cmds)
                    .into_iter()
                    .map(|c| alter_piece(c as *mut pg_sys::AlterTableCmd))
                    .collect();
                let kinds: Vec<_> = pieces.iter().map(|(p, _)| *p).collect();
                if dmlrules::alter_needs_dml_lock(&kinds) && lockable(relid)? {
                    needs.relids.push(relid);
                }
                for (p, col) in pieces {
                    if dmlrules::replicates_values(&p) {
                        if !has_replica_key(relid)? {
                            return Err(BdrError::Refused {
                                msg: format!("{}: the column's values differ from node to node, and the table has no key to send the origin's values by", sql),
                                hint: "Give the table a primary key (or REPLICA IDENTITY FULL) first, or add the column without a default and fill it with UPDATE.".into(),
                            });
                        }
                        needs.value_columns.push((relid, col));
                    }
                }
            }
            pg_sys::NodeTag::T_IndexStmt => {
                let i = stmt as *mut pg_sys::IndexStmt;
                if dmlrules::index_needs_dml_lock((*i).unique, (*i).concurrent) {
                    let relid = existing_relid((*i).relation);
                    if relid != pg_sys::InvalidOid && lockable(relid)? {
                        needs.relids.push(relid);
                    }
                }
            }
            _ => {}
        }
    }
    Ok(needs)
}

/// After a statement that computed values each node would compute
/// differently (a volatile default, a USING expression) ran under the DML
/// lock: sends this node's values as row changes, which replicate after
/// the statement and overwrite what each peer computed itself.
pub fn send_values(columns: &[(pg_sys::Oid, String)]) {
    for (relid, col) in columns {
        let r = crate::pg::user::as_bdr(|| -> BdrResult<()> {
            let rel =
                Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[(*relid).into()])?
                    .unwrap_or_default();
            // Users' triggers do not fire again for rows that only carry
            // their new column to the peers.
            let was = current_setting(c"session_replication_role");
            Spi::run("SELECT pg_catalog.set_config('session_replication_role', 'replica', true)")?;
            Spi::run(&format!(
                "UPDATE {rel} SET {c} = {c}",
                c = bdr_core::quote::ident(col)
            ))?;
            Spi::run_with_args(
                "SELECT pg_catalog.set_config('session_replication_role', $1, true)",
                &[was.into()],
            )?;
            Ok(())
        });
        if let Err(e) = r {
            crate::fail!(
                ERRCODE_INTERNAL_ERROR,
                "could not send the new values of column {col} to the other nodes: {e}"
            );
        }
    }
}

/// `bdr.truncate_locking`: a TRUNCATE of replicated tables takes the
/// global DML lock on each (with `bdr.ddl_locking` on or dml), so that no
/// node still writes rows the TRUNCATE is to remove everywhere.
///
/// # Safety
/// The utility hook's arguments, before the statement runs.
pub unsafe fn truncate_lock(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const i8,
    context: pg_sys::ProcessUtilityContext::Type,
) {
    if !crate::guc::get_bool(crate::guc::TRUNCATE_LOCKING)
        || (context != pg_sys::ProcessUtilityContext::PROCESS_UTILITY_TOPLEVEL
            && context != pg_sys::ProcessUtilityContext::PROCESS_UTILITY_QUERY)
    {
        return;
    }
    // SAFETY: the caller upholds this function's contract.
    unsafe {
        let stmt = (*pstmt).utilityStmt;
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_TruncateStmt || !in_group() {
            return;
        }
        let rels: Vec<pg_sys::Oid> = nodes((*(stmt as *mut pg_sys::TruncateStmt)).relations)
            .into_iter()
            .map(|rv| rv as *mut pg_sys::RangeVar)
            .filter(|rv| !is_temp(*rv))
            .map(|rv| existing_relid(rv))
            .filter(|r| *r != pg_sys::InvalidOid)
            .collect();
        if rels.is_empty() {
            return;
        }
        let sql = statement_text(pstmt, query_string);
        if !crate::globallock::wants_dml_lock(&sql) {
            return;
        }
        for r in rels {
            if let Err(e) = crate::dmllock::lock_relation(r) {
                e.raise();
            }
        }
    }
}
