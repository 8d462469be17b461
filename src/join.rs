//! Joining a group: `bdr.join_node_group` and `bdr.wait_for_join_completion`.
//!
//! The joiner does the work itself, in the caller's transaction, in an order
//! that loses nothing when the group is idle:
//! 1. slots on the joiner for every member (before this transaction writes,
//!    which logical slot creation requires), so every later local change
//!    reaches them;
//! 2. on every member but the join target: the joiner's node row and a slot
//!    for the joiner;
//! 3. on the join target: the node row, then a slot created with its snapshot
//!    in use on a REPEATABLE READ transaction, under which every table is
//!    copied here. The copy runs under the target's replication origin with
//!    the slot's start as progress, so streaming from the target resumes
//!    exactly after the copied state and the copied rows are not sent on;
//! 4. the group's catalog rows here, then every member marks the joiner
//!    active, and every manager (ours at commit) subscribes to the others.

use crate::catalog;
use crate::error::{BdrError, BdrResult};
use crate::pg::latch;
use crate::prereq;
use crate::walrcv::{Conn, Received};
use bdr_core::lsn;
use bdr_core::naming;
use bdr_core::node::NodeState;
use bdr_core::quote::{self, ident, literal};
use pgrx::callbacks::{register_xact_callback, PgXactCallbackEvent};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::{CStr, CString};

#[derive(Debug, Clone)]
struct Member {
    id: u32,
    name: String,
    dsn: String,
    dbname: String,
    state: NodeState,
}

struct Table {
    schema: String,
    name: String,
    columns: Vec<String>,
}

impl Table {
    fn qualified(&self) -> String {
        format!("{}.{}", ident(&self.schema), ident(&self.name))
    }
    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| ident(c))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn connect(what: &str, dsn: &str) -> BdrResult<Conn> {
    Conn::connect(dsn, "bdr join").map_err(|msg| BdrError::PeerUnreachable {
        what: what.to_string(),
        dsn: dsn.to_string(),
        msg,
    })
}

fn remote<T>(node: &str, what: &str, r: Result<T, String>) -> BdrResult<T> {
    r.map_err(|msg| BdrError::PeerCommand {
        what: what.to_string(),
        node: node.to_string(),
        msg,
    })
}

fn parse_oid(s: &Option<String>) -> u32 {
    s.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn text(s: &Option<String>) -> String {
    s.clone().unwrap_or_default()
}

fn my_database() -> String {
    Spi::connect(|c| {
        c.select("SELECT current_database()::text", None, &[])?
            .first()
            .get_one::<String>()
    })
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// Tables of the target that replicate: ordinary persistent tables outside
/// the system schemas and bdr, with their replicated columns.
fn target_tables(conn: &Conn, target: &str) -> BdrResult<Vec<Table>> {
    let rows = remote(
        target,
        "listing tables",
        conn.query(
            "SELECT n.nspname::text, c.relname::text,
                    array_to_string(array_agg(quote_ident(a.attname) ORDER BY a.attnum), ',')
               FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
                    AND NOT a.attisdropped AND a.attgenerated = ''
              WHERE c.relkind = 'r' AND c.relpersistence = 'p'
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'bdr')
                AND n.nspname NOT LIKE 'pg\\_%'
              GROUP BY 1, 2 ORDER BY 1, 2",
            3,
        ),
    )?;
    Ok(rows
        .iter()
        .map(|r| Table {
            schema: text(&r[0]),
            name: text(&r[1]),
            // quote_ident output, split back; names with commas are quoted.
            columns: quote::split_ident_list(&text(&r[2])),
        })
        .collect())
}

fn check_local_tables(tables: &[Table], synchronize_structure: &str) -> BdrResult<()> {
    for t in tables {
        let q = format!(
            "SELECT pg_catalog.to_regclass({})::oid",
            literal(&t.qualified())
        );
        let exists = Spi::connect(|c| c.select(&q, None, &[])?.first().get_one::<pg_sys::Oid>())?;
        let Some(oid) = exists else {
            return Err(if synchronize_structure == "all" {
                BdrError::NotSupported(format!(
                    "copying the schema to a joining node (table {} is missing here; synchronize_structure 'all')",
                    t.qualified()
                ))
            } else {
                BdrError::JoinRefused {
                    msg: format!(
                        "table {} of the group does not exist on this node",
                        t.qualified()
                    ),
                    hint: "Create the group's tables on the joining node before joining.".into(),
                }
            });
        };
        let q = format!("SELECT EXISTS (SELECT 1 FROM ONLY {})", t.qualified());
        let has_rows = Spi::connect(|c| c.select(&q, None, &[])?.first().get_one::<bool>())?;
        if has_rows == Some(true) {
            return Err(BdrError::JoinRefused {
                msg: format!("table {} is not empty on the joining node", t.qualified()),
                hint: "A joining node receives the group's rows; start from empty tables.".into(),
            });
        }
        let _ = oid;
    }
    Ok(())
}

/// `synchronize_structure => 'all'` copies the schema, so the joining
/// database must not have tables of its own.
fn check_no_local_tables() -> BdrResult<()> {
    // A read-only query: Spi::get_one would assign a transaction id, and
    // then this transaction could not create its slots.
    let names: Option<String> = Spi::connect(|c| {
        c.select(
            "SELECT string_agg(format('%I.%I', n.nspname, c.relname), ', ' ORDER BY 1)
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'bdr')
                AND n.nspname NOT LIKE 'pg\\_%'",
            None,
            &[],
        )?
        .first()
        .get_one::<String>()
    })?;
    match names {
        None => Ok(()),
        Some(names) => Err(BdrError::JoinRefused {
            msg: format!(
                "the joining database already has tables ({names}); synchronize_structure 'all' copies the group's schema into an empty database"
            ),
            hint: "Join from a database that has only the bdr extension and its node, or keep these tables (they must match the group's) with synchronize_structure => 'none'.".into(),
        }),
    }
}

