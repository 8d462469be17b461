//! What the consensus worker of each BDR database shares with the other
//! processes: its inbox of Raft messages from peers (filled by
//! `bdr._consensus_deliver`, which peers call), the requests backends hand
//! it and wait on, and its status for the SQL functions.

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};

/// BDR databases of one instance that can run consensus.
pub const MAX_DBS: usize = 8;
/// Bytes of Raft messages waiting for one worker; more are dropped (Raft
/// sends again).
pub const INBOX_BYTES: usize = 128 * 1024;
/// Requests in flight at once, across databases.
pub const MAX_REQUESTS: usize = 32;
/// The largest command or result.
pub const REQUEST_BYTES: usize = 8 * 1024;
/// The most voters a status shows.
pub const MAX_VOTERS: usize = 32;

#[derive(Clone, Copy, PartialEq, Eq, Default, Debug)]
#[repr(u8)]
pub enum ReqState {
    #[default]
    Free = 0,
    /// Written by a backend, not yet proposed.
    Submitted = 1,
    /// Proposed to Raft; waiting for it to be applied here.
    Proposed = 2,
    /// Applied; the result is in `data`.
    Done = 3,
    /// The backend gave up waiting: the worker frees the slot.
    Abandoned = 4,
}

#[derive(Clone, Copy)]
pub struct Request {
    pub state: ReqState,
    pub dboid: u32,
    pub id: u64,
    /// The waiting backend's PGPROC.
    pub waiter: usize,
    /// When the backend submitted it.
    pub created_at: i64,
    /// Nobody waits for the answer: once proposed, the slot is given up.
    pub detached: bool,
    pub len: usize,
    pub data: [u8; REQUEST_BYTES],
}

impl Default for Request {
    fn default() -> Self {
        Request {
            state: ReqState::Free,
            dboid: 0,
            id: 0,
            waiter: 0,
            created_at: 0,
            detached: false,
            len: 0,
            data: [0; REQUEST_BYTES],
        }
    }
}

/// The worker's view of its Raft group, for `bdr.get_consensus_status()`.
#[derive(Clone, Copy, Default)]
pub struct Status {
    pub node_id: u64,
    pub role: u8,
    pub term: u64,
    pub leader: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    pub voters: [u64; MAX_VOTERS],
    pub nvoters: usize,
    pub updated_at: i64,
}

#[derive(Clone, Copy)]
pub struct Db {
    pub dboid: u32,
    pub worker: usize,
    /// The worker's pid (a PGPROC is reused by other processes later).
    pub worker_pid: i32,
    /// Length-prefixed (u32, little endian) Raft messages.
    pub inbox_used: usize,
    pub inbox: [u8; INBOX_BYTES],
    pub dropped: u64,
    pub status: Status,
    /// `bdr.consensus_disable()`: the worker stops taking part.
    pub disabled: bool,
    /// Consensus connections its worker has open (a new worker starts
    /// from 0, so a worker that died leaks none).
    pub connections: u32,
}

impl Default for Db {
    fn default() -> Self {
        Db {
            dboid: 0,
            worker: 0,
            worker_pid: 0,
            inbox_used: 0,
            inbox: [0; INBOX_BYTES],
            dropped: 0,
            status: Status::default(),
            disabled: false,
            connections: 0,
        }
    }
}

#[derive(Clone, Copy)]
pub struct Shared {
    pub dbs: [Db; MAX_DBS],
    pub requests: [Request; MAX_REQUESTS],
    pub next_id: u64,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            dbs: [Db::default(); MAX_DBS],
            requests: [Request::default(); MAX_REQUESTS],
            next_id: 1,
        }
    }
}

// SAFETY: plain data; the usize fields address PGPROCs in shared memory.
unsafe impl PGRXSharedMemory for Shared {}

// SAFETY: the only shared memory of this name.
pub static CONSENSUS: PgLwLock<Shared> = unsafe { PgLwLock::new(c"bdr_consensus") };

pub fn init() {
    pg_shmem_init!(CONSENSUS);
}

impl Shared {
    pub fn db(&self, dboid: u32) -> Option<&Db> {
        self.dbs.iter().find(|d| d.dboid == dboid)
    }

    pub fn db_mut(&mut self, dboid: u32) -> Option<&mut Db> {
        self.dbs.iter_mut().find(|d| d.dboid == dboid)
    }

    /// The slot of `dboid`, taken if it has none.
    pub fn db_or_take(&mut self, dboid: u32) -> Option<&mut Db> {
        let i = self
            .dbs
            .iter()
            .position(|d| d.dboid == dboid)
            .or_else(|| self.dbs.iter().position(|d| d.dboid == 0))?;
        let d = &mut self.dbs[i];
        if d.dboid != dboid {
            *d = Db::default();
            d.dboid = dboid;
        }
        Some(d)
    }
}

/// Takes one of the instance's consensus connections, if
/// `bdr.raft_group_max_connections` leaves one.
pub fn take_connection(dboid: u32) -> bool {
    let max = crate::guc::get_int(crate::guc::RAFT_GROUP_MAX_CONNECTIONS).max(1) as u32;
    let mut s = CONSENSUS.exclusive();
    let open: u32 = s.dbs.iter().map(|d| d.connections).sum();
    match s.db_mut(dboid) {
        Some(d) if open < max => {
            d.connections += 1;
            true
        }
        _ => false,
    }
}

/// Gives `n` of `dboid`'s connections back.
pub fn give_back_connections(dboid: u32, n: u32) {
    let mut s = CONSENSUS.exclusive();
    if let Some(d) = s.db_mut(dboid) {
        d.connections = d.connections.saturating_sub(n);
    }
}

/// Appends a batch of length-prefixed messages to `dboid`'s inbox and
/// wakes its worker; false when the worker does not run or has no room.
pub fn deliver(dboid: u32, batch: &[u8]) -> bool {
    let worker = {
        let mut s = CONSENSUS.exclusive();
        let Some(d) = s.db_mut(dboid) else {
            return false;
        };
        if d.worker == 0 || d.disabled {
            return false;
        }
        if d.inbox_used + batch.len() > INBOX_BYTES {
            d.dropped += 1;
            return false;
        }
        d.inbox[d.inbox_used..d.inbox_used + batch.len()].copy_from_slice(batch);
        d.inbox_used += batch.len();
        d.worker
    };
    crate::shmem::set_latch_of(worker);
    true
}

/// Takes everything in `dboid`'s inbox.
pub fn take_inbox(dboid: u32) -> Vec<u8> {
    let mut s = CONSENSUS.exclusive();
    match s.db_mut(dboid) {
        Some(d) => {
            let v = d.inbox[..d.inbox_used].to_vec();
            d.inbox_used = 0;
            v
        }
        None => Vec::new(),
    }
}

/// Splits a batch into its messages.
pub fn split_batch(b: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 4 <= b.len() {
        let n = u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]) as usize;
        i += 4;
        if i + n > b.len() {
            break;
        }
        out.push(&b[i..i + n]);
        i += n;
    }
    out
}

/// Appends one message to a batch.
pub fn push_message(batch: &mut Vec<u8>, m: &[u8]) {
    batch.extend_from_slice(&(m.len() as u32).to_le_bytes());
    batch.extend_from_slice(m);
}
