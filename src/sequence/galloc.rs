//! Galloc sequences: chunks of the value range handed to nodes by the
//! group's consensus (`Command::SeqAlloc`), so no two nodes ever hold the
//! same value. A node holds its current chunk, as the range of the
//! ordinary sequence, and a reserved one; its manager fetches the next
//! reserved chunk in the background and moves to the reserved one before
//! the current one runs out (`bdr_core::sequence::should_switch`), so a
//! node cut off from the majority goes on until its reserved chunk is used.

use super::{configure, planner};
use crate::catalog::sequences::{self as cat, KindRow, SeqInfo};
use crate::error::{BdrError, BdrResult};
use crate::pg::user::as_bdr;
use bdr_core::consensus::{Command, Request};
use bdr_core::sequence::{should_switch, Chunk, Kind};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::prelude::*;
use std::collections::HashMap;

/// Takes one chunk of `key` from the group.
fn allocate(key: &str, start: i64, info_ty: bdr_core::sequence::SeqType) -> BdrResult<Chunk> {
    let req = Request::Command(Command::SeqAlloc {
        key: key.to_string(),
        start,
        chunk_size: info_ty.chunk_size(),
        max_value: info_ty.max_value(),
        now_us: crate::shmem::now(),
    });
    let applied = crate::consensus::submit(&req, "allocating a galloc chunk")?;
    let value = applied.value.unwrap_or_default();
    if !applied.ok {
        return Err(BdrError::Sequence {
            msg: format!("galloc sequence {key}: {value}"),
            hint: "Every chunk of its type's range is handed out; change it to bigint (ALTER SEQUENCE ... AS bigint, after converting it to local) and convert it again.".into(),
        });
    }
    Chunk::decode(&value).ok_or_else(|| BdrError::Sequence {
        msg: format!("galloc sequence {key}: the group answered \"{value}\""),
        hint: String::new(),
    })
}

/// On the node that converts a sequence: its two chunks, now (this needs
/// a majority of the group; the conversion fails without one).
pub fn take_chunks_now(info: &SeqInfo, start: i64) -> BdrResult<()> {
    let current = allocate(&info.qualified, start, info.ty)?;
    let reserved = allocate(&info.qualified, start, info.ty)?;
    configure(info, Kind::Galloc, 0, Some(current), None)?;
    as_bdr(|| cat::set_chunks(info.oid, Some(current), Some(reserved)))
}

/// `nextval` of a galloc sequence: the sequence's own, with a clear error
/// once this node's chunks are used up. (It does not wait for the manager
/// to move on to the reserved chunk: nextval holds a lock on the sequence
/// until the transaction ends, which the manager's ALTER SEQUENCE waits
/// for. The manager moves on while a tenth of the chunk is left.)
pub fn nextval(seqid: u32) -> i64 {
    // Named before: the failed nextval still holds the sequence's buffer
    // lock when the error is caught, so nothing may read the sequence then.
    // SAFETY: a syscache lookup of a relation's name.
    let name = unsafe {
        let n = pg_sys::get_rel_name(pg_sys::Oid::from(seqid));
        if n.is_null() {
            seqid.to_string()
        } else {
            std::ffi::CStr::from_ptr(n).to_string_lossy().into_owned()
        }
    };
    PgTryBuilder::new(|| planner::plain_nextval(seqid))
        .catch_when(
            PgSqlErrorCode::ERRCODE_SEQUENCE_GENERATOR_LIMIT_EXCEEDED,
            move |_| {
                // SAFETY: MyDatabaseId is set in a connected backend.
                crate::shmem::wake_manager(unsafe { pg_sys::MyDatabaseId.to_u32() });
                out_of_values(&name)
            },
        )
        .execute()
}

fn out_of_values(name: &str) -> ! {
    crate::error::BdrError::Sequence {
        msg: format!("galloc sequence {name} has no values left on this node"),
        hint: "The node takes its next chunk from the group's consensus, which needs a majority of the nodes; retry once the majority is reachable (bdr.sequences shows the chunks this node holds).".into(),
    }
    .raise_with(PgSqlErrorCode::ERRCODE_SEQUENCE_GENERATOR_LIMIT_EXCEEDED)
}

/// What the manager does next for one sequence.
enum Plan {
    Nothing,
    /// Fetch a chunk (to install, or to reserve).
    Fetch,
    /// Move to the reserved chunk.
    Switch,
}

