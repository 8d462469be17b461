//! Parting a node from its group (`bdr.part_node`) and removing parted
//! nodes' rows everywhere (`bdr.drop_node` of a remote node), and changing a
//! node's connection string everywhere (`bdr.alter_node_interface`).
//!
//! Catalogs are local to each node, so each step is made on every member
//! through its own connection (committed there at once), the local node
//! included: its manager then acts without waiting for the caller's commit.

use crate::catalog::{self, NodeRow};
use crate::error::{BdrError, BdrResult};
use crate::walrcv::{Conn, PeerError};
use bdr_core::lsn;
use bdr_core::naming;
use bdr_core::node::NodeState;
use bdr_core::quote::literal;
use pgrx::prelude::*;

/// How long parting waits for the parting node's changes to reach every
/// member, and for the members to drop what belonged to it.
const PART_TIMEOUT_US: i64 = 120_000_000;

fn connect(node: &NodeRow) -> BdrResult<Conn> {
    Conn::connect(&node.node_dsn, "bdr part").map_err(|msg| BdrError::PeerUnreachable {
        what: format!("node \"{}\"", node.node_name),
        dsn: node.node_dsn.clone(),
        msg,
    })
}

fn remote<T>(node: &NodeRow, what: &str, r: Result<T, PeerError>) -> BdrResult<T> {
    r.map_err(|msg| BdrError::PeerCommand {
        what: what.to_string(),
        node: node.node_name.clone(),
        msg,
    })
}

fn first_text(rows: Vec<Vec<Option<String>>>) -> Option<String> {
    rows.into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
}

fn set_state(conn: &Conn, on: &NodeRow, node_id: u32, state: NodeState) -> BdrResult<()> {
    remote(
        on,
        "recording the parting node's state",
        conn.query(
            &format!(
                "SELECT bdr._set_node_state({node_id}, {})::text",
                state.oid()
            ),
            1,
        ),
    )
    .map(|_| ())
}

/// Polls `sql` (one text column: "t" when done, else what is still
/// missing) on `conn` until it is done.
fn wait_until(conn: &Conn, on: &NodeRow, sql: &str, what: &str) -> BdrResult<()> {
    let deadline = crate::shmem::now() + PART_TIMEOUT_US;
    loop {
        let state = first_text(remote(on, what, conn.query(sql, 1))?).unwrap_or_default();
        if state == "t" {
            return Ok(());
        }
        if crate::shmem::now() > deadline {
            return Err(BdrError::Prerequisite {
                msg: format!("timed out on node \"{}\" {what} ({state})", on.node_name),
                hint: format!(
                    "See bdr.subscription_summary and bdr.worker_errors on node \"{}\"; part_node can be run again.",
                    on.node_name
                ),
            });
        }
        crate::pg::latch::wait(None, 100);
    }
}

