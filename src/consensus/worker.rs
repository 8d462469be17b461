//! The consensus worker: one per BDR database in a group, launched by the
//! manager. It drives a raft-rs `RawNode` (tick, step, ready, persist,
//! send, apply): the log and Raft's hard state go to bdr's tables in one
//! transaction flushed locally (`synchronous_commit = local`, whatever the
//! session's setting) before anything that depends on
//! them is sent, committed commands are applied to the state machine
//! (`bdr_core::consensus::State`) in that transaction too, and the backends
//! waiting for them get their results.

use super::shmem::{self, ReqState, CONSENSUS};
use super::storage::Store;
use crate::catalog;
use crate::peer::Peer;
use crate::shmem::{ExitKind, TASKS};
use bdr_core::consensus::{self as rules, Applied, Proposal, Request, Role, TICK_MS};
use pgrx::bgworkers::*;
use pgrx::prelude::*;
use protobuf::Message as _;
use raft::prelude::*;
use raft::{RawNode, StateRole};
use std::collections::HashMap;

/// A peer: its node id, name and connection string, with the connection
/// once made and when to try again after a failure.
struct Link {
    name: String,
    dsn: String,
    peer: Option<Peer>,
    retry_at: i64,
    failures: u32,
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn bdr_consensus_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let idx = arg.value();
    let (generation, _) = crate::workers::extra();
    let Some(task) = crate::workers::attach_task(idx, generation) else {
        return;
    };
    let dboid = task.dboid;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(dboid)), None);
    crate::workers::recording_errors(idx, generation, "consensus", || run(dboid));
    let mut t = TASKS.exclusive();
    if t.tasks[idx].generation == generation {
        t.tasks[idx].exit_kind = ExitKind::Stopped;
    }
}