fn plan(row: &KindRow, info: &SeqInfo) -> Plan {
    let Some(current) = row.current else {
        return if row.reserved.is_some() {
            Plan::Switch
        } else {
            Plan::Fetch
        };
    };
    let next = if info.is_called {
        info.last_value.saturating_add(info.increment)
    } else {
        info.last_value
    };
    if row.reserved.is_none() {
        Plan::Fetch
    } else if should_switch(current, next) {
        Plan::Switch
    } else {
        Plan::Nothing
    }
}

/// Failed fetches wait this long before the next try (a node cut off from
/// the majority would otherwise ask every poll).
const RETRY_US: i64 = 5_000_000;

/// The manager's round over the galloc sequences of its database; returns
/// whether there are any (the manager then polls more often).
pub fn tend(failed: &mut HashMap<u32, i64>) -> bool {
    let rows = BackgroundWorker::transaction(|| {
        let inner = || -> BdrResult<Vec<(KindRow, SeqInfo)>> {
            let mut out = Vec::new();
            for r in cat::galloc_sequences()? {
                let info = cat::seq_info(r.seqid)?;
                out.push((r, info));
            }
            Ok(out)
        };
        inner().map_err(|e| e.to_string())
    });
    let rows = match rows {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("could not read the galloc sequences: {e}");
            return true;
        }
    };
    let now = crate::shmem::now();
    for (row, info) in &rows {
        match plan(row, info) {
            Plan::Nothing => {}
            Plan::Switch => {
                let r = BackgroundWorker::transaction(|| switch(row, info));
                if let Err(e) = r {
                    tracing::warn!(
                        "could not move galloc sequence {} to its reserved chunk: {e}",
                        info.regclass
                    );
                }
            }
            Plan::Fetch => {
                if failed.get(&row.seqid).is_some_and(|t| now - *t < RETRY_US) {
                    continue;
                }
                let chunk = allocate(&row.alloc_key, row.start_value.unwrap_or(1), info.ty);
                match chunk {
                    Ok(c) => {
                        failed.remove(&row.seqid);
                        let r = BackgroundWorker::transaction(|| record(row.seqid, c));
                        if let Err(e) = r {
                            tracing::warn!(
                                "could not record a chunk of galloc sequence {}: {e}",
                                info.regclass
                            );
                        }
                    }
                    Err(e) => {
                        failed.insert(row.seqid, now);
                        tracing::warn!(
                            "could not allocate a chunk of galloc sequence {}: {e}",
                            info.regclass
                        );
                    }
                }
            }
        }
    }
    !rows.is_empty()
}

/// Installs the reserved chunk as the sequence's range.
fn switch(row: &KindRow, info: &SeqInfo) -> Result<(), String> {
    let inner = || -> BdrResult<()> {
        // Read again under this transaction: the row may have moved on.
        let Some(now) = cat::kind_of(row.seqid)? else {
            return Ok(());
        };
        let Some(reserved) = now.reserved else {
            return Ok(());
        };
        // Not behind a long transaction that used the sequence (it holds a
        // lock ALTER SEQUENCE waits for): the next poll tries again.
        Spi::run("SET LOCAL lock_timeout = '1s'")?;
        configure(info, Kind::Galloc, 0, Some(reserved), None)?;
        cat::set_chunks(row.seqid, Some(reserved), None)
    };
    inner().map_err(|e| e.to_string())
}

/// Records a chunk the group handed this node: the reserved one, or the
/// current one if there is none.
fn record(seqid: u32, c: Chunk) -> Result<(), String> {
    let inner = || -> BdrResult<()> {
        let Some(now) = cat::kind_of(seqid)? else {
            return Ok(());
        };
        if now.kind != Kind::Galloc {
            return Ok(());
        }
        match (now.current, now.reserved) {
            (None, _) => {
                let info = cat::seq_info(seqid)?;
                configure(&info, Kind::Galloc, 0, Some(c), None)?;
                cat::set_chunks(seqid, Some(c), now.reserved)
            }
            (Some(cur), None) => cat::set_chunks(seqid, Some(cur), Some(c)),
            // Both held already: the chunk is given up (never reused).
            (Some(_), Some(_)) => Ok(()),
        }
    };
    inner().map_err(|e| e.to_string())
}