pub fn part_impl(node_name: &str, wait_for_completion: bool, force: bool) -> BdrResult<()> {
    let local = catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
    let group =
        catalog::group_name(local.node_group_id)?.ok_or_else(|| BdrError::Prerequisite {
            msg: format!(
                "local node \"{}\" is not a member of a node group",
                local.node_name
            ),
            hint: "Run bdr.part_node on a member of the parting node's group.".into(),
        })?;
    let parting = catalog::node_by_name(node_name)?
        .filter(|n| n.node_group_id == local.node_group_id)
        .ok_or_else(|| BdrError::NoSuchNode(node_name.to_string()))?;
    if parting.node_state == NodeState::Parted {
        notice!("node \"{node_name}\" is already parted");
        return Ok(());
    }
    let mut everyone = catalog::group_peers(&local)?;
    everyone.push(catalog::node_by_id(local.node_id)?.ok_or(BdrError::NoLocalNode)?);
    let members: Vec<NodeRow> = everyone
        .iter()
        .filter(|n| n.node_id != parting.node_id && n.node_state != NodeState::Parted)
        .cloned()
        .collect();
    if members.is_empty() {
        return Err(BdrError::Prerequisite {
            msg: format!("node \"{node_name}\" is the last member of node group \"{group}\""),
            hint: "There is nothing to part from; remove the node with bdr.drop_node().".into(),
        });
    }
    // Every remaining member must hear of it; the parting node only if it can.
    let conns: Vec<(NodeRow, Conn)> = members
        .iter()
        .map(|m| connect(m).map(|c| (m.clone(), c)))
        .collect::<BdrResult<_>>()?;
    let pconn = match connect(&parting) {
        Ok(c) => Some(c),
        Err(_) if force => {
            notice!(
                "node \"{node_name}\" is unreachable; parting it without catching up its last changes"
            );
            None
        }
        Err(e) => {
            return Err(BdrError::Prerequisite {
                msg: e.to_string(),
                hint: "If the node will not come back, part it with force => true.".into(),
            })
        }
    };

    for (m, c) in &conns {
        set_state(c, m, parting.node_id, NodeState::PartStart)?;
    }
    if let Some(pc) = &pconn {
        set_state(pc, &parting, parting.node_id, NodeState::PartStart)?;
        // Catch-up: everything the parting node committed so far reaches
        // every member before it goes, so that a change it sent to some
        // members only is not lost on the others.
        for (m, c) in &conns {
            set_state(c, m, parting.node_id, NodeState::Parting)?;
        }
        set_state(pc, &parting, parting.node_id, NodeState::Parting)?;
        for (m, c) in &conns {
            remote(
                m,
                "resuming the subscription from the parting node",
                c.query(
                    &format!(
                        "SELECT bdr._set_subscription_enabled(sub_name, true)::text FROM bdr.subscription_summary WHERE origin_name = {}",
                        literal(&parting.node_name)
                    ),
                    1,
                ),
            )?;
        }
        let end = first_text(remote(
            &parting,
            "reading its WAL position",
            pc.query("SELECT bdr._wal_insert_end_lsn()::text", 1),
        )?)
        .and_then(|l| lsn::parse(&l))
        .unwrap_or(0);
        // Members still joining do not stream from it yet: their join
        // brings them its changes.
        for (m, _) in conns
            .iter()
            .filter(|(m, _)| m.node_state.is_streamed_from())
        {
            let slot = naming::slot_name(&parting.dbname, &group, &m.node_name);
            wait_until(
                pc,
                &parting,
                &format!(
                    "SELECT COALESCE((SELECT CASE WHEN confirmed_flush_lsn >= {0}::pg_lsn THEN 't'
                                                  ELSE format('slot %s has confirmed %s of %s; active: %s', slot_name, confirmed_flush_lsn, {0}, active) END
                                        FROM pg_catalog.pg_replication_slots WHERE slot_name = {1}), 't')",
                    literal(&lsn::format(end)),
                    literal(&slot)
                ),
                &format!(
                    "waiting for node \"{}\" to receive the last changes of node \"{node_name}\"",
                    m.node_name
                ),
            )?;
        }
    }
    if pconn.is_none() {
        // Down: what it sent to some members but not to others comes from
        // the member that received the most of it.
        for (m, c) in &conns {
            set_state(c, m, parting.node_id, NodeState::PartCatchup)?;
        }
        catch_up_from_most_advanced(&parting, &group, &conns)?;
    }
    for (m, c) in &conns {
        set_state(c, m, parting.node_id, NodeState::Parted)?;
    }
    if let Some(pc) = &pconn {
        set_state(pc, &parting, parting.node_id, NodeState::Parted)?;
    }
    if !wait_for_completion {
        return Ok(());
    }
    // Each member's manager drops its slot for the parted node and its
    // origin for it; the parted node drops all of its own.
    for (m, c) in &conns {
        let slot = naming::slot_name(&m.dbname, &group, &parting.node_name);
        let origin = naming::origin_name(&m.dbname, &group, &parting.node_name);
        wait_until(
            c,
            m,
            &format!(
                "SELECT CASE WHEN NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = {0})
                              AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = {1})
                        THEN 't' ELSE 'slot ' || {0} || ' or origin ' || {1} || ' still exists' END",
                literal(&slot),
                literal(&origin)
            ),
            &format!("waiting for the slot and origin of node \"{node_name}\" to be dropped"),
        )?;
    }
    if let Some(pc) = &pconn {
        let prefix = naming::slot_name(&parting.dbname, &group, "");
        wait_until(
            pc,
            &parting,
            &format!(
                "SELECT COALESCE('slots left: ' || string_agg(slot_name::text, ', '), 't')
                   FROM pg_catalog.pg_replication_slots
                  WHERE database = current_database() AND plugin = 'bdr'
                    AND starts_with(slot_name::text, {})",
                literal(&prefix)
            ),
            "waiting for its slots to be dropped",
        )?;
    }
    Ok(())
}

