//! Worker coordination state in shared memory: one entry per worker task
//! (supervisor, one manager per database, later receivers and writers), with
//! the launch history and backoff that `bdr.worker_tasks` shows.
//!
//! The table is not persistent: a restart (also crash recovery) clears it, as
//! BDR documents for its own task table.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

pub const MAX_TASKS: usize = 128;
pub const MAX_WAKE_REQUESTS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Role {
    #[default]
    None = 0,
    Manager = 1,
    Receiver = 2,
    Writer = 3,
    Consensus = 4,
    Supervisor = 6,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::None => "none",
            Role::Manager => "manager",
            Role::Receiver => "receiver",
            Role::Writer => "writer",
            Role::Consensus => "consensus",
            Role::Supervisor => "supervisor",
        }
    }
}

/// How a worker ended, recorded by the worker itself before a clean exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum ExitKind {
    /// Still running, or died without saying why (ERROR, FATAL, crash).
    #[default]
    Unknown = 0,
    /// Nothing to do in this database: no bdr extension or no local node.
    NothingToDo = 1,
    /// Told to stop, or its subscription went away.
    Stopped = 2,
}

impl Task {
    /// Whether the worker's last run ended cleanly.
    pub fn success(&self) -> bool {
        self.exit_kind != ExitKind::Unknown
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct Task {
    pub in_use: bool,
    pub role: Role,
    pub dboid: u32,
    pub subid: u32,
    pub writer_id: i32,
    pub generation: u64,
    pub pid: i32,
    pub registered: i64,
    pub attached: i64,
    pub exited: i64,
    pub exit_kind: ExitKind,
    pub next_launch_not_before: i64,
    pub failures: u32,
    pub last_request_pid: i32,
    pub last_request_time: i64,
    pub last_request_approved: bool,
    pub nrequests: i64,
    pub nregistrations: i64,
    pub prev_pid: i32,
    pub prev_registered: i64,
    pub prev_launched: i64,
    pub prev_exited: i64,
    pub first_registered: i64,
    /// The process's `PGPROC`, so others can set its latch.
    pub proc_: usize,
    /// The last error that ended this task (`bdr.worker_errors`).
    pub last_error: ErrorText,
    pub last_error_time: i64,
    pub last_error_pid: i32,
    /// Receivers: whether the stream from the peer is up, and how far it got.
    pub connected: bool,
    pub recv_lsn: u64,
    pub recv_commit_lsn: u64,
    pub flush_lsn: u64,
    /// Writers: the last applied remote commit, its time, and how many.
    pub replay_lsn: u64,
    pub replay_time: i64,
    pub ncommits: i64,
}

pub const ERROR_TEXT_LEN: usize = 512;

#[derive(Clone, Copy)]
pub struct ErrorText(pub [u8; ERROR_TEXT_LEN]);

impl Default for ErrorText {
    fn default() -> Self {
        ErrorText([0; ERROR_TEXT_LEN])
    }
}

impl std::fmt::Debug for ErrorText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

impl ErrorText {
    pub fn set(&mut self, s: &str) {
        let mut n = s.len().min(ERROR_TEXT_LEN - 1);
        while !s.is_char_boundary(n) {
            n -= 1;
        }
        self.0 = [0; ERROR_TEXT_LEN];
        self.0[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
    pub fn as_str(&self) -> &str {
        let end = self
            .0
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(ERROR_TEXT_LEN);
        std::str::from_utf8(&self.0[..end]).unwrap_or("")
    }
}

#[derive(Clone, Copy)]
pub struct Tasks {
    pub tasks: [Task; MAX_TASKS],
    pub supervisor_proc: usize,
    /// Databases whose manager should be (re)considered now, e.g. after
    /// `bdr.create_node`.
    pub wake_dbs: [u32; MAX_WAKE_REQUESTS],
    pub next_generation: u64,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks {
            tasks: [Task::default(); MAX_TASKS],
            supervisor_proc: 0,
            wake_dbs: [0; MAX_WAKE_REQUESTS],
            next_generation: 1,
        }
    }
}

// SAFETY: plain data with no process-local pointers; `proc_` addresses a PGPROC,
// which lives in shared memory.
unsafe impl PGRXSharedMemory for Tasks {}

// SAFETY: the only shared memory of this name.
pub static TASKS: PgLwLock<Tasks> = unsafe { PgLwLock::new(c"bdr_worker_tasks") };

pub fn init() {
    pg_shmem_init!(TASKS);
}

impl Tasks {
    pub fn find(&self, role: Role, dboid: u32, subid: u32, writer_id: i32) -> Option<usize> {
        self.tasks.iter().position(|t| {
            t.in_use
                && t.role == role
                && t.dboid == dboid
                && t.subid == subid
                && t.writer_id == writer_id
        })
    }

    pub fn find_or_create(
        &mut self,
        role: Role,
        dboid: u32,
        subid: u32,
        writer_id: i32,
    ) -> Option<usize> {
        if let Some(i) = self.find(role, dboid, subid, writer_id) {
            return Some(i);
        }
        let i = self.tasks.iter().position(|t| !t.in_use)?;
        self.tasks[i] = Task {
            in_use: true,
            role,
            dboid,
            subid,
            writer_id,
            ..Task::default()
        };
        Some(i)
    }
}

/// Records why the task in slot `idx` (of `generation`) failed.
pub fn record_error(idx: usize, generation: u64, msg: &str) {
    let mut t = TASKS.exclusive();
    if let Some(task) = t.tasks.get_mut(idx).filter(|t| t.generation == generation) {
        task.last_error.set(msg);
        task.last_error_time = now();
        // SAFETY: MyProcPid is set for every started backend.
        task.last_error_pid = unsafe { pg_sys::MyProcPid };
        task.connected = false;
    }
}

/// Updates the task in slot `idx` if it still belongs to `generation`.
pub fn update_task(idx: usize, generation: u64, f: impl FnOnce(&mut Task)) {
    let mut t = TASKS.exclusive();
    if let Some(task) = t.tasks.get_mut(idx).filter(|t| t.generation == generation) {
        f(task);
    }
}

pub fn now() -> i64 {
    // SAFETY: reads the clock; no preconditions.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Asks the supervisor to look at `dboid` now; used by `bdr.create_node` at commit.
pub fn wake_supervisor_for(dboid: u32) {
    let proc_ = {
        let mut t = TASKS.exclusive();
        if !t.wake_dbs.contains(&dboid) {
            if let Some(slot) = t.wake_dbs.iter_mut().find(|d| **d == 0) {
                *slot = dboid;
            }
        }
        t.supervisor_proc
    };
    set_latch_of(proc_);
}

pub fn set_latch_of(proc_: usize) {
    if proc_ != 0 {
        // SAFETY: the address is a PGPROC in shared memory recorded by its owner;
        // setting the latch of a PGPROC that was since reused is harmless.
        unsafe { pg_sys::SetLatch(&mut (*(proc_ as *mut pg_sys::PGPROC)).procLatch) };
    }
}

/// The task of the manager of `dboid`, if one runs.
pub fn running_manager(dboid: u32) -> Option<Task> {
    let t = TASKS.share();
    t.find(Role::Manager, dboid, 0, 0)
        .map(|i| t.tasks[i])
        .filter(|t| t.pid != 0)
}

/// Wakes the manager of `dboid`, if one runs, so it notices catalog changes now.
pub fn wake_manager(dboid: u32) {
    set_latch_of(running_manager(dboid).map(|t| t.proc_).unwrap_or(0));
}

/// Updates the task (role, dboid, subid), if there is one.
pub fn update_task_by(role: Role, dboid: u32, subid: u32, f: impl FnOnce(&mut Task)) {
    let mut t = TASKS.exclusive();
    if let Some(i) = t.find(role, dboid, subid, 0) {
        f(&mut t.tasks[i]);
    }
}

fn my_database() -> u32 {
    // SAFETY: MyDatabaseId is set for the life of a connected backend.
    unsafe { pg_sys::MyDatabaseId.to_u32() }
}

/// After the transaction commits, the supervisor starts (or the manager
/// re-reads) the worker of this database; before that they would not see the
/// new catalog rows.
pub fn wake_workers_at_commit() {
    let db = my_database();
    pgrx::callbacks::register_xact_callback(
        pgrx::callbacks::PgXactCallbackEvent::Commit,
        move || {
            wake_supervisor_for(db);
            wake_manager(db);
        },
    );
}
