//! Background workers: the supervisor (one per instance), a manager per
//! BDR database, and per peer a receiver with its writer.

pub mod manager;
pub mod queue;
pub mod receiver;
pub mod supervisor;
pub mod writer;

use crate::guc;
use crate::shmem::{now, ExitKind, Role, Task, TASKS};
use bdr_core::backoff::{self, Jitter};
use pgrx::bgworkers::*;
use pgrx::pg_sys;
use std::time::Duration;

/// A worker this process launched and watches.
pub struct Running {
    pub handle: DynamicBackgroundWorker,
    pub idx: usize,
}

pub fn backoff_settings() -> (u64, u64) {
    (
        guc::get_int(guc::MIN_WORKER_BACKOFF_DELAY).max(0) as u64,
        guc::get_int(guc::MAX_WORKER_BACKOFF_DELAY).max(0) as u64,
    )
}

/// Launches the task (role, dboid, subid) unless its backoff forbids it yet.
/// The worker gets its task slot as argument and the slot's generation as
/// `bgw_extra`, and claims the slot with [`attach_task`].
pub fn launch(
    role: Role,
    dboid: u32,
    subid: u32,
    name: &str,
    function: &str,
    extra: &str,
    jitter: &mut Jitter,
) -> Option<Running> {
    let ts = now();
    let (idx, generation) = {
        let mut t = TASKS.exclusive();
        let idx = t.find_or_create(role, dboid, subid, 0)?;
        // Waiting out a backoff is not a launch request.
        if t.tasks[idx].next_launch_not_before > ts {
            return None;
        }
        let generation = t.next_generation;
        t.next_generation += 1;
        let task = &mut t.tasks[idx];
        // SAFETY: MyProcPid is set for every started backend.
        task.last_request_pid = unsafe { pg_sys::MyProcPid };
        task.last_request_time = ts;
        task.nrequests += 1;
        task.last_request_approved = true;
        if task.pid != 0 || task.registered != 0 {
            task.prev_pid = task.pid;
            task.prev_registered = task.registered;
            task.prev_launched = task.attached;
            task.prev_exited = task.exited;
        }
        task.pid = 0;
        task.attached = 0;
        task.exited = 0;
        task.exit_kind = ExitKind::Unknown;
        task.generation = generation;
        task.registered = ts;
        task.nregistrations += 1;
        task.connected = false;
        if task.first_registered == 0 {
            task.first_registered = ts;
        }
        (idx, generation)
    };
    // SAFETY: MyProcPid is set for every started backend.
    let me = unsafe { pg_sys::MyProcPid };
    let result = BackgroundWorkerBuilder::new(name)
        .set_type(&format!("bdr {}", role.name()))
        .set_library("bdr")
        .set_function(function)
        .enable_spi_access()
        .set_argument(Some(pg_sys::Datum::from(idx)))
        .set_extra(&format!("{generation}:{extra}"))
        .set_notify_pid(me)
        .load_dynamic();
    match result {
        Ok(handle) => Some(Running { handle, idx }),
        Err(_) => {
            tracing::warn!(
                "could not register a background worker for \"{name}\"; raise max_worker_processes"
            );
            record_failure(idx, jitter);
            None
        }
    }
}

/// What `launch` passed in `bgw_extra`: the task's generation, and the
/// launcher's own data for the worker.
pub fn extra() -> (u64, String) {
    let e = BackgroundWorker::get_extra();
    let (g, rest) = e.split_once(':').unwrap_or((e, ""));
    (g.parse().unwrap_or(0), rest.to_string())
}

/// Pushes the next launch of a failed task out by the backoff delay.
pub fn record_failure(idx: usize, jitter: &mut Jitter) {
    let (min, max) = backoff_settings();
    let ts = now();
    let mut t = TASKS.exclusive();
    let task = &mut t.tasks[idx];
    // A worker that ran for longer than the longest backoff failed afresh, not again.
    if task.attached != 0 && ts - task.attached > (max as i64) * 1000 {
        task.failures = 0;
    }
    task.failures = task.failures.saturating_add(1);
    let delay = backoff::delay_ms(task.failures, min, max, jitter.next_f64());
    task.next_launch_not_before = ts + (delay as i64) * 1000;
}

/// Marks the task as exited and says how.
pub fn reap(idx: usize) -> ExitKind {
    let mut t = TASKS.exclusive();
    let task = &mut t.tasks[idx];
    task.exited = now();
    task.pid = 0;
    task.proc_ = 0;
    task.connected = false;
    if task.exit_kind != ExitKind::Unknown {
        task.failures = 0;
    }
    task.exit_kind
}

pub fn init() {
    BackgroundWorkerBuilder::new("bdr supervisor")
        .set_type("bdr supervisor")
        .set_library("bdr")
        .set_function("bdr_supervisor_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        // If it dies unexpectedly the postmaster brings it back; its managers
        // keep running meanwhile.
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Records in the task table that this process now runs task `idx`, so that
/// `bdr.worker_tasks` shows it and others can wake it.
pub fn attach_task(idx: usize, generation: u64) -> Option<Task> {
    let mut t = TASKS.exclusive();
    let task = t.tasks.get_mut(idx)?;
    if !task.in_use || task.generation != generation {
        return None;
    }
    // SAFETY: MyProcPid and MyProc are set for every started backend.
    unsafe {
        task.pid = pg_sys::MyProcPid;
        task.proc_ = pg_sys::MyProc as usize;
    }
    task.attached = crate::shmem::now();
    task.exit_kind = crate::shmem::ExitKind::Unknown;
    Some(*task)
}

/// Runs a worker's body; an ERROR that ends it is first recorded for
/// `bdr.worker_errors`, then ends the worker as usual.
pub fn recording_errors(idx: usize, generation: u64, what: &str, body: impl FnOnce()) {
    let body = std::panic::AssertUnwindSafe(body);
    pgrx::PgTryBuilder::new(move || {
        let body = body;
        (body.0)()
    })
    .catch_others(|e| {
        let msg = crate::error::caught_report(&e).message().to_string();
        crate::shmem::record_error(idx, generation, &format!("{what}: {msg}"));
        e.rethrow()
    })
    .execute()
}

/// The generation of the manager of `dboid` now, 0 if none runs.
pub fn manager_generation(dboid: u32) -> u64 {
    crate::shmem::running_manager(dboid)
        .map(|t| t.generation)
        .unwrap_or(0)
}
