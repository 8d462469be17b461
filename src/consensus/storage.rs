//! raft-rs storage for the consensus worker: raft-rs's `MemStorage` holds
//! the log in memory for Raft to read; every change to it is also written
//! to bdr's tables (`bdr.global_consensus_journal`,
//! `bdr.local_consensus_state`, `bdr.local_consensus_snapshot`) in the
//! worker's transaction, from which `load` rebuilds it after a restart.
//! Snapshots are the state machine as applied, which a follower that fell
//! behind the compacted log is sent.

use crate::error::BdrResult;
use bdr_core::consensus::{Applied, Command, State};
use protobuf::Message as _;
use raft::prelude::*;
use raft::storage::MemStorage;
use raft::{GetEntriesContext, RaftState, Storage, StorageError};
use std::cell::RefCell;
use std::rc::Rc;

/// The state machine and what it has applied.
#[derive(Default)]
pub struct Durable {
    pub state: State,
    pub applied: u64,
    pub applied_term: u64,
    pub conf: ConfState,
    pub snapshot_index: u64,
}

#[derive(Clone)]
pub struct Store {
    node_id: u64,
    mem: MemStorage,
    sm: Rc<RefCell<Durable>>,
}

fn bytes_of(m: &impl protobuf::Message) -> Vec<u8> {
    m.write_to_bytes().unwrap_or_default()
}

impl Store {
    /// Rebuilds the storage from the tables.
    pub fn load(node_id: u64) -> BdrResult<(Store, Durable)> {
        let mem = MemStorage::new();
        let mut d = Durable::default();
        let snap = crate::catalog::consensus_snapshot_point()?;
        let state = crate::catalog::consensus_state_row(node_id as u32)?;
        let Some(row) = state else {
            // A node that joins: it learns the group from the leader.
            let store = Store {
                node_id,
                mem,
                sm: Rc::new(RefCell::new(Durable::default())),
            };
            return Ok((store, d));
        };
        let mut cs = ConfState::default();
        let _ = cs.merge_from_bytes(&row.conf_state);
        if let Some((i, t)) = snap {
            let mut s = Snapshot::default();
            s.mut_metadata().index = i as u64;
            s.mut_metadata().term = t as u64;
            s.mut_metadata().set_conf_state(cs.clone());
            let _ = mem.wl().apply_snapshot(s);
            d.snapshot_index = i as u64;
        }
        let entries: Vec<Entry> = crate::catalog::consensus_entries_after(d.snapshot_index as i64)?
            .iter()
            .filter_map(|b| {
                let mut e = Entry::default();
                e.merge_from_bytes(b).is_ok().then_some(e)
            })
            .collect();
        let _ = mem.wl().append(&entries);
        let hs = HardState {
            term: row.term as u64,
            vote: row.vote as u64,
            // What was applied was committed, whatever the last write of
            // the commit index said.
            commit: (row.commit.max(row.apply) as u64).max(d.snapshot_index),
            ..Default::default()
        };
        mem.wl().set_hardstate(hs);
        mem.wl().set_conf_state(cs.clone());
        d.state = State::decode(&row.sm_state).unwrap_or_default();
        d.applied = (row.apply as u64).max(d.snapshot_index);
        d.applied_term = mem.term(d.applied).unwrap_or(0);
        d.conf = cs;
        let out = Durable {
            state: d.state.clone(),
            applied: d.applied,
            applied_term: d.applied_term,
            conf: d.conf.clone(),
            snapshot_index: d.snapshot_index,
        };
        let store = Store {
            node_id,
            mem,
            sm: Rc::new(RefCell::new(d)),
        };
        Ok((store, out))
    }

