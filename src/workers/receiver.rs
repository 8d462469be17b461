//! The receiver: one per subscription. It streams the peer's changes from
//! its slot over a replication connection, passes each message to its writer
//! through a shared-memory queue, and tells the peer how far it may release
//! WAL: only as far as the writer's commits are durable here.

use super::queue::{self, Queues, Recv, Sent};
use super::{launch, manager_generation, recording_errors, Running};
use crate::catalog::{self, SubRow};
use crate::guc;
use crate::pg::latch::{attach_die_handlers, reload_config_if_asked, wait};
use crate::shmem::{self, now, ExitKind, Role};
use crate::walrcv::{ident, Conn, Received};
use bdr_core::backoff::Jitter;
use bdr_core::lsn::{self, FlushTracker};
use bdr_core::protocol::{self, Boundary, Frame};
use pgrx::bgworkers::*;
use pgrx::prelude::*;

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn bdr_receiver_main(arg: pg_sys::Datum) {
    attach_die_handlers();
    let idx = arg.value();
    let (generation, _) = super::extra();
    let Some(task) = super::attach_task(idx, generation) else {
        return;
    };
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(task.dboid)), None);
    recording_errors(idx, generation, "receiver", || {
        run(idx, generation, task.dboid, task.subid)
    });
}

/// Creates the subscription's replication origin if needed; returns where
/// applying stopped, which is where streaming resumes.
fn origin_progress(name: &str) -> u64 {
    let cname = std::ffi::CString::new(name).unwrap_or_default();
    BackgroundWorker::transaction(|| {
        // SAFETY: origin lookup/creation inside a transaction, as worker.c does.
        unsafe {
            let mut id = pg_sys::replorigin_by_name(cname.as_ptr(), true);
            if id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
                id = pg_sys::replorigin_create(cname.as_ptr());
            }
            pg_sys::replorigin_get_progress(id, false)
        }
    })
}

struct Stream {
    idx: usize,
    generation: u64,
    queues: Queues,
    writer: Running,
    tracker: FlushTracker,
    commits_sent: u64,
    commits_acked: u64,
    /// Furthest position the peer told us about, and whether a transaction
    /// is partly passed on.
    last_recv: u64,
    in_txn: bool,
    last_reported: (u64, u64),
    last_report_time: i64,
}

impl Stream {
    fn drain_acks(&mut self) {
        loop {
            match self.queues.from_writer.receive(true) {
                Recv::Msg(b) => {
                    if let Some((remote, local)) = queue::decode_ack(b) {
                        self.tracker.applied(remote, local);
                        self.commits_acked += 1;
                    }
                }
                Recv::WouldBlock => return,
                Recv::Detached => crate::fail!(
                    ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "the writer of this subscription exited"
                ),
            }
        }
    }

    fn check_writer(&self) {
        if let Err(BackgroundWorkerStatus::Stopped) = self.writer.handle.pid() {
            crate::fail!(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "the writer of this subscription exited"
            );
        }
    }

    fn forward(&mut self, conn: &Conn, data: &[u8]) {
        loop {
            match self.queues.to_writer.send(data, true) {
                Sent::Ok => return,
                Sent::Detached => crate::fail!(
                    ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    "the writer of this subscription exited"
                ),
                Sent::WouldBlock => {
                    // The writer is behind: take its acknowledgements meanwhile,
                    // so it never waits on us while we wait on it, and keep
                    // telling the peer how far we are, or its walsender
                    // would give up on us (wal_sender_timeout).
                    self.drain_acks();
                    self.check_writer();
                    self.report(conn, false);
                    wait(None, 100);
                    reload_config_if_asked();
                }
            }
        }
    }