/// The parting node is down: finds the member that has applied the most of
/// its stream (the streams are ordered, so that member has everything any
/// member has), and replays on every other member the rows and deletes
/// whose last writer there is the parting node. Each is applied with the
/// parting node's commit timestamp (under the `bdr_local` origin, so it also
/// replicates) unless the member holds a newer version: applying what a
/// member already has changes nothing.
fn catch_up_from_most_advanced(
    parting: &NodeRow,
    group: &str,
    conns: &[(NodeRow, Conn)],
) -> BdrResult<()> {
    let mut best: Option<(usize, u64, String)> = None;
    for (i, (m, c)) in conns.iter().enumerate() {
        let origin = naming::origin_name(&m.dbname, group, &parting.node_name);
        let rows = remote(
            m,
            "reading replication progress",
            c.query(
                &format!(
                    "SELECT COALESCE(pg_catalog.pg_replication_origin_progress(o.roname, true), '0/0')::text, o.roident::text
                       FROM pg_catalog.pg_replication_origin o WHERE o.roname = {}",
                    literal(&origin)
                ),
                2,
            ),
        )?;
        let Some(r) = rows.into_iter().next() else {
            continue;
        };
        let lsn = r[0].as_deref().and_then(lsn::parse).unwrap_or(0);
        let roident = r[1].clone().unwrap_or_default();
        if best.as_ref().is_none_or(|b| lsn > b.1) {
            best = Some((i, lsn, roident));
        }
    }
    let Some((ai, _, roident)) = best else {
        return Ok(());
    };
    let (a, ac) = &conns[ai];
    let tables: Vec<String> = remote(
        a,
        "listing tables",
        ac.query(
            "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c
               JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind = 'r' AND c.relpersistence = 'p'
                AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'bdr') AND n.nspname NOT LIKE 'pg\\_%'",
            1,
        ),
    )?
    .into_iter()
    .filter_map(|r| r.into_iter().next().flatten())
    .collect();
    // (table, row as jsonb text or key hash, commit time, is a delete)
    let mut changes: Vec<(String, String, String, bool)> = Vec::new();
    for t in &tables {
        for r in remote(
            a,
            "reading the parted node's rows",
            ac.query(
                &format!(
                    "SELECT to_jsonb(t)::text, x.timestamp::text FROM ONLY {t} t
                      CROSS JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(t.xmin) x
                     WHERE x.roident = {roident}"
                ),
                2,
            ),
        )? {
            if let (Some(row), Some(ts)) = (r[0].clone(), r[1].clone()) {
                changes.push((t.clone(), row, ts, false));
            }
        }
    }
    for r in remote(
        a,
        "reading the parted node's deletes",
        ac.query(
            &format!(
                "SELECT format('%I.%I', n.nspname, c.relname), tb.key_hash, x.timestamp::text
                   FROM bdr.tombstone tb
                   JOIN pg_catalog.pg_class c ON c.oid = tb.relid
                   JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                  CROSS JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(tb.xmin) x
                  WHERE x.roident = {roident}"
            ),
            3,
        ),
    )? {
        if let (Some(t), Some(k), Some(ts)) = (r[0].clone(), r[1].clone(), r[2].clone()) {
            changes.push((t, k, ts, true));
        }
    }
    // Oldest first, as the parted node committed them.
    changes.sort_by(|x, y| x.2.cmp(&y.2));
    if changes.is_empty() {
        return Ok(());
    }
    for (i, (m, c)) in conns.iter().enumerate() {
        if i == ai {
            continue;
        }
        let what = "catching up the parted node's changes";
        let command = |sql: &str| remote(m, what, c.command(sql));
        // walrcv_exec wants the exact column count of what returns rows.
        let select = |sql: &str| remote(m, what, c.query(sql, 1).map(|_| ()));
        let begin = format!("BEGIN; {}", crate::tombstone::canonical_output_sql());
        select(&format!(
            "SELECT pg_catalog.pg_replication_origin_session_setup({})",
            bdr_core::quote::literal(bdr_core::hlc::LOCAL_ORIGIN)
        ))?;
        let mut result = Ok(());
        for (t, v, ts, deleted) in &changes {
            let apply = if *deleted {
                format!(
                    "SELECT bdr._catchup_delete({}::regclass, {}, {}::timestamptz)",
                    literal(t),
                    literal(v),
                    literal(ts)
                )
            } else {
                format!(
                    "SELECT bdr._catchup_row({}::regclass, {}::jsonb, {}::timestamptz)",
                    literal(t),
                    literal(v),
                    literal(ts)
                )
            };
            result = (|| {
                command(&begin)?;
                select(&format!(
                    "SELECT pg_catalog.pg_replication_origin_xact_setup('0/0', {}::timestamptz)",
                    literal(ts)
                ))?;
                select(&apply)?;
                command("COMMIT")
            })();
            if result.is_err() {
                let _ = command("ROLLBACK");
                break;
            }
        }
        let _ = select("SELECT pg_catalog.pg_replication_origin_session_reset()");
        result?;
        notice!(
            "node \"{}\" caught up {} change(s) of node \"{}\" from node \"{}\"",
            m.node_name,
            changes.len(),
            parting.node_name,
            a.node_name
        );
    }
    Ok(())
}

