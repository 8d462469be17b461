//! The join's row copy: COPY of every table from the join target's
//! snapshot into this node under the target's origin, and the real last
//! writers of the copied rows and the target's tombstones (`bdr.copied_row`).

use super::*;

pub(super) struct CopySrc {
    pub(super) conn: *mut Peer,
    pub(super) buf: Vec<u8>,
    pub(super) pos: usize,
    pub(super) done: bool,
}

/// Feeds COPY FROM with what the join target's COPY TO sends.
#[pg_guard]
pub(super) unsafe extern "C-unwind" fn copy_read(
    outbuf: *mut std::ffi::c_void,
    minread: std::ffi::c_int,
    maxread: std::ffi::c_int,
) -> std::ffi::c_int {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        COPY_SRC.with(|s| {
            let mut s = s.borrow_mut();
            let Some(src) = s.as_mut() else { return 0 };
            let out = outbuf as *mut u8;
            let mut n = 0usize;
            while n < (minread.max(1) as usize) {
                if src.pos < src.buf.len() {
                    let k = (maxread as usize - n).min(src.buf.len() - src.pos);
                    std::ptr::copy_nonoverlapping(src.buf.as_ptr().add(src.pos), out.add(n), k);
                    src.pos += k;
                    n += k;
                    continue;
                }
                if src.done {
                    break;
                }
                match (*src.conn).receive() {
                    Received::Data(d) => {
                        src.buf = d.to_vec();
                        src.pos = 0;
                    }
                    Received::WouldBlock(fd) => latch::wait(Some(fd), 1000),
                    Received::End => src.done = true,
                }
            }
            n as std::ffi::c_int
        })
    }
}

/// Copies what the target sends of the COPY a `Peer::copy_out_*` started
/// into the local table `t` (its `columns`).
pub(super) fn copy_into(conn: &mut Peer, t: &Table) -> BdrResult<u64> {
    let qualified = CString::new(t.qualified()).unwrap_or_default();
    COPY_SRC.with(|s| {
        *s.borrow_mut() = Some(CopySrc {
            conn: conn as *mut Peer,
            buf: Vec::new(),
            pos: 0,
            done: false,
        })
    });
    // SAFETY: COPY FROM into a table opened here with the lock INSERT takes;
    // the column list is built from palloc'd strings, as the parser would.
    let n = unsafe {
        let rv =
            pg_sys::makeRangeVarFromNameList(pg_sys::stringToQualifiedNameList(qualified.as_ptr()));
        let relid = pg_sys::RangeVarGetRelidExtended(
            rv,
            pg_sys::RowExclusiveLock as i32,
            0,
            None,
            std::ptr::null_mut(),
        );
        let rel = pg_sys::table_open(relid, pg_sys::NoLock as i32);
        let mut cols: *mut pg_sys::List = std::ptr::null_mut();
        for c in &t.columns {
            let cs = CString::new(c.as_str()).unwrap_or_default();
            cols = pg_sys::lappend(
                cols,
                pg_sys::makeString(pg_sys::pstrdup(cs.as_ptr())).cast(),
            );
        }
        let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
        pg_sys::addRangeTableEntryForRelation(
            pstate,
            rel,
            pg_sys::RowExclusiveLock as i32,
            std::ptr::null_mut(),
            false,
            false,
        );
        // The target sends in this database's encoding (the connection asks
        // for it), whatever the caller's client_encoding.
        let encoding = pg_sys::makeDefElem(
            pg_sys::pstrdup(c"encoding".as_ptr()),
            pg_sys::makeString(pg_sys::pstrdup(pg_sys::GetDatabaseEncodingName())).cast(),
            -1,
        );
        let options = pg_sys::lappend(std::ptr::null_mut(), encoding.cast());
        let cstate = pg_sys::BeginCopyFrom(
            pstate,
            rel,
            std::ptr::null_mut(),
            std::ptr::null(),
            false,
            Some(copy_read),
            cols,
            options,
        );
        let n = pg_sys::CopyFrom(cstate);
        pg_sys::EndCopyFrom(cstate);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        n
    };
    // Drain what is left of the COPY (its end) so the connection is usable.
    COPY_SRC.with(|s| {
        if let Some(src) = s.borrow_mut().as_mut() {
            while !src.done {
                // SAFETY: the connection outlives this loop (borrowed above).
                match unsafe { (*src.conn).receive() } {
                    Received::Data(_) => {}
                    Received::WouldBlock(fd) => latch::wait(Some(fd), 1000),
                    Received::End => src.done = true,
                }
            }
        }
        *s.borrow_mut() = None;
    });
    Ok(n)
}