/// The directory of this server's programs (pg_dump is there).
fn bin_dir() -> std::path::PathBuf {
    // SAFETY: my_exec_path is a NUL-terminated path set at backend start.
    let exe = unsafe {
        CStr::from_ptr(std::ptr::addr_of!(pg_sys::my_exec_path) as *const std::ffi::c_char)
    };
    std::path::Path::new(&*exe.to_string_lossy())
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default()
}

/// Copies the join target's schema as of `snapshot` (exported from the
/// transaction the data is copied in): pg_dump --schema-only, run inside
/// this transaction. bdr's own objects are the extension's and not dumped;
/// the tombstone triggers are made by bdr's event trigger as the tables are
/// created here.
/// This database's encoding, which the dump is asked to use.
fn server_encoding() -> String {
    // SAFETY: returns a static string for the database's encoding.
    unsafe { CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) }
        .to_string_lossy()
        .into_owned()
}

fn copy_schema(target: &Member, snapshot: &str) -> BdrResult<()> {
    let pg_dump = bin_dir().join("pg_dump");
    let out = std::process::Command::new(&pg_dump)
        .args([
            "--schema-only",
            "--no-publications",
            "--no-subscriptions",
            // bdr's schema comes with the extension, which exists here.
            "--exclude-schema=bdr",
            "--encoding",
            &server_encoding(),
            "--snapshot",
            snapshot,
            "--dbname",
            &target.dsn,
        ])
        .output()
        .map_err(|e| BdrError::Prerequisite {
            msg: format!("could not run {}: {e}", pg_dump.display()),
            hint: "synchronize_structure 'all' needs pg_dump next to the postgres program; or create the tables yourself and join with synchronize_structure => 'none'.".into(),
        })?;
    if !out.status.success() {
        return Err(BdrError::PeerCommand {
            what: "dumping the schema".into(),
            node: target.name.clone(),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    let dump = String::from_utf8_lossy(&out.stdout);
    let sql = bdr_core::dump::schema_script(&dump);
    Spi::run(&sql).map_err(|e| BdrError::JoinRefused {
        msg: format!("could not create the group's schema here: {e}"),
        hint: "Roles that own or are granted objects must exist on the joining node; create them and join again.".into(),
    })?;
    Ok(())
}

fn slot_exists_local(name: &str) -> BdrResult<bool> {
    Ok(Spi::connect(|c| {
        c.select(
            "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            None,
            &[name.into()],
        )
        .map(|t| !t.is_empty())
    })?)
}

fn slot_exists_remote(conn: &Conn, node: &str, name: &str) -> BdrResult<bool> {
    let rows = remote(
        node,
        "looking up a slot",
        conn.query(
            &format!(
                "SELECT slot_name::text FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
                literal(name)
            ),
            1,
        ),
    )?;
    Ok(!rows.is_empty())
}

fn register_on(conn: &Conn, m: &Member, me: &Member, group_id: u32) -> BdrResult<()> {
    remote(
        &m.name,
        "registering the joining node",
        conn.query(
            &format!(
                "SELECT bdr._join_register({}, {}, {}, {}, {})::text",
                me.id,
                literal(&me.name),
                literal(&me.dsn),
                literal(&me.dbname),
                group_id
            ),
            1,
        ),
    )
    .map(|_| ())
}

thread_local! {
    static COPY_SRC: RefCell<Option<CopySrc>> = const { RefCell::new(None) };
}

struct CopySrc {
    conn: *mut Conn,
    buf: Vec<u8>,
    pos: usize,
    done: bool,
}

/// Feeds COPY FROM with what the join target's COPY TO sends.
#[pg_guard]
unsafe extern "C-unwind" fn copy_read(
    outbuf: *mut std::ffi::c_void,
    minread: std::ffi::c_int,
    maxread: std::ffi::c_int,
) -> std::ffi::c_int {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        COPY_SRC.with(|s| {
            let mut s = s.borrow_mut();
            let Some(src) = s.as_mut() else { return 0 };
            let out = outbuf as *mut u8;
            let mut n = 0usize;
            while n < (minread.max(1) as usize) {
                if src.pos < src.buf.len() {
                    let k = (maxread as usize - n).min(src.buf.len() - src.pos);
                    std::ptr::copy_nonoverlapping(src.buf.as_ptr().add(src.pos), out.add(n), k);
                    src.pos += k;
                    n += k;
                    continue;
                }
                if src.done {
                    break;
                }
                match (*src.conn).receive() {
                    Received::Data(d) => {
                        src.buf = d.to_vec();
                        src.pos = 0;
                    }
                    Received::WouldBlock(fd) => latch::wait(Some(fd), 1000),
                    Received::End => src.done = true,
                }
            }
            n as std::ffi::c_int
        })
    }
}

/// Copies one table from the target's COPY stream into the local table.
fn copy_table(conn: &mut Conn, target: &str, t: &Table) -> BdrResult<u64> {
    let source = format!("COPY {} ({}) TO STDOUT", t.qualified(), t.column_list());
    copy_into(conn, target, t, &source)
}

/// Copies what the target's `source` (a COPY ... TO STDOUT) sends into the
/// local table `t` (its `columns`).
fn copy_into(conn: &mut Conn, target: &str, t: &Table, source: &str) -> BdrResult<u64> {
    remote(
        target,
        &format!("copying {}", t.qualified()),
        conn.start_copy(source),
    )?;
    let qualified = CString::new(t.qualified()).unwrap_or_default();
    COPY_SRC.with(|s| {
        *s.borrow_mut() = Some(CopySrc {
            conn: conn as *mut Conn,
            buf: Vec::new(),
            pos: 0,
            done: false,
        })
    });
    // SAFETY: COPY FROM into a table opened here with the lock INSERT takes;
    // the column list is built from palloc'd strings, as the parser would.
    let n = unsafe {
        let rv =
            pg_sys::makeRangeVarFromNameList(pg_sys::stringToQualifiedNameList(qualified.as_ptr()));
        let relid = pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::RowExclusiveLock as i32,
            0,
            None,
            std::ptr::null_mut(),
        );
        let rel = pg_sys::table_open(relid, pg_sys::NoLock as i32);
        let mut cols: *mut pg_sys::List = std::ptr::null_mut();
        for c in &t.columns {
            let cs = CString::new(c.as_str()).unwrap_or_default();
            cols = pg_sys::lappend(
                cols,
                pg_sys::makeString(pg_sys::pstrdup(cs.as_ptr())).cast(),
            );
        }
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        pg_sys::addRangeTableEntryForRelation(
            pstate,
            rel,
            pg_sys::RowExclusiveLock as i32,
            std::ptr::null_mut(),
            false,
            false,
        );
        // The target sends in this database's encoding (the connection asks
        // for it), whatever the caller's client_encoding.
        let encoding = pg_sys::makeDefElem(
            pg_sys::pstrdup(c"encoding".as_ptr()),
            pg_sys::makeString(pg_sys::pstrdup(pg_sys::GetDatabaseEncodingName())).cast(),
            -1,
        );
        let options = pg_sys::lappend(std::ptr::null_mut(), encoding.cast());
        let cstate = pg_sys::BeginCopyFrom(
            pstate,
            rel,
            std::ptr::null_mut(),
            std::ptr::null(),
            false,
            Some(copy_read),
            cols,
            options,
        );
        let n = pg_sys::CopyFrom(cstate);
        pg_sys::EndCopyFrom(cstate);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        n
    };
    // Drain what is left of the COPY (its end) so the connection is usable.
    COPY_SRC.with(|s| {
        if let Some(src) = s.borrow_mut().as_mut() {
            while !src.done {
                // SAFETY: the connection outlives this loop (borrowed above).
                match unsafe { (*src.conn).receive() } {
                    Received::Data(_) => {}
                    Received::WouldBlock(fd) => latch::wait(Some(fd), 1000),
                    Received::End => src.done = true,
                }
            }
        }
        *s.borrow_mut() = None;
    });
    Ok(n)
}

/// The copied rows commit here with the earliest timestamp (any later
/// change must win against them), but a change that streams in later may
/// be older than a row's real last write on the target. So the real writer
/// (commit time and node) of every copied row, and of every delete the
/// target still remembers, is copied too (`bdr.copied_row`): the writers
/// resolve against it as the target does. Runs in the copy's snapshot.
fn copy_row_writers(tconn: &mut Conn, target: &Member, tables: &[Table]) -> BdrResult<()> {
    // Keys print as the tombstone trigger prints them.
    remote(
        &target.name,
        "preparing the copy",
        tconn.command(&crate::tombstone::canonical_output_sql()),
    )?;
    let dest = Table {
        schema: "bdr".into(),
        name: "copied_row".into(),
        columns: ["relid", "key_hash", "commit_us", "node_id", "deleted"]
            .map(String::from)
            .to_vec(),
    };
    // The node behind a row's replication origin on the target; rows the
    // target copied at its own join have their real writer in its
    // bdr.copied_row.
    let writer = |ts: &str, origin: &str| {
        format!(
            "((EXTRACT(epoch FROM {ts}) - 946684800) * 1000000)::int8,
             CASE WHEN {origin} = 0 THEN {0}::oid
                  ELSE (SELECT CASE WHEN {1} THEN {0}::oid ELSE s.origin_node_id END
                          FROM pg_catalog.pg_replication_origin o
                          LEFT JOIN bdr.subscription s ON s.origin_name = o.roname
                         WHERE o.roident = {origin}) END",
            target.id,
            bdr_core::hlc::local_origin_sql("o.roname")
        )
    };
    for t in tables {
        let local: Option<pg_sys::Oid> = Spi::connect(|c| {
            c.select(
                &format!(
                    "SELECT pg_catalog.to_regclass({})::oid",
                    literal(&t.qualified())
                ),
                None,
                &[],
            )?
            .first()
            .get_one::<pg_sys::Oid>()
        })?;
        let Some(local) = local else { continue };
        let rel = literal(&t.qualified());
        let source = format!(
            "COPY (
               SELECT {local}, h.key_hash, COALESCE(c.commit_us, w.commit_us), COALESCE(c.node_id, w.node_id), false
                 FROM ONLY {q} t
                 CROSS JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(t.xmin) x
                 CROSS JOIN LATERAL (SELECT pg_catalog.md5(bdr._key_text({rel}::regclass, t)) AS key_hash) h
                 CROSS JOIN LATERAL (SELECT {w}) AS w(commit_us, node_id)
                 LEFT JOIN LATERAL (SELECT c.commit_us, c.node_id FROM bdr.copied_row c
                                     WHERE c.relid = {rel}::regclass AND c.key_hash = h.key_hash
                                       AND NOT c.deleted AND x.timestamp = '2000-01-01 00:00:00.000001+00'
                                     LIMIT 1) c ON true
                WHERE h.key_hash IS NOT NULL
               UNION ALL
               SELECT {local}, tb.key_hash, w.commit_us, w.node_id, true
                 FROM bdr.tombstone tb
                 CROSS JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(tb.xmin) x
                 CROSS JOIN LATERAL (SELECT {w}) AS w(commit_us, node_id)
                WHERE tb.relid = {rel}::regclass
               UNION ALL
               SELECT {local}, c.key_hash, c.commit_us, c.node_id, true
                 FROM bdr.copied_row c WHERE c.relid = {rel}::regclass AND c.deleted
             ) TO STDOUT",
            local = local.to_u32(),
            q = t.qualified(),
            w = writer("x.timestamp", "x.roident"),
        );
        copy_into(tconn, &target.name, &dest, &source)?;
    }
    Ok(())
}

