//! Background joins (wait_for_completion => false): the request is recorded
//! and the database's manager runs the join.

use super::*;

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
pub(super) struct JoinRequest {
    pub(super) dsn: String,
    pub(super) group: Option<String>,
    pub(super) sync: String,
}

pub(super) fn pending_request() -> BdrResult<Option<JoinRequest>> {
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