/// The copied rows commit here with the earliest timestamp (any later
/// change must win against them), but a change that streams in later may
/// be older than a row's real last write on the target. So the real writer
/// (commit time and node) of every copied row, and of every delete the
/// target still remembers, is copied too (`bdr.copied_row`): the writers
/// resolve against it as the target does. Runs in the copy's snapshot.
pub(super) fn copy_row_writers(
    tconn: &mut Peer,
    target: &Member,
    tables: &[Table],
) -> BdrResult<()> {
    // Keys print as the tombstone trigger prints them.
    tconn.set_canonical_output()?;
    let dest = Table {
        schema: "bdr".into(),
        name: "copied_row".into(),
        columns: ["relid", "key_hash", "commit_us", "node_id", "deleted"]
            .map(String::from)
            .to_vec(),
    };
    for t in tables {
        let Some(local) = local_relid(t)? else {
            continue;
        };
        tconn.copy_out_row_writers(t, local, target.id)?;
        copy_into(tconn, &dest)?;
    }
    Ok(())
}

/// The oid of the table here of the same name as `t`, if there is one.
pub(super) fn local_relid(t: &Table) -> BdrResult<Option<u32>> {
    let oid: Option<pg_sys::Oid> = Spi::connect(|c| {
        c.select(
            "SELECT pg_catalog.to_regclass($1)::oid",
            None,
            &[t.qualified().as_str().into()],
        )?
        .first()
        .get_one::<pg_sys::Oid>()
    })?;
    Ok(oid.map(|o| o.to_u32()))
}

/// Until this transaction ends, everything it writes is tagged with the join
/// target's origin (so the copy is not streamed to anyone) and its commit
/// records `lsn` as that origin's progress.
pub(super) fn use_origin_until_end_of_transaction(origin_name: &str, lsn: u64) {
    let name = CString::new(origin_name).unwrap_or_default();
    // SAFETY: origin creation is transactional; the session setup is undone
    // by the callbacks below whether the transaction commits or aborts.
    unsafe {
        if pg_sys::replorigin_session_origin != pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            // An earlier attempt in this transaction (e.g. in an exception
            // block) left its session behind.
            pg_sys::replorigin_session_reset();
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
        }
        let mut id = pg_sys::replorigin_by_name(name.as_ptr(), true);
        if id == pg_sys::InvalidRepOriginId as pg_sys::RepOriginId {
            id = pg_sys::replorigin_create(name.as_ptr());
        }
        pg_sys::replorigin_session_setup(id);
        pg_sys::replorigin_session_origin = id;
        pg_sys::replorigin_session_origin_lsn = lsn;
        // The copied rows are the target's state as of the slot's start:
        // every change that streams in after it is newer, whatever the
        // clocks say. So they get the earliest commit time there is (0
        // would mean "now" to PostgreSQL), not the time of the join.
        pg_sys::replorigin_session_origin_timestamp = bdr_core::time::COPIED_COMMIT_TS;
    }
    let reset = || {
        // SAFETY: undoes the session setup above once the commit record (with
        // the origin) is written, or the transaction is gone.
        unsafe {
            pg_sys::replorigin_session_reset();
            pg_sys::replorigin_session_origin = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
            pg_sys::replorigin_session_origin_lsn = 0;
            pg_sys::replorigin_session_origin_timestamp = 0;
        }
    };
    register_xact_callback(PgXactCallbackEvent::Commit, reset);
    register_xact_callback(PgXactCallbackEvent::Abort, reset);
    register_xact_callback(PgXactCallbackEvent::Prepare, reset);
}