/// Whether the worker recorded as (`worker`, a PGPROC address, `pid`) is
/// a live process other than this one.
fn other_worker_alive(worker: usize, pid: i32) -> bool {
    // SAFETY: MyProcPid is set for every started backend.
    let me = unsafe { pg_sys::MyProcPid };
    // SAFETY: the recorded PGPROC lives in shared memory; its pid changes
    // once that process has exited (0, or another process's).
    worker != 0 && pid != 0 && pid != me && unsafe { (*(worker as *mut pg_sys::PGPROC)).pid } == pid
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn run(dboid: u32) {
    let local = BackgroundWorker::transaction(catalog::local_node)
        .ok()
        .flatten()
        .filter(|l| l.node_group_id != 0);
    let Some(local) = local else {
        return;
    };
    let me = local.node_id as u64;
    let (store, durable) = BackgroundWorker::transaction(|| Store::load(me)).unwrap_or_else(|e| {
        crate::fail!(
            ERRCODE_INTERNAL_ERROR,
            "could not read the consensus state: {e}"
        )
    });
    let election =
        rules::election_ticks(crate::guc::get_int(crate::guc::RAFT_ELECTION_TIMEOUT) as i64);
    let config = raft::Config {
        id: me,
        election_tick: election,
        heartbeat_tick: rules::heartbeat_ticks(election),
        applied: durable.applied,
        max_size_per_msg: 16 * 1024,
        max_inflight_msgs: 64,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    let mut node = match RawNode::new(&config, store.clone(), &logger()) {
        Ok(n) => n,
        Err(e) => crate::fail!(ERRCODE_INTERNAL_ERROR, "could not start the Raft node: {e}"),
    };
    {
        let mut s = CONSENSUS.exclusive();
        match s.db_or_take(dboid) {
            // Another worker of this database still runs (one being
            // stopped): two Raft nodes of one id would vote twice.
            Some(d) if other_worker_alive(d.worker, d.worker_pid) => {
                crate::fail!(
                    ERRCODE_OBJECT_IN_USE,
                    "another consensus worker still runs for this database"
                );
            }
            Some(d) => {
                // SAFETY: MyProc is set for every started backend.
                d.worker = unsafe { pg_sys::MyProc } as usize;
                // SAFETY: MyProcPid is set for every started backend.
                d.worker_pid = unsafe { pg_sys::MyProcPid };
                d.connections = 0;
            }
            None => crate::fail!(
                ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
                "more than {} databases run bdr consensus in this instance",
                shmem::MAX_DBS
            ),
        }
    }
    tracing::info!("consensus worker started for node {me}");
    // The one voter of a group need not wait out an election timeout.
    let voters: Vec<u64> = node.raft.prs().conf().voters().ids().iter().collect();
    if voters == [me] {
        let _ = node.campaign();
    }
    let mut links: HashMap<u64, Link> = HashMap::new();
    let mut proposed: HashMap<u64, usize> = HashMap::new();
    let mut last_tick = crate::shmem::now();
    let mut last_members = 0i64;
    loop {
        let now = crate::shmem::now();
        if now - last_members > 1_000_000 {
            last_members = now;
            // A node that left its group (or was parted) takes no more part.
            let member = BackgroundWorker::transaction(|| match catalog::local_node()? {
                Some(l) => catalog::takes_part_in_consensus(&l),
                None => Ok(false),
            });
            if !member.unwrap_or(false) {
                break;
            }
            refresh_links(dboid, &mut links, me);
            free_stale_requests(dboid);
        }
        for m in shmem::split_batch(&shmem::take_inbox(dboid)) {
            if let Ok(msg) = Message::parse_from_bytes(m) {
                // A peer that talks to us is back: no need to wait out the
                // backoff before answering it.
                if let Some(l) = links.get_mut(&msg.from) {
                    if l.peer.is_none() {
                        l.retry_at = 0;
                    }
                }
                let _ = node.step(msg);
            }
        }
        take_requests(dboid, &mut node, &mut proposed);
        while crate::shmem::now() - last_tick >= TICK_MS * 1000 {
            last_tick += TICK_MS * 1000;
            node.tick();
        }
        if node.has_ready() {
            handle_ready(dboid, &mut node, &store, &mut links, &mut proposed);
        }
        publish_status(dboid, &node, &store);
        let wait = (TICK_MS - (crate::shmem::now() - last_tick) / 1000).clamp(1, TICK_MS);
        if !BackgroundWorker::wait_latch(Some(std::time::Duration::from_millis(wait as u64))) {
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading the config file is what SIGHUP asks of a backend.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            let now_election = crate::guc::get_int(crate::guc::RAFT_ELECTION_TIMEOUT) as i64;
            if rules::election_ticks(now_election) != election {
                // raft-rs takes its timeouts at start: start again (the
                // manager relaunches a worker that stopped at once).
                tracing::info!("consensus: bdr.raft_election_timeout changed; restarting");
                break;
            }
        }
    }
    shmem::give_back_connections(
        dboid,
        links.values().filter(|l| l.peer.is_some()).count() as u32,
    );
    let mut s = CONSENSUS.exclusive();
    if let Some(d) = s.db_mut(dboid) {
        d.worker = 0;
    }
}

/// The peers to talk to: the other members of the group that are not parted.
fn refresh_links(dboid: u32, links: &mut HashMap<u64, Link>, me: u64) {
    let Ok(Some(local)) = BackgroundWorker::transaction(catalog::local_node) else {
        return;
    };
    let Ok(peers) = BackgroundWorker::transaction(|| catalog::group_peers(&local)) else {
        return;
    };
    let wanted: Vec<_> = peers
        .into_iter()
        .filter(|p| p.node_id as u64 != me && p.node_state != bdr_core::node::NodeState::Parted)
        .collect();
    let before = links.values().filter(|l| l.peer.is_some()).count();
    links.retain(|id, _| wanted.iter().any(|p| p.node_id as u64 == *id));
    let dropped = before - links.values().filter(|l| l.peer.is_some()).count();
    shmem::give_back_connections(dboid, dropped as u32);
    for p in wanted {
        let l = links.entry(p.node_id as u64).or_insert_with(|| Link {
            name: p.node_name.clone(),
            dsn: p.node_dsn.clone(),
            peer: None,
            retry_at: 0,
            failures: 0,
        });
        if l.dsn != p.node_dsn {
            l.dsn = p.node_dsn.clone();
            if l.peer.take().is_some() {
                shmem::give_back_connections(dboid, 1);
            }
        }
    }
}

/// Frees request slots no backend will read any more: one whose backend
/// died while it waited stays Done (or Proposed, if it never applies).
fn free_stale_requests(dboid: u32) {
    let timeout_us = crate::guc::get_int(crate::guc::RAFT_RESPONSE_TIMEOUT).max(0) as i64 * 1000;
    let now = crate::shmem::now();
    let mut s = CONSENSUS.exclusive();
    for r in s.requests.iter_mut() {
        if r.dboid == dboid
            && r.state != ReqState::Free
            && now - r.created_at > 2 * timeout_us + STALE_MARGIN_US
        {
            *r = Default::default();
        }
    }
}

/// How long past twice the response timeout a request slot is kept.
const STALE_MARGIN_US: i64 = 10_000_000;

/// Proposes what backends submitted.
fn take_requests(dboid: u32, node: &mut RawNode<Store>, proposed: &mut HashMap<u64, usize>) {
    let mut s = CONSENSUS.exclusive();
    // In the order they were submitted: a lock's release queued by one
    // transaction goes before the next transaction's request for it.
    let mut order: Vec<usize> = (0..s.requests.len()).collect();
    order.sort_by_key(|&i| s.requests[i].id);
    for i in order {
        let r = &mut s.requests[i];
        if r.dboid != dboid {
            continue;
        }
        match r.state {
            ReqState::Abandoned => {
                proposed.remove(&r.id);
                *r = Default::default();
            }
            ReqState::Submitted => {
                let Some(req) = Request::decode(&r.data[..r.len]) else {
                    r.len = 0;
                    r.state = ReqState::Done;
                    crate::shmem::set_latch_of(r.waiter);
                    continue;
                };
                // Who proposed it and which request: results go to the
                // proposer's backend only.
                let mut context = node.raft.id.to_le_bytes().to_vec();
                context.extend_from_slice(&r.id.to_le_bytes());
                if let Request::TransferLeader(to) = req {
                    node.transfer_leader(to);
                    let b = Applied {
                        ok: true,
                        value: None,
                        at_us: 0,
                    }
                    .encode();
                    r.data[..b.len()].copy_from_slice(&b);
                    r.len = b.len();
                    r.state = ReqState::Done;
                    crate::shmem::set_latch_of(r.waiter);
                    continue;
                }
                let ok = match req {
                    Request::Command(command) => {
                        let p = Proposal {
                            origin: node.raft.id,
                            request_id: r.id,
                            command,
                        };
                        node.propose(context, p.encode()).is_ok()
                    }
                    Request::TransferLeader(_) => false,
                    Request::AddVoter(id) | Request::RemoveVoter(id) => {
                        let mut cc = ConfChange {
                            node_id: id,
                            ..Default::default()
                        };
                        cc.set_change_type(if matches!(req, Request::AddVoter(_)) {
                            ConfChangeType::AddNode
                        } else {
                            ConfChangeType::RemoveNode
                        });
                        node.propose_conf_change(context, cc).is_ok()
                    }
                };
                // Without a leader the proposal is dropped: tried again on
                // the next round, until the backend gives up.
                if ok && r.detached {
                    // Applied in the log's time; nobody reads the answer.
                    *r = Default::default();
                } else if ok {
                    r.state = ReqState::Proposed;
                    proposed.insert(r.id, i);
                }
            }
            _ => {}
        }
    }
}

fn handle_ready(
    dboid: u32,
    node: &mut RawNode<Store>,
    store: &Store,
    links: &mut HashMap<u64, Link>,
    proposed: &mut HashMap<u64, usize>,
) {
    let mut ready = node.ready();
    let mut sent = send(dboid, links, ready.take_messages());
    let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
    let committed = ready.take_committed_entries();
    let entries = ready.entries().clone();
    let hs = ready.hs().cloned();
    let started = crate::shmem::now();
    let results = persist(node, store, snapshot, &entries, hs, &committed);
    let took_ms = (crate::shmem::now() - started) / 1000;
    if took_ms > crate::guc::get_int(crate::guc::RAFT_LOG_MIN_APPLY_DURATION) as i64 {
        tracing::info!(
            "consensus: writing {} log entries took {took_ms} ms",
            entries.len()
        );
    }
    answer(dboid, results, proposed);
    sent.extend(send(dboid, links, ready.take_persisted_messages()));
    let mut light = node.advance(ready);
    let committed = light.take_committed_entries();
    let commit = light.commit_index();
    if !committed.is_empty() || commit.is_some() {
        // The commit index goes into the same write as what it applies.
        if let Some(c) = commit {
            store.commit_to(c);
        }
        let results = persist(node, store, None, &[], None, &committed);
        answer(dboid, results, proposed);
    }
    sent.extend(send(dboid, links, light.take_messages()));
    node.advance_apply();
    report(node, sent);
    compact(store);
}

/// Writes what a Ready asks to keep and applies the committed entries, in
/// one durable transaction; returns the results for local proposers.
fn persist(
    node: &mut RawNode<Store>,
    store: &Store,
    snapshot: Option<Snapshot>,
    entries: &[Entry],
    hs: Option<HardState>,
    committed: &[Entry],
) -> Vec<(u64, Applied)> {
    let me = node.raft.id;
    // An error raises inside the transaction, so that none of it commits.
    BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
        let body = || -> crate::error::BdrResult<Vec<(u64, Applied)>> {
            Spi::run("SET LOCAL synchronous_commit = local")?;
            if let Some(s) = snapshot {
                store.apply_snapshot(s)?;
            }
            store.append(entries)?;
            if let Some(hs) = hs {
                store.set_hard_state(hs)?;
            }
            let mut results = Vec::new();
            for e in committed {
                if e.data.is_empty() && e.get_entry_type() == EntryType::EntryNormal {
                    store.applied_to(e.index, e.term);
                    continue;
                }
                match e.get_entry_type() {
                    EntryType::EntryNormal => {
                        let Some(p) = Proposal::decode(&e.data) else {
                            store.applied_to(e.index, e.term);
                            continue;
                        };
                        let a = store.apply_command(&p.command, e.index, e.term);
                        if p.origin == me {
                            results.push((p.request_id, a));
                        }
                    }
                    EntryType::EntryConfChange => {
                        let mut cc = ConfChange::default();
                        if cc.merge_from_bytes(&e.data).is_ok() {
                            if let Ok(cs) = node.apply_conf_change(&cc) {
                                store.set_conf_state(cs);
                            }
                        }
                        store.applied_to(e.index, e.term);
                        if e.context.len() == 16 && e.context[..8] == me.to_le_bytes() {
                            let id =
                                u64::from_le_bytes(e.context[8..16].try_into().unwrap_or([0; 8]));
                            results.push((
                                id,
                                Applied {
                                    ok: true,
                                    value: None,
                                    at_us: 0,
                                },
                            ));
                        }
                    }
                    EntryType::EntryConfChangeV2 => store.applied_to(e.index, e.term),
                }
            }
            store.save_applied()?;
            Ok(results)
        };
        match body() {
            Ok(results) => results,
            Err(e) => crate::fail!(
                ERRCODE_INTERNAL_ERROR,
                "could not persist the consensus log: {e}"
            ),
        }
    }))
}

