//! The manager: one per database that has a local BDR node. It keeps one
//! subscription per active peer in `bdr.subscription` and one receiver
//! running per subscription, relaunching failed receivers no sooner than the
//! backoff allows. It exits when the node or the extension goes.

use super::{launch, reap, record_failure, Running};
use crate::catalog::{self, LocalNode, SubRow};
use crate::shmem::{ExitKind, Role, TASKS};
use bdr_core::backoff::Jitter;
use pgrx::bgworkers::*;
use pgrx::prelude::*;
use std::collections::HashMap;
use std::time::Duration;

/// How often the manager re-reads the catalogs when nothing wakes it.
const POLL: Duration = Duration::from_secs(1);
/// How often the manager looks at its galloc sequences' chunks.
const GALLOC_POLL: Duration = Duration::from_millis(100);
/// How often old tombstones are purged, and how old they must be.
const PURGE_EVERY_US: i64 = 300_000_000;
/// How often the manager lets go of global locks whose holder is gone.
const REAP_EVERY_US: i64 = 3_000_000;

/// How long every peer must have been streaming, and caught up, before old
/// tombstones go: a peer that was away replays its backlog first.
const CAUGHT_UP_FOR_US: i64 = 600_000_000;

/// Forgets deleted keys that no change still in flight can refer to: older
/// than the retention, and only while every peer has been streaming to us
/// for a while and has nothing received left to apply (a peer that was away
/// may still send changes older than the delete).
fn purge_tombstones(dboid: u32, subs: &[SubRow]) {
    let now = crate::shmem::now();
    let caught_up = {
        let t = TASKS.share();
        subs.iter().all(|s| {
            t.find(Role::Receiver, dboid, s.sub_id, 0).is_some_and(|i| {
                let r = &t.tasks[i];
                r.connected && now - r.attached > CAUGHT_UP_FOR_US && r.flush_lsn >= r.recv_lsn
            })
        })
    };
    if !caught_up {
        return;
    }
    if let Err(e) = BackgroundWorker::transaction(catalog::purge_tombstones) {
        tracing::warn!("could not purge old tombstones: {e}");
    }
}

