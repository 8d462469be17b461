//! Joining a group: `bdr.join_node_group` and `bdr.wait_for_join_completion`.
//!
//! The joiner does the work itself, in the caller's transaction, in an order
//! that loses nothing when the group is idle (`join_impl` runs the phases):
//! 1. `read_group`: the target, its group and members, what will be copied;
//!    every refusal comes here, before anything is created anywhere;
//! 2. `create_local_slots`: slots on the joiner for every member (before
//!    this transaction writes, which logical slot creation requires), so
//!    every later local change reaches them;
//! 3. `register_with_members`: on every member but the join target, the
//!    joiner's node row and a slot for the joiner, and the target catches up
//!    with that member to the slot's start;
//! 4. `copy_from_target`: on the join target, the node row, then a slot
//!    created with its snapshot in use on a REPEATABLE READ transaction,
//!    under which every table is copied here. The copy runs under the
//!    target's replication origin with the slot's start as progress, so
//!    streaming from the target resumes exactly after the copied state and
//!    the copied rows are not sent on;
//! 5. `record_group`: the group's catalog rows here, and where streaming
//!    from each member starts;
//! 6. `activate_everywhere`: every member marks the joiner active, and every
//!    manager (ours at commit) subscribes to the others.
//!
//! Every statement sent to a peer is a typed call of `crate::peer`.

mod background;
mod checks;
mod copy;
mod schema;
mod wait;

pub use background::{request_join, run_requested_join};
use checks::*;
use copy::*;
use schema::*;
pub use wait::wait_for_completion;

use crate::catalog;
use crate::error::{BdrError, BdrResult};
use crate::peer::{Member, Peer, SlotSnapshot, Table};
use crate::pg::latch;
use crate::prereq;
use crate::walrcv::Received;
use bdr_core::lsn;
use bdr_core::naming;
use bdr_core::node::NodeState;
use pgrx::callbacks::{register_xact_callback, PgXactCallbackEvent};
use pgrx::prelude::*;
use std::cell::RefCell;
use std::ffi::{CStr, CString};

/// The application name of a join's connections to the peers.
const APPNAME: &str = "bdr join";

/// How long a join waits for its target to apply another member's changes.
const CATCH_UP_TIMEOUT_MS: i64 = 300_000;
/// How often it looks.
const CATCH_UP_POLL_MS: i64 = 100;

thread_local! {
    static COPY_SRC: RefCell<Option<CopySrc>> = const { RefCell::new(None) };
}

/// What the join target said of its group, and what the join will do.
struct Plan {
    group_id: u32,
    group: String,
    group_uuid: String,
    /// The active members other than the joiner, the target among them.
    peers: Vec<Member>,
    target: Member,
    tables: Vec<Table>,
    /// The joiner's node sequence id: one no node of the group (parted
    /// ones included, whose values remain in the data) ever had.
    seq_id: i32,
}

/// A member other than the target, and where its slot for the joiner starts.
struct SlotStart {
    member: Member,
    lsn: u64,
}

/// What `bdr.join_node_group` was asked to do.
pub struct JoinArgs<'a> {
    pub target_dsn: &'a str,
    /// The group the target must be in; `None`: whichever it is in.
    pub group: Option<&'a str>,
    pub pause_in_standby: bool,
    /// 'all' (copy the schema) or 'none', in any case.
    pub synchronize_structure: &'a str,
}

