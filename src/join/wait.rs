//! `bdr.wait_for_join_completion`: waits for a background join to finish,
//! then for a receiver to stream from every active peer.

use super::*;
use crate::shmem::{self, Role, TASKS};

/// How often the wait looks again.
const WAIT_POLL_MS: i64 = 200;

/// Runs `f` under a fresh snapshot: each round must see what committed
/// since the statement began (the manager's subscriptions, the join's end).
fn with_fresh_snapshot<T>(f: impl FnOnce() -> BdrResult<T>) -> BdrResult<T> {
    // SAFETY: a new snapshot pushed here and popped below, on every path.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let r = f();
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    r
}

pub fn wait_for_completion(verbose_progress: bool) -> BdrResult<()> {
    let mut local = catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
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
        return Err(BdrError::JoinRefused {
            msg: "bdr.wait_for_join_completion() cannot wait inside this transaction".into(),
            hint: "Call it in its own READ COMMITTED transaction, after the transaction that joined has committed.".into(),
        });
    }
    // A join running in the background (wait_for_completion => false):
    // wait for it to finish, or report why it failed.
    let mut announced = false;
    while local.node_group_id == 0 {
        let (req, now_local) =
            with_fresh_snapshot(|| Ok((catalog::join_request()?, catalog::local_node()?)))?;
        local = now_local.ok_or(BdrError::NoLocalNode)?;
        if local.node_group_id != 0 {
            break;
        }
        match req {
            None => break,
            Some(catalog::JoinRequest {
                dsn,
                last_error: Some(err),
                ..
            }) => {
                return Err(BdrError::JoinRefused {
                    msg: format!("the join through \"{dsn}\" failed: {err}"),
                    hint: "Fix the cause and call bdr.join_node_group() again.".into(),
                })
            }
            Some(r) => {
                if verbose_progress && !announced {
                    pgrx::notice!("waiting for the join through \"{}\" to finish", r.dsn);
                    announced = true;
                }
                latch::wait(None, WAIT_POLL_MS);
            }
        }
    }
    if local.node_group_id == 0 {
        return Err(BdrError::JoinRefused {
            msg: format!("node \"{}\" is not joining a group", local.node_name),
            hint: "Call bdr.join_node_group() first.".into(),
        });
    }
    // SAFETY: MyDatabaseId is set for the life of a connected backend.
    let db = unsafe { pg_sys::MyDatabaseId.to_u32() };
    let mut last = String::new();
    loop {
        let (peers, subs) = with_fresh_snapshot(|| {
            Ok((
                catalog::group_peers(&local)?,
                catalog::local_subscriptions()?,
            ))
        })?;
        let waiting: Vec<String> = peers
            .iter()
            .filter(|p| p.node_state == NodeState::Active)
            .filter(|p| {
                !subs
                    .iter()
                    .find(|s| s.origin_node_id == p.node_id)
                    .is_some_and(|s| {
                        let t = TASKS.share();
                        t.find(Role::Receiver, db, s.sub_id, 0)
                            .is_some_and(|i| t.tasks[i].connected)
                    })
            })
            .map(|p| p.node_name.clone())
            .collect();
        if waiting.is_empty() {
            return Ok(());
        }
        let now = format!("waiting for replication from: {}", waiting.join(", "));
        if verbose_progress && now != last {
            pgrx::notice!("{now}");
            last = now;
        }
        shmem::wake_manager(db);
        latch::wait(None, WAIT_POLL_MS);
    }
}
