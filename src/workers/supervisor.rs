//! The supervisor: one per instance. It starts a manager in each database
//! that may hold a BDR node, notices when one exits, and relaunches failed
//! ones no sooner than the backoff allows (`bdr.min_worker_backoff_delay` ..
//! `bdr.max_worker_backoff_delay`).

use super::{backoff_settings, launch, record_failure, Running};
use crate::shmem::{now, ExitKind, Role, TASKS};
use bdr_core::backoff::Jitter;
use pgrx::bgworkers::*;
use pgrx::prelude::*;
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

const TICK: Duration = Duration::from_millis(500);
/// How often the list of databases is re-read to forget dropped ones.
const RESCAN_US: i64 = 30_000_000;

/// Connectable, non-template databases: the ones a manager could serve.
fn scan_databases() -> BTreeSet<u32> {
    BackgroundWorker::transaction(|| {
        let mut out = BTreeSet::new();
        // SAFETY: a catalog heap scan of pg_database inside a transaction, as
        // PostgreSQL's autovacuum launcher does; tuples are read before endscan.
        unsafe {
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, lock);
            let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
            loop {
                let tup = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tup.is_null() {
                    break;
                }
                let header = (*tup).t_data;
                let form = (header as *mut u8).add((*header).t_hoff as usize)
                    as *const pg_sys::FormData_pg_database;
                if (*form).datallowconn && !(*form).datistemplate {
                    out.insert((*form).oid.to_u32());
                }
            }
            pg_sys::table_endscan(scan);
            pg_sys::table_close(rel, lock);
        }
        out
    })
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn bdr_supervisor_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    BackgroundWorker::connect_worker_to_spi(None, None);
    {
        let mut t = TASKS.exclusive();
        // SAFETY: MyProc and MyProcPid are set for every started backend.
        unsafe {
            t.supervisor_proc = pg_sys::MyProc as usize;
        }
        let ts = now();
        if let Some(i) = t.find_or_create(Role::Supervisor, 0, 0, 0) {
            let task = &mut t.tasks[i];
            // SAFETY: as above.
            task.pid = unsafe { pg_sys::MyProcPid };
            task.registered = ts;
            task.attached = ts;
            task.nregistrations += 1;
            if task.first_registered == 0 {
                task.first_registered = ts;
            }
        }
    }
    tracing::info!("supervisor started");

    // SAFETY: MyProcPid is set; any seed will do for jitter.
    let mut jitter = Jitter::new(unsafe { pg_sys::MyProcPid } as u64 ^ now() as u64);
    let mut wanted = scan_databases();
    let mut last_scan = now();
    let mut running: HashMap<u32, Running> = HashMap::new();
    let mut settings = backoff_settings();

    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading the config file is what SIGHUP asks of a backend.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            let now_settings = backoff_settings();
            if now_settings != settings {
                // BDR resets all current backoff waits when the delays change.
                settings = now_settings;
                let mut t = TASKS.exclusive();
                for task in t.tasks.iter_mut().filter(|t| t.in_use) {
                    task.next_launch_not_before = 0;
                }
            }
        }

        // Databases someone asked us to look at (bdr.create_node and friends).
        let requested: Vec<u32> = {
            let mut t = TASKS.exclusive();
            let v = t.wake_dbs.iter().copied().filter(|d| *d != 0).collect();
            t.wake_dbs = [0; crate::shmem::MAX_WAKE_REQUESTS];
            v
        };
        let mut rescan = now() - last_scan > RESCAN_US;
        for db in requested {
            if wanted.insert(db) {
                rescan = true;
            }
        }

        // Reap managers that exited.
        let mut exited = Vec::new();
        for (db, r) in running.iter() {
            if let Err(BackgroundWorkerStatus::Stopped) = r.handle.pid() {
                exited.push((*db, r.idx));
            }
        }
        for (db, idx) in exited {
            running.remove(&db);
            let kind = super::reap(idx);
            if kind == ExitKind::NothingToDo {
                wanted.remove(&db);
            } else {
                tracing::warn!("manager of database {db} exited unexpectedly; it will be restarted after a backoff");
                record_failure(idx, &mut jitter);
                rescan = true;
            }
        }

        if rescan {
            let existing = scan_databases();
            wanted.retain(|d| existing.contains(d));
            last_scan = now();
            // Forget tasks of dropped databases.
            let mut t = TASKS.exclusive();
            for task in t.tasks.iter_mut() {
                if task.in_use
                    && task.role == Role::Manager
                    && !existing.contains(&task.dboid)
                    && task.pid == 0
                {
                    *task = Default::default();
                }
            }
        }

        // Launch what is wanted, not running, and allowed by the backoff.
        for &db in wanted
            .iter()
            .filter(|db| !running.contains_key(db))
            .collect::<Vec<_>>()
        {
            if let Some(r) = launch(
                Role::Manager,
                db,
                0,
                &format!("bdr manager {db}"),
                "bdr_manager_main",
                "",
                &mut jitter,
            ) {
                running.insert(db, r);
            }
        }

        if !BackgroundWorker::wait_latch(Some(TICK)) {
            break;
        }
    }
    tracing::info!("supervisor exiting");
}