/// Hands results to the backends waiting for them.
fn answer(dboid: u32, results: Vec<(u64, Applied)>, proposed: &mut HashMap<u64, usize>) {
    if results.is_empty() {
        return;
    }
    let mut s = CONSENSUS.exclusive();
    for (id, a) in results {
        let Some(i) = proposed.remove(&id) else {
            continue;
        };
        let r = &mut s.requests[i];
        if r.dboid != dboid || r.id != id {
            continue;
        }
        if r.state == ReqState::Abandoned {
            *r = Default::default();
            continue;
        }
        let b = a.encode();
        let n = b.len().min(shmem::REQUEST_BYTES);
        r.data[..n].copy_from_slice(&b[..n]);
        r.len = n;
        r.state = ReqState::Done;
        crate::shmem::set_latch_of(r.waiter);
    }
}

/// What became of the messages to one peer: delivered or not, and
/// whether they held a snapshot (raft-rs must hear of both, or it waits for
/// a snapshot that never arrived).
struct Sent {
    to: u64,
    delivered: bool,
    snapshot: bool,
}

/// Sends Raft messages to their peers, one batch per peer, over the
/// consensus connections (`Peer::deliver_consensus`). A peer that cannot
/// be reached is tried again after a backoff; Raft sends again what it
/// needs once told (`report`).
fn send(dboid: u32, links: &mut HashMap<u64, Link>, msgs: Vec<Message>) -> Vec<Sent> {
    if msgs.is_empty() {
        return Vec::new();
    }
    // walrcv builds its result tuples with the catalog caches, which need a
    // transaction's resource owner.
    BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
        send_now(dboid, links, msgs)
    }))
}