    /// Sends a status update when something changed, when one is due
    /// (wal_receiver_status_interval), or when `force`d; returns the flushed
    /// position.
    fn report(&mut self, conn: &Conn, force: bool) -> u64 {
        // SAFETY: reads the local WAL flush position; no preconditions.
        let local_flush = unsafe { pg_sys::GetFlushRecPtr(std::ptr::null_mut()) };
        self.drain_acks();
        if !self.in_txn && self.commits_acked == self.commits_sent {
            self.tracker.idle_at(self.last_recv);
        }
        let flushed = self.tracker.flushed_up_to(local_flush);
        // SAFETY: reading PostgreSQL's settings in the process that owns them.
        let status_ms = unsafe { pg_sys::wal_receiver_status_interval as i64 * 1000 };
        let ts = now();
        let due = status_ms > 0 && ts - self.last_report_time >= status_ms * 1000;
        if force || due || (self.last_recv, flushed) != self.last_reported {
            conn.send(&protocol::status_update(
                self.last_recv,
                flushed,
                flushed,
                ts,
                false,
            ));
            self.last_reported = (self.last_recv, flushed);
            self.last_report_time = ts;
        }
        flushed
    }
}

fn run(idx: usize, generation: u64, dboid: u32, subid: u32) {
    let manager = manager_generation(dboid);
    let sub: Option<SubRow> = BackgroundWorker::transaction(|| catalog::subscription(subid))
        .unwrap_or_else(|e| {
            crate::fail!(
                ERRCODE_INTERNAL_ERROR,
                "could not read the subscription: {e}"
            )
        });
    let Some(sub) = sub else {
        shmem::update_task(idx, generation, |t| t.exit_kind = ExitKind::Stopped);
        return;
    };
    // A node that joined starts from where its copy of the group's data
    // left each peer (bdr.subscription_start), until it has applied more.
    let start = origin_progress(&sub.origin_name).max(
        BackgroundWorker::transaction(|| catalog::subscription_start(sub.origin_node_id))
            .ok()
            .flatten()
            .unwrap_or(0),
    );

    let mut conn = Conn::connect(&sub.origin_dsn, &sub.sub_name).unwrap_or_else(|e| {
        crate::fail!(
            ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
            "could not connect to node \"{}\" for subscription \"{}\": {e}",
            sub.origin_node_name,
            sub.sub_name
        )
    });

    let (queues, dsm) = queue::create(
        guc::get_int(guc::WRITER_INPUT_QUEUE_SIZE),
        guc::get_int(guc::WRITER_OUTPUT_QUEUE_SIZE),
    );
    // SAFETY: MyProcPid is set; any seed will do.
    let mut jitter = Jitter::new(unsafe { pg_sys::MyProcPid } as u64);
    // A writer that failed takes this receiver down with it, so the manager's
    // backoff governs both; the writer's own slot never waits.
    shmem::update_task_by(Role::Writer, dboid, subid, |t| t.next_launch_not_before = 0);
    let Some(writer) = launch(
        Role::Writer,
        dboid,
        subid,
        &format!("bdr writer {}", sub.sub_name),
        "bdr_writer_main",
        &dsm.to_string(),
        &mut jitter,
    ) else {
        crate::fail!(
            ERRCODE_INSUFFICIENT_RESOURCES,
            "could not start the writer of subscription \"{}\"",
            sub.sub_name
        );
    };

    let cmd = format!(
        "START_REPLICATION SLOT {} LOGICAL {} (proto_version '{}', binary 'true')",
        ident(&sub.slot_name),
        lsn::format(start),
        protocol::PROTO_VERSION
    );
    if let Err(e) = conn.start_copy(&cmd) {
        crate::fail!(
            ERRCODE_CONNECTION_FAILURE,
            "could not start replication from node \"{}\" (slot \"{}\"): {e}",
            sub.origin_node_name,
            sub.slot_name
        );
    }
    shmem::update_task(idx, generation, |t| {
        t.connected = true;
        t.recv_lsn = start;
        t.flush_lsn = start;
    });
    crate::stats::update(dboid, subid, |s| {
        s.nconnect += 1;
        s.connect_time = now();
        s.start_lsn = start;
    });
    // Notes the disconnect however the stream ends (errors unwind through here).
    struct Disconnect(u32, u32);
    impl Drop for Disconnect {
        fn drop(&mut self) {
            crate::stats::update(self.0, self.1, |s| s.last_disconnect_time = now());
        }
    }
    let _disconnect = Disconnect(dboid, subid);
    tracing::info!(
        "subscription \"{}\" streaming from node \"{}\" at {}",
        sub.sub_name,
        sub.origin_node_name,
        lsn::format(start)
    );

    let mut s = Stream {
        idx,
        generation,
        queues,
        writer,
        tracker: FlushTracker::default(),
        commits_sent: 0,
        commits_acked: 0,
        last_recv: start,
        in_txn: false,
        last_reported: (0, 0),
        last_report_time: 0,
    };
    s.tracker.idle_at(start);
    let mut recv_commit = 0u64;
    let mut last_msg = now();
    let mut ping_sent = false;

    loop {
        pgrx::check_for_interrupts!();
        reload_config_if_asked();
        if manager_generation(dboid) != manager {
            // Our manager is gone; its successor starts its own receivers.
            shmem::update_task(idx, generation, |t| t.exit_kind = ExitKind::Stopped);
            return;
        }
        s.drain_acks();
        s.check_writer();

        let fd;
        loop {
            let payload = match conn.receive() {
                Received::WouldBlock(f) => {
                    fd = Some(f);
                    break;
                }
                Received::End => crate::fail!(
                    ERRCODE_CONNECTION_FAILURE,
                    "node \"{}\" ended the replication stream",
                    sub.origin_node_name
                ),
                Received::Data(buf) => match protocol::parse_frame(buf) {
                    Ok(Frame::XLogData {
                        start_lsn,
                        end_lsn,
                        data,
                        ..
                    }) => {
                        s.last_recv = s.last_recv.max(start_lsn).max(end_lsn);
                        data.to_vec()
                    }
                    Ok(Frame::Keepalive {
                        end_lsn,
                        reply_requested,
                        ..
                    }) => {
                        s.last_recv = s.last_recv.max(end_lsn);
                        last_msg = now();
                        ping_sent = false;
                        if reply_requested {
                            // Answer at once, as PostgreSQL's apply worker does.
                            s.report(&conn, true);
                        }
                        continue;
                    }
                    Err(e) => crate::fail!(
                        ERRCODE_PROTOCOL_VIOLATION,
                        "bad frame from node \"{}\": {e}",
                        sub.origin_node_name
                    ),
                },
            };
            last_msg = now();
            ping_sent = false;
            match protocol::peek_boundary(&payload) {
                Ok(Boundary::Begin) => s.in_txn = true,
                Ok(Boundary::Commit { end_lsn }) => {
                    s.in_txn = false;
                    s.commits_sent += 1;
                    recv_commit = end_lsn;
                }
                Ok(Boundary::Other) => {}
                Err(e) => crate::fail!(
                    ERRCODE_PROTOCOL_VIOLATION,
                    "bad message from node \"{}\": {e}",
                    sub.origin_node_name
                ),
            }
            s.forward(&conn, &payload);
        }

        let flushed = s.report(&conn, false);
        // SAFETY: reading PostgreSQL's settings in the process that owns them.
        let timeout_ms = unsafe { pg_sys::wal_receiver_timeout as i64 };
        let ts = now();
        let last_recv = s.last_recv;
        shmem::update_task(s.idx, s.generation, |t| {
            t.recv_lsn = last_recv;
            t.flush_lsn = flushed;
            if recv_commit != 0 {
                t.recv_commit_lsn = recv_commit;
            }
        });
        if timeout_ms > 0 {
            let silent_ms = (ts - last_msg) / 1000;
            if silent_ms > timeout_ms {
                crate::fail!(ERRCODE_CONNECTION_FAILURE,
                    "terminating the stream from node \"{}\": no message for {} ms (wal_receiver_timeout)",
                    sub.origin_node_name, silent_ms
                );
            }
            if silent_ms > timeout_ms / 2 && !ping_sent {
                conn.send(&protocol::status_update(
                    last_recv, flushed, flushed, ts, true,
                ));
                ping_sent = true;
            }
        }
        wait(fd, 1000);
    }
}