/// Until this transaction ends, everything it writes is tagged with the join
/// target's origin (so the copy is not streamed to anyone) and its commit
/// records `lsn` as that origin's progress.
fn use_origin_until_end_of_transaction(origin_name: &str, lsn: u64) {
    let name = CString::new(origin_name).unwrap_or_default();
    // SAFETY: origin creation is transactional; the session setup is undone
    // by the callbacks below whether the transaction commits or aborts.
    unsafe {
        if pg_sys::replorigin_session_origin != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            // An earlier attempt in this transaction (e.g. in an exception
            // block) left its session behind.
            pg_sys::replorigin_session_reset();
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
        }
        let mut id = pg_sys::replorigin_by_name(name.as_ptr(), true);
        if id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            id = pg_sys::replorigin_create(name.as_ptr());
        }
        pg_sys::replorigin_session_setup(id);
        pg_sys::replorigin_session_origin = id;
        pg_sys::replorigin_session_origin_lsn = lsn;
        // The copied rows are the target's state as of the slot's start:
        // every change that streams in after it is newer, whatever the
        // clocks say. So they get the earliest commit time there is (0
        // would mean "now" to PostgreSQL), not the time of the join.
        pg_sys::replorigin_session_origin_timestamp = 1;
    }
    let reset = || {
        // SAFETY: undoes the session setup above once the commit record (with
        // the origin) is written, or the transaction is gone.
        unsafe {
            pg_sys::replorigin_session_reset();
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
            pg_sys::replorigin_session_origin_lsn = 0;
            pg_sys::replorigin_session_origin_timestamp = 0;
        }
    };
    register_xact_callback(PgXactCallbackEvent::Commit, reset);
    register_xact_callback(PgXactCallbackEvent::Abort, reset);
    register_xact_callback(PgXactCallbackEvent::Prepare, reset);
}