pub fn join_impl(args: &JoinArgs<'_>) -> BdrResult<()> {
    let (sync, local) = check_join_args(args)?;
    lock_join()?;
    let me_row = catalog::node_by_id(local.node_id)?.ok_or(BdrError::NoLocalNode)?;
    let mut me = Member {
        id: local.node_id,
        name: local.node_name.clone(),
        dsn: me_row.node_dsn.clone(),
        dbname: catalog::current_database()?,
        state: NodeState::Active,
        seq_id: 0,
    };
    let mut target = Peer::connect("the join target", args.target_dsn, APPNAME)?;
    let plan = read_group(&mut target, &me, args.group, &sync)?;
    me.seq_id = plan.seq_id;
    create_local_slots(&me, &plan)?;
    let slot_starts = register_with_members(&me, &plan, &target)?;
    let stream_starts = copy_from_target(&mut target, &me, &plan, &slot_starts, &sync)?;
    record_group(&me, &plan, &stream_starts)?;
    // The group's sequences that are global are global here too (a copied
    // schema brings them as the target's, with its range or node id).
    crate::sequence::copy_kinds(&target.global_sequences()?)?;
    activate_everywhere(&me, &plan, &target)?;
    crate::shmem::wake_workers_at_commit();
    Ok(())
}

/// One join at a time in this database (a session's and the manager's
/// background one).
fn lock_join() -> BdrResult<()> {
    // A plain SELECT: this transaction must not take a transaction id
    // before it creates its slots.
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
    Ok(())
}

/// Phase 1: the target and what it knows of its group; every refusal.
fn read_group(
    target: &mut Peer,
    me: &Member,
    node_group_name: Option<&str>,
    sync: &str,
) -> BdrResult<Plan> {
    let Some(t) = target.identity()? else {
        return Err(BdrError::JoinRefused {
            msg: "the join target has no local BDR node".into(),
            hint: "Create a node and a group on the join target first.".into(),
        });
    };
    target.rename(&t.node_name);
    if t.group_id == 0 {
        return Err(BdrError::JoinRefused {
            msg: format!(
                "the join target node \"{}\" is not a member of a node group",
                t.node_name
            ),
            hint: "Create the group on the join target with bdr.create_node_group().".into(),
        });
    }
    if let Some(g) = node_group_name {
        if g != t.group_name {
            return Err(BdrError::JoinRefused {
                msg: format!(
                    "the join target is a member of node group \"{}\", not \"{g}\"",
                    t.group_name
                ),
                hint: "Pass the join target's group name, or NULL.".into(),
            });
        }
    }
    bdr_core::version::join_compatible(
        pg_sys::PG_VERSION_NUM,
        t.pg_version_num,
        bdr_core::version::VERSION_NUM,
        t.bdr_version_num,
    )
    .map_err(|msg| BdrError::JoinRefused {
        msg,
        hint: "Every node of a group runs the same PostgreSQL and bdr major versions.".into(),
    })?;
    let members = target.members(t.group_id)?;
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
    let target_member = peers
        .iter()
        .find(|p| p.name == t.node_name)
        .cloned()
        .ok_or_else(|| BdrError::JoinRefused {
            msg: format!(
                "the join target node \"{}\" is not active in its group",
                t.node_name
            ),
            hint: "Join through an active node of the group.".into(),
        })?;
    let tables = target.replicated_tables()?;
    if sync == "all" {
        check_no_local_tables()?;
    } else {
        check_local_tables(&tables, sync)?;
    }
    // An earlier attempt's id is kept, unless another node took it (two
    // joins at once).
    let taken = |id: i32| members.iter().any(|m| m.id != me.id && m.seq_id == id);
    let seq_id = match members.iter().find(|m| m.id == me.id && m.seq_id > 0) {
        Some(m) if !taken(m.seq_id) => m.seq_id,
        _ => members.iter().map(|m| m.seq_id).max().unwrap_or(0) + 1,
    };
    bdr_core::sequence::check_node_seq_id(seq_id as i64).map_err(|msg| BdrError::JoinRefused {
        msg: format!("the group has no node sequence id left: {msg}"),
        hint: "A group holds at most 1023 nodes over its life, parted ones included; remove parted nodes' records with bdr.drop_node() only if no global sequence values of theirs remain.".into(),
    })?;
    Ok(Plan {
        group_id: t.group_id,
        group: t.group_name,
        group_uuid: t.group_uuid,
        peers,
        target: target_member,
        tables,
        seq_id,
    })
}

