//! The two shared-memory queues between a receiver and its writer, in one DSM
//! segment the receiver creates: changes go to the writer
//! (`bdr.writer_input_queue_size`), applied positions come back
//! (`bdr.writer_output_queue_size`).

use pgrx::pg_sys;

const HEADER: usize = 64;

/// One attached end of a queue.
#[derive(Clone, Copy)]
pub struct Mq(*mut pg_sys::shm_mq_handle);

pub struct Queues {
    pub to_writer: Mq,
    pub from_writer: Mq,
}

pub enum Recv<'a> {
    Msg(&'a [u8]),
    WouldBlock,
    Detached,
}

#[derive(PartialEq, Eq)]
pub enum Sent {
    Ok,
    WouldBlock,
    Detached,
}

/// Receiver side: creates the segment and both queues; returns the handle the
/// writer attaches with.
pub fn create(in_kb: i32, out_kb: i32) -> (Queues, u32) {
    let in_size = (in_kb.max(32) as usize) * 1024;
    let out_size = (out_kb.max(1) as usize) * 1024;
    // SAFETY: a new DSM segment kept mapped for the life of this process, laid
    // out as header | input queue | output queue; the queue handles are
    // allocated in TopMemoryContext so they outlive any transaction.
    unsafe {
        let seg = pg_sys::dsm_create(HEADER + in_size + out_size, 0);
        pg_sys::dsm_pin_mapping(seg);
        let base = pg_sys::dsm_segment_address(seg) as *mut u8;
        let sizes = base as *mut u64;
        *sizes = in_size as u64;
        *sizes.add(1) = out_size as u64;
        let inq = pg_sys::shm_mq_create(base.add(HEADER).cast(), in_size);
        let outq = pg_sys::shm_mq_create(base.add(HEADER + in_size).cast(), out_size);
        pg_sys::shm_mq_set_sender(inq, pg_sys::MyProc);
        pg_sys::shm_mq_set_receiver(outq, pg_sys::MyProc);
        let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        let q = Queues {
            to_writer: Mq(pg_sys::shm_mq_attach(inq, seg, std::ptr::null_mut())),
            from_writer: Mq(pg_sys::shm_mq_attach(outq, seg, std::ptr::null_mut())),
        };
        pg_sys::MemoryContextSwitchTo(old);
        (q, pg_sys::dsm_segment_handle(seg))
    }
}

/// Writer side: attaches to the receiver's segment.
pub fn attach(handle: u32) -> Option<Queues> {
    // SAFETY: attaching to a segment the receiver created with the layout above.
    unsafe {
        let seg = pg_sys::dsm_attach(handle);
        if seg.is_null() {
            return None;
        }
        pg_sys::dsm_pin_mapping(seg);
        let base = pg_sys::dsm_segment_address(seg) as *mut u8;
        let sizes = base as *const u64;
        let in_size = *sizes as usize;
        let inq = base.add(HEADER) as *mut pg_sys::shm_mq;
        let outq = base.add(HEADER + in_size) as *mut pg_sys::shm_mq;
        pg_sys::shm_mq_set_receiver(inq, pg_sys::MyProc);
        pg_sys::shm_mq_set_sender(outq, pg_sys::MyProc);
        let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        let q = Queues {
            to_writer: Mq(pg_sys::shm_mq_attach(inq, seg, std::ptr::null_mut())),
            from_writer: Mq(pg_sys::shm_mq_attach(outq, seg, std::ptr::null_mut())),
        };
        pg_sys::MemoryContextSwitchTo(old);
        Some(q)
    }
}

impl Mq {
    pub fn send(self, data: &[u8], nowait: bool) -> Sent {
        // SAFETY: a handle from `create`/`attach`; `data` outlives the call. A
        // WOULD_BLOCK send is retried with the same data, as shm_mq requires.
        let r =
            unsafe { pg_sys::shm_mq_send(self.0, data.len(), data.as_ptr().cast(), nowait, true) };
        match r {
            pg_sys::shm_mq_result::SHM_MQ_SUCCESS => Sent::Ok,
            pg_sys::shm_mq_result::SHM_MQ_WOULD_BLOCK => Sent::WouldBlock,
            _ => Sent::Detached,
        }
    }

    /// The message stays valid until the next receive on this handle.
    pub fn receive<'a>(self, nowait: bool) -> Recv<'a> {
        let mut n: usize = 0;
        let mut data: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: a handle from `create`/`attach`; shm_mq owns the returned bytes.
        let r = unsafe { pg_sys::shm_mq_receive(self.0, &mut n, &mut data, nowait) };
        match r {
            pg_sys::shm_mq_result::SHM_MQ_SUCCESS => {
                // SAFETY: shm_mq returned `n` readable bytes at `data`.
                Recv::Msg(unsafe { std::slice::from_raw_parts(data as *const u8, n) })
            }
            pg_sys::shm_mq_result::SHM_MQ_WOULD_BLOCK => Recv::WouldBlock,
            _ => Recv::Detached,
        }
    }
}

/// What the writer reports after each commit: the remote end LSN it applied
/// and where its local commit record ended.
pub fn encode_ack(remote_end: u64, local_end: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&remote_end.to_le_bytes());
    b[8..].copy_from_slice(&local_end.to_le_bytes());
    b
}

pub fn decode_ack(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() != 16 {
        return None;
    }
    Some((
        u64::from_le_bytes(b[..8].try_into().ok()?),
        u64::from_le_bytes(b[8..].try_into().ok()?),
    ))
}
