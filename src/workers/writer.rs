//! The writer: applies what its receiver passes on, one remote transaction
//! per local transaction (`crate::apply`), and reports each commit back so
//! the receiver can confirm it to the peer once it is durable.

use super::queue::{self, Recv, Sent};
use super::recording_errors;
use crate::apply::Applier;
use crate::catalog;
use crate::pg::latch::{attach_die_handlers, reload_config_if_asked};
use crate::shmem::{self, ExitKind};
use crate::stats;
use bdr_core::protocol;
use pgrx::bgworkers::*;
use pgrx::prelude::*;
use std::ffi::CString;

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn bdr_writer_main(arg: pg_sys::Datum) {
    attach_die_handlers();
    // Every commit of a writer carries a peer's timestamp, or is its own
    // bookkeeping under its origin session: never stamped by the clock.
    crate::hlc::exempt_this_process();
    let idx = arg.value();
    let (generation, extra) = super::extra();
    let Some(task) = super::attach_task(idx, generation) else {
        return;
    };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(task.dboid)), None);
    let (dboid, subid) = (task.dboid, task.subid);
    recording_errors(idx, generation, "writer", || {
        pgrx::PgTryBuilder::new(|| run(idx, generation, dboid, subid, &extra))
            .catch_others(|e| {
                // Any error ends this writer; count it for bdr.stat_subscription.
                let deadlock = crate::error::caught_report(&e).sql_error_code()
                    == PgSqlErrorCode::ERRCODE_T_R_DEADLOCK_DETECTED;
                let lsn =
                    crate::apply::CURRENT_REMOTE_LSN.load(std::sync::atomic::Ordering::Relaxed);
                stats::note_error(dboid, subid, lsn, deadlock);
                e.rethrow()
            })
            .execute()
    });
}

fn run(idx: usize, generation: u64, dboid: u32, subid: u32, extra: &str) {
    // The receiver that launched us passed its queues' segment.
    let dsm: u32 = extra.parse().unwrap_or(0);
    let Some(queues) = queue::attach(dsm) else {
        // The receiver is already gone; it starts a new writer when it returns.
        shmem::update_task(idx, generation, |t| t.exit_kind = ExitKind::Stopped);
        return;
    };

    let (sub, local) =
        BackgroundWorker::transaction(|| (catalog::subscription(subid), catalog::local_node()));
    let sub = sub
        .unwrap_or_else(|e| {
            crate::fail!(
                ERRCODE_INTERNAL_ERROR,
                "could not read the subscription: {e}"
            )
        })
        .unwrap_or_else(|| {
            crate::fail!(
                ERRCODE_UNDEFINED_OBJECT,
                "subscription {subid} no longer exists"
            )
        });
    let local = local
        .unwrap_or_else(|e| {
            crate::fail!(ERRCODE_INTERNAL_ERROR, "could not read the local node: {e}")
        })
        .unwrap_or_else(|| {
            crate::fail!(
                ERRCODE_UNDEFINED_OBJECT,
                "this database has no local BDR node any more"
            )
        });

    // SAFETY: process-wide settings of this worker, set once before applying:
    // replica mode keeps ordinary triggers and FK checks from firing twice,
    // and the origin session tags every applied transaction with the peer.
    let progress = unsafe {
        pg_sys::SetConfigOption(
            c"session_replication_role".as_ptr(),
            c"replica".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
        let name = CString::new(sub.origin_name.as_str()).unwrap_or_default();
        let id = BackgroundWorker::transaction(|| pg_sys::replorigin_by_name(name.as_ptr(), false));
        pg_sys::replorigin_session_setup(id);
        pg_sys::replorigin_session_origin = id;
        pg_sys::replorigin_session_get_progress(false)
    };

    stats::update(dboid, subid, |s| {
        s.curr_ncommit = 0;
        if s.last_failed_lsn != 0 {
            s.nretries += 1;
        }
    });
    let mut applier = Applier::new(local.node_id, sub.origin_node_id, progress, dboid, subid);
    loop {
        let msg = match queues.to_writer.receive(false) {
            Recv::Msg(b) => protocol::decode(b).unwrap_or_else(|e| {
                crate::fail!(
                    ERRCODE_PROTOCOL_VIOLATION,
                    "bad message from node \"{}\": {e}",
                    sub.origin_node_name
                )
            }),
            Recv::WouldBlock => continue,
            Recv::Detached => {
                shmem::update_task(idx, generation, |t| t.exit_kind = ExitKind::Stopped);
                return;
            }
        };
        let commit_time = match &msg {
            protocol::Message::Commit { commit_time, .. } => Some(*commit_time),
            _ => None,
        };
        let done = applier.handle(msg);
        if let Some(stop) = applier.take_stop() {
            // A resolver said `error`: nothing of this transaction is kept;
            // the receiver restarts us from the same position after backoff.
            applier.abort_for(&stop);
            pgrx::pg_sys::panic::ErrorReport::new(stop.code, stop.message, "bdr writer")
                .set_hint(stop.hint)
                .report(pgrx::PgLogLevel::ERROR);
        }
        if let Some((remote_end, local_end)) = done {
            if queues
                .from_writer
                .send(&queue::encode_ack(remote_end, local_end), false)
                == Sent::Detached
            {
                shmem::update_task(idx, generation, |t| t.exit_kind = ExitKind::Stopped);
                return;
            }
            let n = applier.ncommits;
            shmem::update_task(idx, generation, |t| {
                t.replay_lsn = remote_end;
                t.replay_time = commit_time.unwrap_or(0);
                t.ncommits = n;
            });
            reload_config_if_asked();
        }
        pgrx::check_for_interrupts!();
    }
}