/// Tells raft-rs which peers did not get their messages and how snapshots
/// went.
fn report(node: &mut RawNode<Store>, sent: Vec<Sent>) {
    for s in sent {
        if !s.delivered {
            node.report_unreachable(s.to);
        }
        if s.snapshot {
            node.report_snapshot(
                s.to,
                if s.delivered {
                    raft::SnapshotStatus::Finish
                } else {
                    raft::SnapshotStatus::Failure
                },
            );
        }
    }
}

fn send_now(dboid: u32, links: &mut HashMap<u64, Link>, msgs: Vec<Message>) -> Vec<Sent> {
    let mut batches: HashMap<u64, (Vec<u8>, bool)> = HashMap::new();
    for m in msgs {
        if let Ok(b) = m.write_to_bytes() {
            let e = batches.entry(m.to).or_default();
            shmem::push_message(&mut e.0, &b);
            e.1 |= m.get_msg_type() == MessageType::MsgSnapshot;
        }
    }
    let now = crate::shmem::now();
    let (min, max) = crate::workers::backoff_settings();
    let mut out = Vec::new();
    for (to, (batch, snapshot)) in batches {
        let mut delivered = false;
        if let Some(l) = links.get_mut(&to) {
            if l.peer.is_none() && now >= l.retry_at && shmem::take_connection(dboid) {
                // bdr.raft_group_max_connections bounds the instance's.
                match Peer::connect(&l.name, &l.dsn, "bdr consensus") {
                    Ok(p) => l.peer = Some(p),
                    Err(e) => {
                        shmem::give_back_connections(dboid, 1);
                        l.failures = l.failures.saturating_add(1);
                        let delay = bdr_core::backoff::delay_ms(l.failures, min, max, 0.5);
                        l.retry_at = now + delay as i64 * 1000;
                        tracing::debug!("consensus: {e}");
                    }
                }
            }
            match l.peer.as_ref().map(|p| p.deliver_consensus(&batch)) {
                Some(Ok(taken)) => {
                    l.failures = 0;
                    delivered = taken;
                }
                Some(Err(e)) => {
                    tracing::debug!("consensus: {e}");
                    l.peer = None;
                    shmem::give_back_connections(dboid, 1);
                }
                None => {}
            }
        }
        out.push(Sent {
            to,
            delivered,
            snapshot,
        });
    }
    out
}

