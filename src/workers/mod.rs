//! Background workers: the supervisor (one per instance) and a manager per
//! BDR database; receivers and writers per peer come with replication.

pub mod manager;
pub mod supervisor;

use crate::shmem::{Task, TASKS};
use pgrx::bgworkers::*;
use pgrx::pg_sys;
use std::time::Duration;

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