/// Phase 2: slots here for every member, before this transaction writes.
fn create_local_slots(me: &Member, plan: &Plan) -> BdrResult<()> {
    for p in &plan.peers {
        let slot = naming::slot_name(&me.dbname, &plan.group, &p.name);
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
    Ok(())
}

/// Phase 3: every member other than the target learns of us and keeps a
/// slot for us. What a member commits from that slot's start on reaches
/// us through it; what it committed before must be in the target's data
/// when we copy it: so the target must have applied the member's changes
/// up to the slot's start first.
fn register_with_members(me: &Member, plan: &Plan, target: &Peer) -> BdrResult<Vec<SlotStart>> {
    let mut starts = Vec::new();
    for p in plan.peers.iter().filter(|p| p.name != plan.target.name) {
        let peer = Peer::connect(&p.name, &p.dsn, APPNAME)?;
        peer.register_node(me, plan.group_id)?;
        let slot = naming::slot_name(&p.dbname, &plan.group, &me.name);
        let lsn = match peer.slot_confirmed(&slot)? {
            Some(lsn) => lsn,
            None => peer.create_slot(&slot, SlotSnapshot::Nothing)?,
        };
        // Shown in the member's bdr.node_summary while the target catches up.
        peer.set_node_state(me.id, NodeState::Catchup)?;
        let target_slot = naming::slot_name(&p.dbname, &plan.group, &plan.target.name);
        wait_until_applied_by_target(&peer, target, &target_slot, lsn)?;
        starts.push(SlotStart {
            member: p.clone(),
            lsn,
        });
    }
    Ok(starts)
}

/// Waits until the join target has applied `member`'s changes up to `lsn`
/// (the member's slot for the target has confirmed it).
fn wait_until_applied_by_target(
    member: &Peer,
    target: &Peer,
    target_slot: &str,
    lsn: u64,
) -> BdrResult<()> {
    let deadline = crate::shmem::now() + CATCH_UP_TIMEOUT_MS * 1000;
    loop {
        // A target that went away will never catch up: fail at once.
        target.ping()?;
        let confirmed = member.slot_confirmed(target_slot)?.unwrap_or(0);
        if confirmed >= lsn {
            return Ok(());
        }
        if crate::shmem::now() > deadline {
            return Err(BdrError::JoinRefused {
                msg: format!(
                    "the join target \"{}\" has not applied the changes of node \"{}\" up to {} (it has confirmed {})",
                    target.name,
                    member.name,
                    lsn::format(lsn),
                    lsn::format(confirmed)
                ),
                hint: format!(
                    "Check on \"{}\" that it replicates from \"{}\" (bdr.subscription_summary, bdr.worker_errors), then join again.",
                    target.name, member.name
                ),
            });
        }
        latch::wait(None, CATCH_UP_POLL_MS);
    }
}

/// Phase 4: the target's slot for us, and its schema and data as of that
/// slot's start. Returns where streaming from each other member starts.
fn copy_from_target(
    target: &mut Peer,
    me: &Member,
    plan: &Plan,
    slot_starts: &[SlotStart],
    sync: &str,
) -> BdrResult<Vec<(u32, u64)>> {
    target.register_node(me, plan.group_id)?;
    let slot = naming::slot_name(&plan.target.dbname, &plan.group, &me.name);
    if target.slot_confirmed(&slot)?.is_some() {
        // Left by an earlier attempt that did not finish; its start point is
        // not the state we are about to copy.
        target.drop_slot(&slot)?;
    }
    // How far the target has applied each other member, read before its
    // snapshot exists: those changes are in the copy, so streaming from that
    // member starts there (or at its slot's start, if that is later).
    let mut stream_starts = Vec::new();
    for s in slot_starts {
        let origin = naming::origin_name(&plan.target.dbname, &plan.group, &s.member.name);
        let progress = target.origin_progress(&origin)?;
        stream_starts.push((s.member.id, progress.max(s.lsn)));
    }
    target.begin_snapshot_copy()?;
    let start = target.create_slot(&slot, SlotSnapshot::Use)?;
    if sync == "all" {
        let snapshot = target.export_snapshot()?;
        copy_schema(&plan.target, &snapshot)?;
    }
    let target_origin = naming::origin_name(&me.dbname, &plan.group, &plan.target.name);
    use_origin_until_end_of_transaction(&target_origin, start);
    // Rows arrive in any order: foreign keys and triggers are the target's
    // business, as for applied changes.
    Spi::run("SELECT pg_catalog.set_config('session_replication_role', 'replica', true)")?;
    let mut copied = 0u64;
    for t in &plan.tables {
        target.copy_out_table(t)?;
        copied += copy_into(target, t)?;
    }
    copy_row_writers(target, &plan.target, &plan.tables)?;
    crate::hlc::publish_copied();
    target.commit("finishing the copy")?;
    Spi::run("SELECT pg_catalog.set_config('session_replication_role', 'origin', true)")?;
    pgrx::notice!(
        "copied {copied} rows of {} tables from node \"{}\"",
        plan.tables.len(),
        plan.target.name
    );
    Ok(stream_starts)
}

/// Phase 5: the group here, and us in it.
fn record_group(me: &Member, plan: &Plan, stream_starts: &[(u32, u64)]) -> BdrResult<()> {
    catalog::lock_nodes()?;
    catalog::insert_joined_group(plan.group_id, &plan.group, &plan.group_uuid)?;
    for p in &plan.peers {
        catalog::upsert_node(
            p.id,
            &p.name,
            &p.dsn,
            &p.dbname,
            plan.group_id,
            NodeState::Active,
            p.seq_id,
        )?;
    }
    catalog::set_node_group(me.id, plan.group_id, NodeState::Active, plan.seq_id)?;
    crate::sequence::node_changed_at_commit();
    // Whatever join was requested in the background is this one, or moot.
    catalog::clear_join_requests()?;
    for (origin_node, start) in stream_starts {
        catalog::set_subscription_start(*origin_node, *start)?;
    }
    Ok(())
}

/// Phase 6: every member marks us active; their managers subscribe to us;
/// and the group's consensus takes us as a voter (committed by the voters
/// there are, so it does not wait for our consensus worker, which starts
/// when this transaction commits).
fn activate_everywhere(me: &Member, plan: &Plan, target: &Peer) -> BdrResult<()> {
    for p in &plan.peers {
        if p.name == plan.target.name {
            target.activate_node(me.id)?;
        } else {
            Peer::connect(&p.name, &p.dsn, APPNAME)?.activate_node(me.id)?;
        }
    }
    target.change_voter(me.id, true)
}

/// Called on a member by a joining node: records the joiner in its group.
pub fn register_impl(
    node_id: u32,
    name: &str,
    dsn: &str,
    dbname: &str,
    group_id: u32,
    seq_id: i32,
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
    // Two joins at once through different members may pick the same id:
    // each registers with every member, so the later one meets the other
    // here and is refused.
    if let Some(other) = catalog::node_with_seq_id(seq_id, node_id)? {
        return Err(BdrError::JoinRefused {
            msg: format!("node sequence id {seq_id} is taken by node \"{other}\", which joined at the same time"),
            hint: "Retry the join; it picks the next free id.".into(),
        });
    }
    catalog::upsert_node(
        node_id,
        name,
        dsn,
        dbname,
        group_id,
        NodeState::Joining,
        seq_id,
    )
}

/// Called on a member by a joining node once it holds the group's data:
/// the member's manager then subscribes to it.
pub fn activate_impl(node_id: u32) -> BdrResult<()> {
    catalog::lock_nodes()?;
    catalog::set_node_state(node_id, NodeState::Active)?;
    crate::shmem::wake_workers_at_commit();
    Ok(())
}