/// How long a join waits for its target to apply another member's changes.
const CATCH_UP_TIMEOUT_MS: i64 = 300_000;

/// Waits until the join target has applied member `m`'s changes up to
/// `lsn` (the member's slot for the target has confirmed it).
fn wait_until_applied_by_target(
    conn: &Conn,
    tconn: &Conn,
    m: &Member,
    target_name: &str,
    target_slot: &str,
    lsn: u64,
) -> BdrResult<()> {
    let deadline = crate::shmem::now() + CATCH_UP_TIMEOUT_MS * 1000;
    loop {
        // A target that went away will never catch up: fail at once.
        remote(
            target_name,
            "waiting for the join target",
            tconn.query("SELECT 1", 1),
        )?;
        let rows = remote(
            &m.name,
            "reading the join target's progress",
            conn.query(
                &format!(
                    "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
                    literal(target_slot)
                ),
                1,
            ),
        )?;
        let confirmed = rows
            .first()
            .and_then(|r| r[0].as_deref())
            .and_then(lsn::parse)
            .unwrap_or(0);
        if confirmed >= lsn {
            return Ok(());
        }
        if crate::shmem::now() > deadline {
            return Err(BdrError::JoinRefused {
                msg: format!(
                    "the join target \"{target_name}\" has not applied the changes of node \"{}\" up to {} (it has confirmed {})",
                    m.name,
                    lsn::format(lsn),
                    lsn::format(confirmed)
                ),
                hint: format!(
                    "Check on \"{target_name}\" that it replicates from \"{}\" (bdr.subscription_summary, bdr.worker_errors), then join again.",
                    m.name
                ),
            });
        }
        crate::pg::latch::wait(None, 100);
    }
}