/// Drops this node's slot for `node` and its origin for it, once its row
/// goes: nothing would name them afterwards.
pub fn drop_artifacts_of(node: &NodeRow) -> BdrResult<()> {
    let Some(local) = catalog::local_node()? else {
        return Ok(());
    };
    let Some(group) = catalog::group_name(local.node_group_id)? else {
        return Ok(());
    };
    let db: String = Spi::connect(|c| {
        c.select("SELECT current_database()::text", None, &[])?
            .first()
            .get_one::<String>()
    })?
    .unwrap_or_default();
    let slot = naming::slot_name(&db, &group, &node.node_name);
    let origin = naming::origin_name(&db, &group, &node.node_name);
    Spi::run_with_args(
        "SELECT bdr._drop_parted_artifacts(ARRAY[$1], ARRAY[$2])",
        &[slot.as_str().into(), origin.as_str().into()],
    )?;
    Ok(())
}

/// After dropping a parted node's rows locally, drops them on every other
/// member too, so that the name can join again.
pub fn drop_everywhere(node: &NodeRow, force: bool) -> BdrResult<()> {
    let Some(local) = catalog::local_node()? else {
        return Ok(());
    };
    for m in catalog::group_peers(&local)?
        .into_iter()
        .filter(|m| m.node_id != node.node_id && m.node_state != NodeState::Parted)
    {
        match connect(&m) {
            Ok(c) => {
                remote(
                    &m,
                    "dropping the node",
                    c.query(
                        &format!("SELECT bdr._drop_node_rows({})::text", node.node_id),
                        1,
                    ),
                )?;
            }
            Err(e) if force => warning!("{e}; drop node \"{}\" there later", node.node_name),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn alter_interface_impl(node_name: &str, interface_dsn: &str) -> BdrResult<()> {
    bdr_core::dsn::Dsn::parse(interface_dsn).map_err(|err| BdrError::BadDsn {
        dsn: interface_dsn.to_string(),
        err,
    })?;
    let node = catalog::node_by_name(node_name)?
        .ok_or_else(|| BdrError::NoSuchNode(node_name.to_string()))?;
    let local = catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
    let set = format!(
        "SELECT bdr._set_node_dsn({}, {})::text",
        node.node_id,
        literal(interface_dsn)
    );
    // Every other member first (they connect to the node with it), then here.
    for m in catalog::group_peers(&local)?
        .into_iter()
        .filter(|m| m.node_state != NodeState::Parted)
    {
        let c = connect(&m)?;
        remote(&m, "changing the node's interface", c.query(&set, 1))?;
    }
    set_dsn(node.node_id, interface_dsn)
}

pub fn set_dsn(node_id: u32, dsn: &str) -> BdrResult<()> {
    Spi::run_with_args(
        "UPDATE bdr.node SET node_dsn = $2 WHERE node_id = $1",
        &[pg_sys::Oid::from(node_id).into(), dsn.into()],
    )?;
    crate::shmem::wake_workers_at_commit();
    Ok(())
}