/// Drops the slots and origins of parted nodes that still exist here. A slot
/// still used by a walsender, or an origin by a writer that has not exited
/// yet, is tried again on the next round.
fn drop_parted_artifacts(slots: &[String], origins: &[String]) {
    let r = BackgroundWorker::transaction(|| catalog::drop_parted_artifacts(slots, origins));
    match r {
        Ok(n) if n > 0 => {
            tracing::info!("dropped {n} replication slot(s) and origin(s) of parted nodes")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("could not drop what parted nodes left: {e}"),
    }
}

/// Forgets old conflict history and dropped-table notes.
fn purge_history() {
    if let Err(e) = BackgroundWorker::transaction(catalog::purge_history) {
        tracing::warn!("could not purge old bdr catalog rows: {e}");
    }
}

enum Seen {
    /// The local node, its subscriptions, what parted nodes left, and
    /// whether it takes part in consensus.
    Node(LocalNode, Vec<SubRow>, catalog::PartedLeftovers, bool),
    NoNode,
}

fn read_catalogs() -> Result<Seen, String> {
    BackgroundWorker::transaction(|| {
        let inner = || -> crate::error::BdrResult<Seen> {
            if catalog::database_has_local_node()?.is_none() {
                return Ok(Seen::NoNode);
            }
            let Some(local) = catalog::local_node()? else {
                return Ok(Seen::NoNode);
            };
            let parted = catalog::sync_subscriptions(&local)?;
            let subs = catalog::local_subscriptions()?;
            let consensus = catalog::takes_part_in_consensus(&local)?;
            Ok(Seen::Node(local, subs, parted, consensus))
        };
        inner().map_err(|e| e.to_string())
    })
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn bdr_manager_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let idx = arg.value();
    let (generation, _) = super::extra();
    let Some(task) = super::attach_task(idx, generation) else {
        tracing::warn!("manager started for a task slot that was reassigned; exiting");
        return;
    };
    let dboid = task.dboid;
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(dboid)), None);

    // SAFETY: MyProcPid is set; any seed will do for jitter.
    let mut jitter = Jitter::new(unsafe { pg_sys::MyProcPid } as u64 ^ crate::shmem::now() as u64);
    let mut announced = false;
    let mut receivers: HashMap<u32, Running> = HashMap::new();
    let mut consensus: Option<Running> = None;
    let mut last_purge = crate::shmem::now();
    let mut galloc_failed = HashMap::new();
    // The first round (just after a restart) lets go of what the node held.
    let mut last_reap = 0;
    loop {
        let mut poll = POLL;
        match read_catalogs() {
            Ok(Seen::Node(local, subs, parted, in_consensus)) => {
                if !announced {
                    tracing::info!("manager started for local node \"{}\"", local.node_name);
                    BackgroundWorker::transaction(|| {
                        crate::hlc::prepare_pool();
                        crate::hlc::publish_copied();
                    });
                    if local.node_group_id != 0 {
                        // Peers hold global DML locks this node handed over
                        // before it stopped until they apply a later
                        // transaction of this node: here is one.
                        let r = BackgroundWorker::transaction(crate::dmllock::write_marker);
                        if let Err(e) = r {
                            tracing::warn!("could not write a progress marker: {e}");
                        }
                    }
                    announced = true;
                }
                if local.node_group_id == 0 {
                    crate::join::run_requested_join();
                }
                tend_receivers(dboid, &subs, &mut receivers, &mut jitter);
                let reap = crate::shmem::now() - last_reap > REAP_EVERY_US;
                if reap {
                    last_reap = crate::shmem::now();
                    crate::dmllock::reap();
                }
                if in_consensus {
                    tend_consensus(dboid, &mut consensus, &mut jitter);
                    if reap {
                        crate::globallock::reap(local.node_id);
                    }
                } else if let Some(c) = consensus.take() {
                    let _ = c.handle.terminate();
                }
                crate::hlc::save_floor();
                // Galloc chunks run out at the speed of inserts: look often.
                if local.node_group_id != 0 && crate::sequence::galloc::tend(&mut galloc_failed) {
                    poll = GALLOC_POLL;
                }
                if !parted.slots.is_empty() || !parted.origins.is_empty() {
                    drop_parted_artifacts(&parted.slots, &parted.origins);
                }
                if crate::shmem::now() - last_purge > PURGE_EVERY_US {
                    last_purge = crate::shmem::now();
                    purge_tombstones(dboid, &subs);
                    purge_history();
                }
            }
            Ok(Seen::NoNode) => {
                if announced {
                    tracing::info!("no local BDR node in this database any more; manager exiting");
                }
                stop_all(&mut receivers);
                if let Some(c) = consensus.take() {
                    let _ = c.handle.terminate();
                }
                let mut t = TASKS.exclusive();
                let me = &mut t.tasks[idx];
                if me.generation == generation {
                    me.exit_kind = ExitKind::NothingToDo;
                }
                return;
            }
            Err(e) => {
                stop_all(&mut receivers);
                if let Some(c) = consensus.take() {
                    let _ = c.handle.terminate();
                }
                crate::shmem::record_error(idx, generation, &e);
                // An ERROR here exits the worker; the supervisor restarts it with backoff.
                crate::fail!(
                    ERRCODE_INTERNAL_ERROR,
                    "bdr manager could not read the BDR catalogs: {e}"
                );
            }
        }
        if !BackgroundWorker::wait_latch(Some(poll)) {
            stop_all(&mut receivers);
            if let Some(c) = consensus.take() {
                let _ = c.handle.terminate();
            }
            return;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reading the config file is what SIGHUP asks of a backend.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
}

/// Reaps receivers that exited, stops those whose subscription went away or
/// was disabled, and launches the missing ones the backoff allows.
fn tend_receivers(
    dboid: u32,
    subs: &[SubRow],
    receivers: &mut HashMap<u32, Running>,
    jitter: &mut Jitter,
) {
    let exited: Vec<u32> = receivers
        .iter()
        .filter(|(_, r)| matches!(r.handle.pid(), Err(BackgroundWorkerStatus::Stopped)))
        .map(|(s, _)| *s)
        .collect();
    for sub in exited {
        let r = receivers.remove(&sub).expect("listed above");
        // Its writer ends with it (their queues are gone).
        crate::shmem::update_task_by(Role::Writer, dboid, sub, |w| {
            if w.pid != 0 {
                w.pid = 0;
                w.proc_ = 0;
                w.exited = crate::shmem::now();
            }
        });
        if reap(r.idx) == ExitKind::Unknown {
            tracing::warn!("receiver of subscription {sub} exited with an error; it will be restarted after a backoff");
            record_failure(r.idx, jitter);
        }
    }
    let wanted: Vec<&SubRow> = subs.iter().filter(|s| s.enabled).collect();
    let unwanted: Vec<u32> = receivers
        .keys()
        .filter(|id| !wanted.iter().any(|s| s.sub_id == **id))
        .copied()
        .collect();
    for sub in unwanted {
        if let Some(r) = receivers.remove(&sub) {
            let _ = r.handle.terminate();
            forget_task(dboid, sub);
        }
    }
    for s in wanted {
        if receivers.contains_key(&s.sub_id) {
            continue;
        }
        let name = format!("bdr receiver {}", s.sub_name);
        if let Some(r) = launch(
            Role::Receiver,
            dboid,
            s.sub_id,
            &name,
            "bdr_receiver_main",
            "",
            jitter,
        ) {
            receivers.insert(s.sub_id, r);
        }
    }
}

/// Keeps this database's consensus worker running, relaunching it after a
/// failure no sooner than the backoff allows.
fn tend_consensus(dboid: u32, running: &mut Option<Running>, jitter: &mut Jitter) {
    if let Some(r) = running {
        if !matches!(r.handle.pid(), Err(BackgroundWorkerStatus::Stopped)) {
            return;
        }
        if reap(r.idx) == ExitKind::Unknown {
            tracing::warn!(
                "the consensus worker exited with an error; it will be restarted after a backoff"
            );
            record_failure(r.idx, jitter);
        }
        *running = None;
    }
    *running = launch(
        Role::Consensus,
        dboid,
        0,
        "bdr consensus",
        "bdr_consensus_main",
        "",
        jitter,
    );
}

fn forget_task(dboid: u32, subid: u32) {
    let mut t = TASKS.exclusive();
    for role in [Role::Receiver, Role::Writer] {
        if let Some(i) = t.find(role, dboid, subid, 0) {
            t.tasks[i] = Default::default();
        }
    }
}

fn stop_all(receivers: &mut HashMap<u32, Running>) {
    for (_, r) in receivers.drain() {
        let _ = r.handle.terminate();
    }
}