/// What a join checks before it contacts anyone, in the session (also for
/// a background join): returns `synchronize_structure` normalized and the
/// local node, which must be in no group.
fn check_join_args(
    join_target_dsn: &str,
    pause_in_standby: bool,
    synchronize_structure: &str,
) -> BdrResult<(String, catalog::LocalNode)> {
    prereq::check()?;
    if pause_in_standby {
        return Err(BdrError::NotSupported(
            "joining as a standby (pause_in_standby)".into(),
        ));
    }
    let sync = synchronize_structure.to_ascii_lowercase();
    if sync != "all" && sync != "none" {
        return Err(BdrError::InvalidValue {
            what: "synchronize_structure",
            msg: format!("\"{synchronize_structure}\" is not one of 'all', 'none'"),
        });
    }
    bdr_core::dsn::Dsn::parse(join_target_dsn).map_err(|err| BdrError::BadDsn {
        dsn: join_target_dsn.to_string(),
        err,
    })?;
    let local = catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
    if let Some(g) = catalog::group_name(local.node_group_id)? {
        return Err(BdrError::AlreadyInGroup {
            node: local.node_name,
            group: g,
        });
    }
    Ok((sync, local))
}

pub fn join_impl(
    join_target_dsn: &str,
    node_group_name: Option<&str>,
    pause_in_standby: bool,
    synchronize_structure: &str,
) -> BdrResult<()> {
    let (sync, local) = check_join_args(join_target_dsn, pause_in_standby, synchronize_structure)?;
    // One join at a time in this database (a session's and the manager's
    // background one). A plain SELECT: this transaction must not take a
    // transaction id before it creates its slots.
    let locked: Option<bool> = Spi::connect(|c| {
        c.select(
            "SELECT pg_catalog.pg_try_advisory_xact_lock(pg_catalog.hashtext('bdr join'), 0)",
            None,
            &[],
        )?
        .first()
        .get_one::<bool>()
    })?;
    if locked != Some(true) {
        return Err(BdrError::JoinRefused {
            msg: "another join of this node is running".into(),
            hint: "Wait for it with bdr.wait_for_join_completion().".into(),
        });
    }
    let me_row = catalog::node_by_id(local.node_id)?.ok_or(BdrError::NoLocalNode)?;
    let me = Member {
        id: local.node_id,
        name: local.node_name.clone(),
        dsn: me_row.node_dsn.clone(),
        dbname: my_database(),
        state: NodeState::Active,
    };

    // The target and what it knows of its group.
    let mut tconn = connect("the join target", join_target_dsn)?;
    let rows = remote(
        "join target",
        "reading the group",
        tconn.query(
            "SELECT n.node_id::text, n.node_name::text, g.node_group_id::text, g.node_group_name::text,
                    g.node_group_uuid::text, bdr.bdr_version_num()::text,
                    current_setting('server_version_num')
               FROM bdr.local_node l JOIN bdr.node n USING (node_id)
               LEFT JOIN bdr.node_group g ON g.node_group_id = n.node_group_id",
            7,
        ),
    )
    .map_err(|e| match e {
        BdrError::PeerCommand { msg, .. } if msg.contains("bdr.") => BdrError::JoinRefused {
            msg: format!("the join target is not a BDR node: {msg}"),
            hint: "Point join_target_dsn at a node of the group you want to join.".into(),
        },
        e => e,
    })?;
    let Some(t) = rows.first() else {
        return Err(BdrError::JoinRefused {
            msg: "the join target has no local BDR node".into(),
            hint: "Create a node and a group on the join target first.".into(),
        });
    };
    let target_name = text(&t[1]);
    let group_id = parse_oid(&t[2]);
    let group = text(&t[3]);
    if group_id == 0 {
        return Err(BdrError::JoinRefused {
            msg: format!("the join target node \"{target_name}\" is not a member of a node group"),
            hint: "Create the group on the join target with bdr.create_node_group().".into(),
        });
    }
    if let Some(g) = node_group_name {
        if g != group {
            return Err(BdrError::JoinRefused {
                msg: format!("the join target is a member of node group \"{group}\", not \"{g}\""),
                hint: "Pass the join target's group name, or NULL.".into(),
            });
        }
    }
    let pg_version: u32 = text(&t[6]).parse().unwrap_or(0);
    let version: i32 = text(&t[5]).parse().unwrap_or(0);
    bdr_core::version::join_compatible(
        pg_sys::PG_VERSION_NUM,
        pg_version,
        bdr_core::version::VERSION_NUM,
        version,
    )
    .map_err(|msg| BdrError::JoinRefused {
        msg,
        hint: "Every node of a group runs the same PostgreSQL and bdr major versions.".into(),
    })?;
    let members: Vec<Member> = remote(
        &target_name,
        "reading the members",
        tconn.query(
            &format!(
                "SELECT node_id::text, node_name::text, node_dsn, dbname::text, node_state::text
                   FROM bdr.node WHERE node_group_id = {group_id} ORDER BY node_id"
            ),
            5,
        ),
    )?
    .iter()
    .map(|r| Member {
        id: parse_oid(&r[0]),
        name: text(&r[1]),
        dsn: text(&r[2]),
        dbname: text(&r[3]),
        state: NodeState::from_oid(parse_oid(&r[4])).unwrap_or(NodeState::None),
    })
    .collect();
    // Our own row, left by an earlier attempt that failed after the
    // members recorded us, is fine; another node of that name is not.
    if let Some(m) = members.iter().find(|m| m.name == me.name || m.id == me.id) {
        if m.id != me.id || m.dsn != me.dsn {
            return Err(BdrError::NodeExists(m.name.clone()));
        }
    }
    let peers: Vec<Member> = members
        .iter()
        .filter(|m| m.id != me.id && m.state == NodeState::Active)
        .cloned()
        .collect();
    // Refusals come before anything is created anywhere.
    let target = peers
        .iter()
        .find(|p| p.name == target_name)
        .cloned()
        .ok_or_else(|| BdrError::JoinRefused {
            msg: format!("the join target node \"{target_name}\" is not active in its group"),
            hint: "Join through an active node of the group.".into(),
        })?;
    let tables = target_tables(&tconn, &target_name)?;
    if sync == "all" {
        check_no_local_tables()?;
    } else {
        check_local_tables(&tables, &sync)?;
    }

    // 1. Slots here for every member: before this transaction writes anything.
    for p in &peers {
        let slot = naming::slot_name(&me.dbname, &group, &p.name);
        if !slot_exists_local(&slot)? {
            Spi::connect(|c| {
                c.select(
                    "SELECT pg_catalog.pg_create_logical_replication_slot($1, 'bdr')",
                    None,
                    &[slot.as_str().into()],
                )
                .map(|_| ())
            })?;
        }
    }

    // 2. Every member other than the target learns of us and keeps a slot
    // for us. What a member commits from that slot's start on reaches us
    // through it; what it committed before must be in the target's data
    // when we copy it: so the target must have applied the member's changes
    // up to the slot's start first.
    let target_db = members
        .iter()
        .find(|m| m.name == target_name)
        .map(|m| m.dbname.clone())
        .unwrap_or_default();
    let mut slot_starts: Vec<(Member, u64)> = Vec::new();
    for p in peers.iter().filter(|p| p.name != target_name) {
        let conn = connect(&format!("node \"{}\"", p.name), &p.dsn)?;
        register_on(&conn, p, &me, group_id)?;
        let slot = naming::slot_name(&p.dbname, &group, &me.name);
        let start = if slot_exists_remote(&conn, &p.name, &slot)? {
            remote(
                &p.name,
                "looking up a slot",
                conn.query(
                    &format!(
                        "SELECT confirmed_flush_lsn::text FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
                        literal(&slot)
                    ),
                    1,
                ),
            )?
            .first()
            .and_then(|r| r[0].as_deref())
            .and_then(lsn::parse)
        } else {
            remote(
                &p.name,
                "creating a slot",
                conn.query(
                    &format!(
                        "CREATE_REPLICATION_SLOT {} LOGICAL bdr (SNAPSHOT 'nothing')",
                        ident(&slot)
                    ),
                    4,
                ),
            )?
            .first()
            .and_then(|r| r[1].as_deref())
            .and_then(lsn::parse)
        };
        let start = start.ok_or_else(|| BdrError::PeerCommand {
            what: "creating a slot".into(),
            node: p.name.clone(),
            msg: "no consistent point returned".into(),
        })?;
        let target_slot = naming::slot_name(&p.dbname, &group, &target_name);
        // Shown in the member's bdr.node_summary while the target catches up.
        remote(
            &p.name,
            "recording the joining node's state",
            conn.query(
                &format!(
                    "SELECT bdr._set_node_state({}, {})::text",
                    me.id,
                    NodeState::Catchup.oid()
                ),
                1,
            ),
        )?;
        wait_until_applied_by_target(&conn, &tconn, p, &target_name, &target_slot, start)?;
        slot_starts.push((p.clone(), start));
    }

    // 3. The target: its slot for us, and its schema and data as of that
    // slot's start.
    register_on(&tconn, &target, &me, group_id)?;
    let slot = naming::slot_name(&target.dbname, &group, &me.name);
    if slot_exists_remote(&tconn, &target.name, &slot)? {
        // Left by an earlier attempt that did not finish; its start point is
        // not the state we are about to copy.
        remote(
            &target.name,
            "dropping an unfinished slot",
            tconn.command(&format!("DROP_REPLICATION_SLOT {}", ident(&slot))),
        )?;
    }
    // How far the target has applied each other member, read before its
    // snapshot exists: those changes are in the copy, so streaming from that
    // member starts there (or at its slot's start, if that is later).
    let mut stream_starts: Vec<(u32, u64)> = Vec::new();
    for (p, slot_start) in &slot_starts {
        let origin = naming::origin_name(&target_db, &group, &p.name);
        let progress = remote(
            &target.name,
            "reading replication progress",
            tconn.query(
                &format!(
                    "SELECT pg_catalog.pg_replication_origin_progress({}, true)::text",
                    literal(&origin)
                ),
                1,
            ),
        )?
        .first()
        .and_then(|r| r[0].as_deref())
        .and_then(lsn::parse)
        .unwrap_or(0);
        stream_starts.push((p.id, progress.max(*slot_start)));
    }
    remote(
        &target.name,
        "starting the copy",
        tconn.command("BEGIN READ ONLY ISOLATION LEVEL REPEATABLE READ"),
    )?;
    let created = remote(
        &target.name,
        "creating a slot",
        tconn.query(
            &format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL bdr (SNAPSHOT 'use')",
                ident(&slot)
            ),
            4,
        ),
    )?;
    let start = created
        .first()
        .and_then(|r| r[1].as_deref())
        .and_then(lsn::parse)
        .ok_or_else(|| BdrError::PeerCommand {
            what: "creating a slot".into(),
            node: target.name.clone(),
            msg: "no consistent point returned".into(),
        })?;

    if sync == "all" {
        let snapshot = remote(
            &target.name,
            "exporting the copy's snapshot",
            tconn.query("SELECT pg_catalog.pg_export_snapshot()", 1),
        )?
        .first()
        .and_then(|r| r[0].clone())
        .unwrap_or_default();
        copy_schema(&target, &snapshot)?;
    }
    let target_origin = naming::origin_name(&me.dbname, &group, &target.name);
    use_origin_until_end_of_transaction(&target_origin, start);
    // Rows arrive in any order: foreign keys and triggers are the target's
    // business, as for applied changes.
    Spi::run("SELECT pg_catalog.set_config('session_replication_role', 'replica', true)")?;
    let mut copied = 0u64;
    for t in &tables {
        copied += copy_table(&mut tconn, &target.name, t)?;
    }
    copy_row_writers(&mut tconn, &target, &tables)?;
    crate::hlc::publish_copied();
    remote(&target.name, "finishing the copy", tconn.command("COMMIT"))?;
    Spi::run("SELECT pg_catalog.set_config('session_replication_role', 'origin', true)")?;
    pgrx::notice!(
        "copied {copied} rows of {} tables from node \"{}\"",
        tables.len(),
        target.name
    );

    // 4. The group here, and us in it.
    catalog::lock_nodes()?;
    let uuid = text(&t[4]);
    Spi::run_with_args(
        "INSERT INTO bdr.node_group (node_group_id, node_group_name, node_group_uuid)
         VALUES ($1, $2::name, $3::uuid) ON CONFLICT DO NOTHING",
        &[
            pg_sys::Oid::from(group_id).into(),
            group.as_str().into(),
            uuid.as_str().into(),
        ],
    )?;
    for p in &peers {
        upsert_node(
            p.id,
            &p.name,
            &p.dsn,
            &p.dbname,
            group_id,
            NodeState::Active,
        )?;
    }
    catalog::set_node_group(me.id, group_id, NodeState::Active, members.len() as i32 + 1)?;
    // Whatever join was requested in the background is this one, or moot.
    Spi::run("DELETE FROM bdr.join_request")?;
    for (origin_node, start) in &stream_starts {
        Spi::run_with_args(
            "INSERT INTO bdr.subscription_start (origin_node_id, start_lsn) VALUES ($1, $2::pg_lsn)
             ON CONFLICT (origin_node_id) DO UPDATE SET start_lsn = EXCLUDED.start_lsn",
            &[
                pg_sys::Oid::from(*origin_node).into(),
                lsn::format(*start).as_str().into(),
            ],
        )?;
    }

    for p in &peers {
        let conn = if p.name == target.name {
            None
        } else {
            Some(connect(&format!("node \"{}\"", p.name), &p.dsn)?)
        };
        let c = conn.as_ref().unwrap_or(&tconn);
        remote(
            &p.name,
            "activating the joining node",
            c.query(&format!("SELECT bdr._join_activate({})::text", me.id), 1),
        )?;
    }
    crate::shmem::wake_workers_at_commit();
    Ok(())
}

