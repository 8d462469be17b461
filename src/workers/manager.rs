//! The manager: one per database that has a local BDR node. For now it keeps
//! watch over the catalogs and exits when the node or the extension goes; it
//! is where receivers and writers will be started from.

use crate::catalog;
use crate::shmem::{ExitKind, TASKS};
use pgrx::bgworkers::*;
use pgrx::prelude::*;
use std::time::Duration;

/// How often the manager re-reads the catalogs when nothing wakes it.
const POLL: Duration = Duration::from_secs(1);

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn bdr_manager_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let idx = arg.value();
    let generation: u64 = BackgroundWorker::get_extra().parse().unwrap_or(0);
    let Some(task) = super::attach_task(idx, generation) else {
        tracing::warn!("manager started for a task slot that was reassigned; exiting");
        return;
    };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(task.dboid)), None);

    let mut announced = false;
    loop {
        let node = BackgroundWorker::transaction(catalog::database_has_local_node);
        match node {
            Ok(Some(name)) => {
                if !announced {
                    tracing::info!("manager started for local node \"{name}\"");
                    announced = true;
                }
            }
            Ok(None) => {
                if announced {
                    tracing::info!("no local BDR node in this database any more; manager exiting");
                }
                let mut t = TASKS.exclusive();
                let me = &mut t.tasks[idx];
                if me.generation == generation {
                    me.exit_kind = ExitKind::NothingToDo;
                }
                return;
            }
            Err(e) => {
                // An ERROR here exits the worker; the supervisor restarts it with backoff.
                error!("bdr manager could not read the BDR catalogs: {e}");
            }
        }
        if !BackgroundWorker::wait_latch(Some(POLL)) {
            return;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading the config file is what SIGHUP asks of a backend.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}
