//! What the global DML lock's machinery also serves: waiting until a
//! node's transaction has been applied everywhere
//! (`bdr.wait_for_xid_progress`), and `bdr.global_lock_table`.

use super::{caught_up, connect, lock_relation, members, node_name, relation_name, Member};
use crate::error::{BdrError, BdrResult};
use bdr_core::dmllock as rules;
use pgrx::prelude::*;

/// `bdr._xid_status`: what became of this node's transaction `xid` (the
/// 32-bit id, of the current or the previous epoch): "committed",
/// "aborted", "in progress", or `None` when it is too old to tell.
pub fn xid_status(xid: u32) -> Option<String> {
    // SAFETY: reads the next transaction id.
    let next = unsafe { pg_sys::ReadNextFullTransactionId().value };
    let mut full = (next & !0xffff_ffff) | xid as u64;
    if full > next {
        full = full.checked_sub(1 << 32)?;
    }
    let text = full.to_string();
    crate::pg::xact::in_subtransaction(|| {
        Spi::get_one_with_args::<String>(
            "SELECT pg_catalog.pg_xact_status($1::text::xid8)",
            &[text.as_str().into()],
        )
    })
    .ok()
    .and_then(|r| r.ok())
    .flatten()
}

/// `bdr.wait_for_xid_progress`: waits until transaction `xid` of node
/// `origin` has been applied here (`allnodes` false) or on every node of
/// the group, at most `bdr.global_lock_timeout`. A transaction that
/// aborted has nothing to wait for.
pub fn wait_for_xid_progress(origin: u32, xid: u32, allnodes: bool) -> BdrResult<()> {
    let timeout_ms = crate::guc::get_int(crate::guc::GLOBAL_LOCK_TIMEOUT).max(0) as i64;
    let started = crate::shmem::now();
    let waited = || (crate::shmem::now() - started) / 1000;
    let left = || {
        if timeout_ms > 0 {
            (timeout_ms - waited()).max(1)
        } else {
            30_000
        }
    };
    let out_of_time = |why: String| -> BdrResult<()> {
        if timeout_ms > 0 && waited() >= timeout_ms {
            Err(BdrError::Timeout {
                msg: format!(
                    "transaction {xid} of node {} was not applied everywhere within {} ms: {why}",
                    node_name(origin),
                    waited()
                ),
                hint: "bdr.global_lock_timeout bounds this wait; see bdr.node_summary and bdr.worker_errors for nodes that are down or behind.".into(),
            })
        } else {
            crate::pg::latch::wait(None, 20);
            Ok(())
        }
    };
    let (me, nodes) = members()?;
    let Some((_, oname, odsn)) = nodes.iter().find(|(id, _, _)| *id == origin) else {
        return Err(BdrError::NoSuchNode(origin.to_string()));
    };
    // The transaction ended on its origin; a marker committed after it
    // there is applied only after it everywhere.
    let marker = loop {
        let step = connect(oname, odsn, left()).and_then(|p| {
            let status = p.xact_status(xid)?;
            if status == "in progress" {
                return Ok(None);
            }
            if status == "aborted" {
                return Ok(Some(None));
            }
            Ok(Some(Some(p.progress_marker()?)))
        });
        match step {
            Ok(Some(m)) => break m,
            Ok(None) => out_of_time(format!("it is still in progress on node \"{oname}\""))?,
            Err(e) => out_of_time(e.to_string())?,
        }
    };
    let Some(marker) = marker else {
        return Ok(());
    };
    let targets = rules::encode_targets(&[(origin, marker)]);
    let wanted: Vec<&Member> = nodes
        .iter()
        .filter(|(id, _, _)| *id != origin && (allnodes || *id == me))
        .collect();
    for (id, name, dsn) in wanted {
        loop {
            let behind = if *id == me {
                caught_up(&targets)
            } else {
                connect(name, dsn, left()).and_then(|p| p.caught_up(&targets))
            };
            match behind {
                Ok(b) if b.is_empty() => break,
                Ok(b) => out_of_time(format!("node \"{name}\": {b}"))?,
                Err(e) => out_of_time(e.to_string())?,
            }
        }
    }
    Ok(())
}

/// `bdr.global_lock_table`: the DML lock on `relid` for this transaction,
/// whatever `bdr.ddl_locking` says.
pub fn global_lock_table(relid: pg_sys::Oid) -> BdrResult<()> {
    if !crate::ddl::in_group() {
        return Err(BdrError::Prerequisite {
            msg: "the local node is not a member of a BDR group".into(),
            hint: "bdr.global_lock_table locks a table on every node of the group.".into(),
        });
    }
    // SAFETY: catalog lookups of an existing relation.
    let (persistence, owner) = unsafe {
        (
            pg_sys::get_rel_persistence(relid) as u8,
            pg_sys::pg_class_ownercheck(relid, pg_sys::GetUserId()),
        )
    };
    if persistence == pg_sys::RELPERSISTENCE_TEMP {
        return Err(BdrError::Refused {
            msg: format!(
                "{} is a temporary table, which does not replicate",
                relation_name(relid)
            ),
            hint: "Lock it with LOCK TABLE.".into(),
        });
    }
    if !owner {
        return Err(BdrError::NotOwner(format!(
            "table {}",
            relation_name(relid)
        )));
    }
    lock_relation(relid)
}