/// Compacts the log once enough of it is applied (`bdr.raft_keep_min_entries`).
fn compact(store: &Store) {
    let keep = crate::guc::get_int(crate::guc::RAFT_KEEP_MIN_ENTRIES).max(0) as u64;
    let (snap_index, applied) = store.compaction_state();
    // A follower behind the compacted log is sent a snapshot instead.
    let Some(point) = rules::compaction_point(snap_index, applied, keep) else {
        return;
    };
    // An error raises inside the transaction, so that none of it commits
    // (a log without its compaction point would not load).
    BackgroundWorker::transaction(std::panic::AssertUnwindSafe(|| {
        let r = Spi::run("SET LOCAL synchronous_commit = local")
            .map_err(crate::error::BdrError::from)
            .and_then(|()| store.compact(point));
        if let Err(e) = r {
            crate::fail!(
                ERRCODE_INTERNAL_ERROR,
                "could not compact the consensus log: {e}"
            );
        }
    }));
}

/// Publishes the node's Raft status for the SQL functions.
fn publish_status(dboid: u32, node: &RawNode<Store>, store: &Store) {
    let st = node.status();
    let role = match st.ss.raft_state {
        StateRole::Leader => Role::Leader,
        StateRole::Candidate | StateRole::PreCandidate => Role::Candidate,
        StateRole::Follower => Role::Follower,
    };
    let voters: Vec<u64> = node.raft.prs().conf().voters().ids().iter().collect();
    let (snap_index, applied) = store.compaction_state();
    let mut s = CONSENSUS.exclusive();
    if let Some(d) = s.db_mut(dboid) {
        let x = &mut d.status;
        x.node_id = node.raft.id;
        x.role = role as u8;
        x.term = st.hs.term;
        x.leader = st.ss.leader_id;
        x.commit = st.hs.commit;
        x.applied = applied;
        x.last_index = node.raft.raft_log.last_index();
        x.snapshot_index = snap_index;
        x.nvoters = voters.len().min(shmem::MAX_VOTERS);
        for (i, v) in voters.iter().take(shmem::MAX_VOTERS).enumerate() {
            x.voters[i] = *v;
        }
        x.updated_at = crate::shmem::now();
    }
}