fn upsert_node(
    id: u32,
    name: &str,
    dsn: &str,
    dbname: &str,
    group_id: u32,
    state: NodeState,
) -> BdrResult<()> {
    let st = pg_sys::Oid::from(state.oid());
    Spi::run_with_args(
        "INSERT INTO bdr.node (node_id, node_name, node_group_id, source_node_id, node_state, target_state,
                               seq_id, dbname, node_dsn, proto_version_ranges)
         VALUES ($1, $2::name, $3, $1, $4, $4, 0, $5::name, $6, ARRAY[$7, $7])
         ON CONFLICT (node_id) DO UPDATE SET node_group_id = EXCLUDED.node_group_id,
                node_state = EXCLUDED.node_state, target_state = EXCLUDED.target_state,
                dbname = EXCLUDED.dbname, node_dsn = EXCLUDED.node_dsn",
        &[
            pg_sys::Oid::from(id).into(),
            name.into(),
            pg_sys::Oid::from(group_id).into(),
            st.into(),
            dbname.into(),
            dsn.into(),
            bdr_core::version::PROTOCOL_VERSION.into(),
        ],
    )?;
    Ok(())
}

/// `wait_for_completion => false`: checks what can be checked here, and
/// leaves the join to this database's manager once this transaction
/// commits. The local node is JOIN_START until it is done.
pub fn request_join(
    join_target_dsn: &str,
    node_group_name: Option<&str>,
    pause_in_standby: bool,
    synchronize_structure: &str,
) -> BdrResult<()> {
    let (sync, local) = check_join_args(join_target_dsn, pause_in_standby, synchronize_structure)?;
    let pending: Option<bool> = Spi::connect(|c| {
        c.select(
            "SELECT EXISTS (SELECT 1 FROM bdr.join_request WHERE last_error IS NULL)",
            None,
            &[],
        )?
        .first()
        .get_one::<bool>()
    })?;
    if pending == Some(true) {
        return Err(BdrError::JoinRefused {
            msg: "a background join of this node is already pending".into(),
            hint: "Wait for it with bdr.wait_for_join_completion().".into(),
        });
    }
    Spi::run_with_args(
        "INSERT INTO bdr.join_request (node_id, join_target_dsn, node_group_name, synchronize_structure)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (node_id) DO UPDATE SET join_target_dsn = EXCLUDED.join_target_dsn,
             node_group_name = EXCLUDED.node_group_name,
             synchronize_structure = EXCLUDED.synchronize_structure,
             requested_at = now(), last_error = NULL, last_error_at = NULL",
        &[
            pg_sys::Oid::from(local.node_id).into(),
            join_target_dsn.into(),
            node_group_name.into(),
            sync.as_str().into(),
        ],
    )?;
    Spi::run_with_args(
        "UPDATE bdr.node SET node_state = $2, target_state = $3 WHERE node_id = $1",
        &[
            pg_sys::Oid::from(local.node_id).into(),
            pg_sys::Oid::from(NodeState::JoinStart.oid()).into(),
            pg_sys::Oid::from(NodeState::Active.oid()).into(),
        ],
    )?;
    crate::shmem::wake_workers_at_commit();
    pgrx::notice!("the join runs in the background; bdr.wait_for_join_completion() waits for it");
    Ok(())
}

