//! Background joins (wait_for_completion => false): the request is recorded
//! and the database's manager runs the join.

use super::*;

/// `wait_for_completion => false`: checks what can be checked here, and
/// leaves the join to this database's manager once this transaction
/// commits. The local node is JOIN_START until it is done.
pub fn request_join(args: &JoinArgs<'_>) -> BdrResult<()> {
    let (sync, local) = check_join_args(args)?;
    let pending = catalog::join_pending()?;
    if pending {
        return Err(BdrError::JoinRefused {
            msg: "a background join of this node is already pending".into(),
            hint: "Wait for it with bdr.wait_for_join_completion().".into(),
        });
    }
    catalog::record_join_request(local.node_id, args.target_dsn, args.group, &sync)?;
    catalog::set_local_join_started(local.node_id)?;
    crate::shmem::wake_workers_at_commit();
    pgrx::notice!("the join runs in the background; bdr.wait_for_join_completion() waits for it");
    Ok(())
}

/// Run by the manager of a database whose local node is in no group: does
/// the join a session requested with `wait_for_completion => false`, in a
/// transaction of its own. A failure is recorded in `bdr.join_request`,
/// which `bdr.wait_for_join_completion()` reports.
pub fn run_requested_join() {
    let req = pgrx::bgworkers::BackgroundWorker::transaction(catalog::join_request);
    let req = match req {
        Ok(Some(r)) if r.last_error.is_none() => r,
        Ok(_) => return,
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
        join_impl(&JoinArgs {
            target_dsn: &req.dsn,
            group: req.group.as_deref(),
            pause_in_standby: false,
            synchronize_structure: &req.sync,
        })
        .and_then(|()| catalog::clear_join_requests())
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
                catalog::record_join_failure(&msg)?;
                catalog::reset_local_node_state()
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
