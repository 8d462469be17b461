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

mod background;
mod copy;
mod schema;

pub use background::{request_join, run_requested_join};
use copy::*;
use schema::*;

use crate::catalog;
use crate::error::{BdrError, BdrResult};
use crate::pg::latch;
use crate::prereq;
use crate::walrcv::{Conn, PeerError, Received};
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

fn remote<T>(node: &str, what: &str, r: Result<T, PeerError>) -> BdrResult<T> {
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
        BdrError::PeerCommand { msg, .. } if msg.to_string().contains("bdr.") => BdrError::JoinRefused {
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
            msg: PeerError::Answer("no consistent point returned".into()),
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
            msg: PeerError::Answer("no consistent point returned".into()),
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