/// A join requested with `wait_for_completion => false`, not failed yet.
struct JoinRequest {
    dsn: String,
    group: Option<String>,
    sync: String,
}

fn pending_request() -> BdrResult<Option<JoinRequest>> {
    Spi::connect(|c| -> BdrResult<Option<JoinRequest>> {
        let t = c.select(
            "SELECT r.join_target_dsn, r.node_group_name::text, r.synchronize_structure
               FROM bdr.join_request r JOIN bdr.local_node l USING (node_id)
              WHERE r.last_error IS NULL",
            None,
            &[],
        )?;
        let Some(row) = t.into_iter().next() else {
            return Ok(None);
        };
        Ok(Some(JoinRequest {
            dsn: row.get::<String>(1)?.unwrap_or_default(),
            group: row.get::<String>(2)?,
            sync: row.get::<String>(3)?.unwrap_or_default(),
        }))
    })
}

/// Run by the manager of a database whose local node is in no group: does
/// the join a session requested with `wait_for_completion => false`, in a
/// transaction of its own. A failure is recorded in `bdr.join_request`,
/// which `bdr.wait_for_join_completion()` reports.
pub fn run_requested_join() {
    let req = pgrx::bgworkers::BackgroundWorker::transaction(pending_request);
    let req = match req {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!("could not read the join request: {e}");
            return;
        }
    };
    tracing::info!(
        "joining through {} (requested with wait_for_completion => false)",
        req.dsn
    );
    // A join can take minutes: let a shutdown end it (it is retried when
    // the manager starts again), as any backend's statement would be.
    crate::pg::latch::attach_die_handlers();
    // SAFETY: the join's own transaction, committed or aborted below.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let outcome = pgrx::PgTryBuilder::new(|| {
        join_impl(&req.dsn, req.group.as_deref(), false, &req.sync)
            .and_then(|()| Spi::run("DELETE FROM bdr.join_request").map_err(BdrError::from))
            .map_err(|e| e.to_string())
    })
    .catch_others(|e| Err(crate::error::caught_report(&e).message().to_string()))
    .execute();
    match outcome {
        Ok(()) => {
            // SAFETY: ends the transaction begun above.
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
            }
            tracing::info!("joined through {}", req.dsn);
        }
        Err(msg) => {
            // SAFETY: undoes whatever the join did here (its snapshot too).
            unsafe { pg_sys::AbortCurrentTransaction() };
            tracing::warn!("the join through {} failed: {msg}", req.dsn);
            let r = pgrx::bgworkers::BackgroundWorker::transaction(|| {
                Spi::run_with_args(
                    "UPDATE bdr.join_request SET last_error = $1, last_error_at = now()",
                    &[msg.as_str().into()],
                )?;
                Spi::run_with_args(
                    "UPDATE bdr.node n SET node_state = $1, target_state = $1
                       FROM bdr.local_node l WHERE n.node_id = l.node_id",
                    &[pg_sys::Oid::from(NodeState::Created.oid()).into()],
                )
            });
            if let Err(e) = r {
                tracing::warn!("could not record the failed join: {e}");
            }
        }
    }
    // Back to the manager's own signal handling.
    pgrx::bgworkers::BackgroundWorker::attach_signal_handlers(
        pgrx::bgworkers::SignalWakeFlags::SIGHUP | pgrx::bgworkers::SignalWakeFlags::SIGTERM,
    );
}

pub fn register_impl(
    node_id: u32,
    name: &str,
    dsn: &str,
    dbname: &str,
    group_id: u32,
) -> BdrResult<()> {
    catalog::lock_nodes()?;
    let local = catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
    if local.node_group_id != group_id {
        return Err(BdrError::JoinRefused {
            msg: format!(
                "node \"{}\" is not a member of the group being joined",
                local.node_name
            ),
            hint: "Join through a node of the group.".into(),
        });
    }
    if let Some(other) = catalog::node_by_name(name)? {
        if other.node_id != node_id {
            return Err(BdrError::NodeExists(name.to_string()));
        }
        if other.node_state == NodeState::Active {
            return Ok(());
        }
    }
    upsert_node(node_id, name, dsn, dbname, group_id, NodeState::Joining)
}