    /// Appends entries from a Ready, replacing any conflicting suffix.
    pub fn append(&self, entries: &[Entry]) -> BdrResult<()> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        for e in entries {
            let (origin, req) = bdr_core::consensus::Proposal::decode(&e.data)
                .map(|p| (p.origin as u32, p.request_id as i64))
                .unwrap_or((0, 0));
            crate::catalog::append_consensus_entry(
                e.index as i64,
                e.term as i64,
                origin,
                req,
                &bytes_of(e),
                e.index == first.index,
            )?;
        }
        let _ = self.mem.wl().append(entries);
        Ok(())
    }

    pub fn set_hard_state(&self, hs: HardState) -> BdrResult<()> {
        self.mem.wl().set_hardstate(hs);
        self.save_applied()
    }

    /// Records the commit index (only that: MemStorage's own commit_to
    /// also rewrites the term).
    pub fn commit_to(&self, index: u64) {
        let mut w = self.mem.wl();
        if index > w.hard_state().commit {
            w.mut_hard_state().commit = index;
        }
    }

    pub fn set_conf_state(&self, cs: ConfState) {
        self.mem.wl().set_conf_state(cs.clone());
        self.sm.borrow_mut().conf = cs;
    }

    pub fn applied_to(&self, index: u64, term: u64) {
        let mut d = self.sm.borrow_mut();
        if index > d.applied {
            d.applied = index;
            d.applied_term = term;
        }
    }

    pub fn apply_command(&self, c: &Command, index: u64, term: u64) -> Applied {
        let a = self.sm.borrow_mut().state.apply(c);
        self.applied_to(index, term);
        a
    }

    /// Writes Raft's hard state and what is applied.
    pub fn save_applied(&self) -> BdrResult<()> {
        let hs = self.mem.rl().hard_state().clone();
        let d = self.sm.borrow();
        crate::catalog::save_consensus_state(
            self.node_id as u32,
            &crate::catalog::ConsensusRow {
                term: hs.term as i64,
                vote: hs.vote as u32,
                commit: hs.commit as i64,
                apply: d.applied as i64,
                conf_state: bytes_of(&d.conf),
                sm_state: d.state.encode(),
            },
        )?;
        Ok(())
    }

    /// A snapshot from the leader replaces the log and the state machine.
    pub fn apply_snapshot(&self, s: Snapshot) -> BdrResult<()> {
        let meta = s.get_metadata().clone();
        {
            let mut d = self.sm.borrow_mut();
            d.state = State::decode(&s.data).unwrap_or_default();
            d.applied = meta.index;
            d.applied_term = meta.term;
            d.conf = meta.get_conf_state().clone();
            d.snapshot_index = meta.index;
        }
        let _ = self.mem.wl().apply_snapshot(s.clone());
        crate::catalog::drop_consensus_entries(None)?;
        self.record_snapshot(meta.index, meta.term)?;
        self.save_applied()
    }

    fn record_snapshot(&self, index: u64, term: u64) -> BdrResult<()> {
        crate::catalog::record_consensus_snapshot(
            index as i64,
            term as i64,
            &self.sm.borrow().state.encode(),
        )
    }

    /// (index of the last compaction, applied index)
    pub fn compaction_state(&self) -> (u64, u64) {
        let d = self.sm.borrow();
        (d.snapshot_index, d.applied)
    }

    /// Drops the log before `point`.
    pub fn compact(&self, point: u64) -> BdrResult<()> {
        let term = self.mem.term(point - 1).unwrap_or(0);
        self.mem
            .wl()
            .compact(point)
            .map_err(|e| crate::error::BdrError::Prerequisite {
                msg: format!("compacting the consensus log: {e}"),
                hint: String::new(),
            })?;
        crate::catalog::drop_consensus_entries(Some(point as i64))?;
        self.sm.borrow_mut().snapshot_index = point - 1;
        self.record_snapshot(point - 1, term)
    }
}

impl Storage for Store {
    fn initial_state(&self) -> raft::Result<RaftState> {
        self.mem.initial_state()
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        self.mem.entries(low, high, max_size, context)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.mem.term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.mem.first_index()
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.mem.last_index()
    }

    /// The state machine as applied here: what a follower behind the
    /// compacted log restarts from.
    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        let d = self.sm.borrow();
        if d.applied < request_index {
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut s = Snapshot {
            data: d.state.encode().into(),
            ..Default::default()
        };
        let m = s.mut_metadata();
        m.index = d.applied;
        m.term = d.applied_term;
        m.set_conf_state(d.conf.clone());
        Ok(s)
    }
}
