//! SQL functions of joining a group: `bdr.join_node_group`,
//! `bdr.wait_for_join_completion`, and the internal ones a joining node calls
//! on the members. The join itself is `crate::join`.

use crate::catalog;
use crate::error::{BdrError, BdrResult, OrRaise};
use crate::join::*;
use crate::pg::latch;
use crate::shmem::{self, Role, TASKS};
use bdr_core::node::NodeState;
use pgrx::prelude::*;

/// Joins the local node to the group of the node at `join_target_dsn`.
#[pg_extern(volatile, parallel_unsafe)]
fn join_node_group(
    join_target_dsn: &str,
    node_group_name: default!(Option<&str>, "NULL"),
    pause_in_standby: default!(bool, false),
    wait_for_completion: default!(bool, true),
    synchronize_structure: default!(&str, "'all'"),
) {
    if !wait_for_completion {
        request_join(
            join_target_dsn,
            node_group_name,
            pause_in_standby,
            synchronize_structure,
        )
        .or_raise();
        return;
    }
    // The join is complete when this returns; the connections to the peers
    // start when the transaction commits (see bdr.wait_for_join_completion).
    join_impl(
        join_target_dsn,
        node_group_name,
        pause_in_standby,
        synchronize_structure,
    )
    .or_raise()
}

/// Called by a joining node on each member: records the joiner.
#[pg_extern(volatile, parallel_unsafe)]
fn _join_register(node_id: i64, node_name: &str, node_dsn: &str, dbname: &str, node_group_id: i64) {
    register_impl(
        node_id as u32,
        node_name,
        node_dsn,
        dbname,
        node_group_id as u32,
    )
    .or_raise()
}

/// Called by a joining node on each member once it holds the group's data:
/// the member's manager then subscribes to it.
#[pg_extern(volatile, parallel_unsafe)]
fn _join_activate(node_id: i64) {
    let r: BdrResult<()> = (|| {
        catalog::lock_nodes()?;
        Spi::run_with_args(
            "UPDATE bdr.node SET node_state = $2, target_state = $2 WHERE node_id = $1",
            &[
                pg_sys::Oid::from(node_id as u32).into(),
                pg_sys::Oid::from(NodeState::Active.oid()).into(),
            ],
        )?;
        crate::shmem::wake_workers_at_commit();
        Ok(())
    })();
    r.or_raise()
}

/// Waits until the local node is an active member and a receiver streams
/// from every peer.
#[pg_extern(volatile, parallel_unsafe)]
fn wait_for_join_completion(verbose_progress: default!(bool, false)) {
    let mut local = catalog::local_node()
        .or_raise()
        .ok_or(BdrError::NoLocalNode)
        .or_raise();
    // The manager's subscriptions become visible only to new snapshots, and
    // only once the join has committed.
    // SAFETY: reads transaction state of this backend.
    let (repeatable, wrote) = unsafe {
        (
            pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32,
            pg_sys::GetTopTransactionIdIfAny() != pg_sys::InvalidTransactionId,
        )
    };
    if repeatable || wrote {
        BdrError::JoinRefused {
            msg: "bdr.wait_for_join_completion() cannot wait inside this transaction".into(),
            hint: "Call it in its own READ COMMITTED transaction, after the transaction that joined has committed.".into(),
        }
        .raise();
    }
    // A join running in the background (wait_for_completion => false):
    // wait for it to finish, or report why it failed.
    let mut announced = false;
    while local.node_group_id == 0 {
        // SAFETY: a new snapshot per round, popped below.
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
        let req: Option<(String, Option<String>)> = Spi::connect(|c| {
            let t = c.select(
                "SELECT r.join_target_dsn, r.last_error FROM bdr.join_request r
                   JOIN bdr.local_node l USING (node_id)",
                None,
                &[],
            )?;
            if t.is_empty() {
                return Ok(None);
            }
            t.first()
                .get_two::<String, String>()
                .map(|(d, e)| d.map(|d| (d, e)))
        })
        .map_err(BdrError::from)
        .or_raise();
        local = catalog::local_node()
            .or_raise()
            .ok_or(BdrError::NoLocalNode)
            .or_raise();
        // SAFETY: pops the snapshot pushed above.
        unsafe { pg_sys::PopActiveSnapshot() };
        if local.node_group_id != 0 {
            break;
        }
        match req {
            None => break,
            Some((dsn, Some(err))) => BdrError::JoinRefused {
                msg: format!("the join through \"{dsn}\" failed: {err}"),
                hint: "Fix the cause and call bdr.join_node_group() again.".into(),
            }
            .raise(),
            Some((dsn, None)) => {
                if verbose_progress && !announced {
                    pgrx::notice!("waiting for the join through \"{dsn}\" to finish");
                    announced = true;
                }
                crate::pg::latch::wait(None, 200);
            }
        }
    }
    if local.node_group_id == 0 {
        BdrError::JoinRefused {
            msg: format!("node \"{}\" is not joining a group", local.node_name),
            hint: "Call bdr.join_node_group() first.".into(),
        }
        .raise();
    }
    // SAFETY: MyDatabaseId is set for the life of a connected backend.
    let db = unsafe { pg_sys::MyDatabaseId.to_u32() };
    let mut last = String::new();
    loop {
        // Each round reads the catalogs afresh: the manager adds the
        // subscriptions after this statement began.
        // SAFETY: a new snapshot pushed and popped around the reads below.
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
        let peers = catalog::group_peers(&local).or_raise();
        let active: Vec<_> = peers
            .iter()
            .filter(|p| p.node_state == NodeState::Active)
            .collect();
        let subs = catalog::local_subscriptions().or_raise();
        // SAFETY: pops the snapshot pushed above.
        unsafe { pg_sys::PopActiveSnapshot() };
        let mut waiting = Vec::new();
        for p in &active {
            let connected = subs
                .iter()
                .find(|s| s.origin_node_id == p.node_id)
                .is_some_and(|s| {
                    let t = TASKS.share();
                    t.find(Role::Receiver, db, s.sub_id, 0)
                        .is_some_and(|i| t.tasks[i].connected)
                });
            if !connected {
                waiting.push(p.node_name.clone());
            }
        }
        if waiting.is_empty() {
            return;
        }
        let now = format!("waiting for replication from: {}", waiting.join(", "));
        if verbose_progress && now != last {
            pgrx::notice!("{now}");
            last = now;
        }
        shmem::wake_manager(db);
        latch::wait(None, 200);
    }
}
