//! Convergence whatever the clocks say: once writes stop, every node holds,
//! for every row, the write with the latest commit timestamp (ties to the
//! higher node id) among all writes ever made to it. One node's clock is
//! skewed with libfaketime (Debian package `faketime`).

use bdr_tests::postgres::{Client, NoTls};
use bdr_tests::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DB: &str = "app";
const CONF: &str = "bdr.min_worker_backoff_delay = 200\nbdr.max_worker_backoff_delay = 1000\n";

fn one(c: &mut Client, q: &str) -> String {
    c.query_one(&format!("SELECT ({q})::text"), &[])
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .get::<_, Option<String>>(0)
        .unwrap_or_default()
}

/// A cluster of `n` nodes where node `skewed` (0-based) runs `seconds` ahead.
fn skewed_group(n: usize, skewed: usize, seconds: f64, schema: &str) -> Cluster {
    let mut c = Cluster::new_stopped(n, CONF);
    c.node_mut(skewed).skew_clock(seconds);
    for i in 0..n {
        c.node_mut(i).start();
    }
    form_group(&c, DB, schema);
    c
}

/// The commit timestamp of the row `id` of table `t`, as text, on `c`.
fn row_stamp(c: &mut Client, t: &str, id: i32) -> String {
    one(
        c,
        &format!("SELECT pg_xact_commit_timestamp(xmin) FROM {t} WHERE id = {id}"),
    )
}

/// node2's clock runs 5 s ahead. node1 applies node2's write, whose commit
/// timestamp lies in node1's future, and then overwrites (updates, deletes,
/// re-inserts) the row locally. The local write must carry a later
/// timestamp than the version it replaced, or node2 keeps its own version
/// while node1 keeps the local one.
#[test]
fn a_local_write_after_a_future_dated_change_wins_on_every_node() {
    let mut c = skewed_group(2, 1, 5.0, "CREATE TABLE t (id int PRIMARY KEY, v text);");
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    n1.batch_execute("INSERT INTO t VALUES (1, 'init'), (2, 'init'), (3, 'init')")
        .unwrap();
    wait_for_replication(&c, DB);
    assert!(
        one(&mut n2, "clock_timestamp() - now() < interval '1 s'") == "true"
            && one(&mut n1, "clock_timestamp()") < one(&mut n2, "clock_timestamp()"),
        "node2's clock is not ahead"
    );

    n2.batch_execute("UPDATE t SET v = 'node2' WHERE id IN (1, 2); DELETE FROM t WHERE id = 3")
        .unwrap();
    wait_for(
        "node1 to apply node2's writes",
        Duration::from_secs(60),
        || {
            (one(
                &mut n1,
                "SELECT string_agg(id || v, ',' ORDER BY id) FROM t",
            ) == "1node2,2node2")
                .then_some(())
        },
    );
    let remote_stamp = row_stamp(&mut n1, "t", 1);
    assert_eq!(
        one(
            &mut n1,
            &format!("'{remote_stamp}'::timestamptz > clock_timestamp()")
        ),
        "true",
        "node2's write should lie in node1's future"
    );

    n1.batch_execute(
        "UPDATE t SET v = 'node1' WHERE id = 1; DELETE FROM t WHERE id = 2; INSERT INTO t VALUES (3, 'node1')",
    )
    .unwrap();
    // The local commit was stamped after the version it replaced, without
    // waiting for node1's clock to get there.
    let local_stamp = row_stamp(&mut n1, "t", 1);
    assert_eq!(
        one(
            &mut n1,
            &format!(
                "'{local_stamp}'::timestamptz > '{remote_stamp}'::timestamptz
                 AND '{local_stamp}'::timestamptz > clock_timestamp()"
            )
        ),
        "true",
        "local stamp {local_stamp}, remote {remote_stamp}"
    );
    wait_for_replication(&c, DB);
    for n in [&mut n1, &mut n2] {
        assert_eq!(
            one(n, "SELECT string_agg(id || v, ',' ORDER BY id) FROM t"),
            "1node1,3node1"
        );
    }

    // The same after node1 crashes right after applying node2's write:
    // what node1 has seen survives the restart (its shared memory does not).
    n2.batch_execute("UPDATE t SET v = 'node2 again' WHERE id = 1")
        .unwrap();
    wait_for(
        "node1 to apply node2's write",
        Duration::from_secs(60),
        || (one(&mut n1, "SELECT v FROM t WHERE id = 1") == "node2 again").then_some(()),
    );
    drop(n1);
    c.node(0).crash();
    c.node_mut(0).start();
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute("UPDATE t SET v = 'node1 after restart' WHERE id = 1")
        .unwrap();
    wait_for_replication(&c, DB);
    for n in [&mut n1, &mut n2] {
        assert_eq!(
            one(n, "SELECT string_agg(id || v, ',' ORDER BY id) FROM t"),
            "1node1 after restart,3node1"
        );
    }
    assert_converged(&c, DB, &["t"]);
}

/// A local transaction on node1 inserts a key and deletes it again; while
/// it is open, node2's insert of the key arrives and its writer waits on
/// it. node1 commits last, so its delete wins: no node keeps the key.
#[test]
fn a_local_insert_and_delete_beats_the_remote_insert_it_held_up() {
    let c = Cluster::start(2, CONF);
    form_group(&c, DB, "CREATE TABLE t (id int PRIMARY KEY, v text);");
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    let mut local = c.node(0).connect(DB);
    local
        .batch_execute("BEGIN; INSERT INTO t VALUES (1, 'local'); DELETE FROM t WHERE id = 1")
        .unwrap();
    n2.batch_execute("INSERT INTO t VALUES (1, 'remote')")
        .unwrap();
    wait_for(
        "node1's writer to wait for the local transaction",
        Duration::from_secs(60),
        || {
            let n: i64 = n1
                .query_one(
                    "SELECT count(*) FROM bdr.worker_tasks w JOIN pg_stat_activity a ON a.pid = w.task_pid
                      WHERE w.task_key_worker_role_name = 'writer' AND a.wait_event_type = 'Lock'",
                    &[],
                )
                .unwrap()
                .get(0);
            (n > 0).then_some(())
        },
    );
    local.batch_execute("COMMIT").unwrap();
    wait_for_replication(&c, DB);
    for n in [&mut n1, &mut n2] {
        assert_eq!(one(n, "SELECT count(*) FROM t"), "0");
    }
    assert_converged(&c, DB, &["t"]);
}

/// node2 updates row 1 while node1, a moment later, moves it to key 2
/// (both before either hears of the other). node1's key change is the later
/// write: it deleted key 1, so node2's older update of key 1 must not bring
/// the row back on node1 alone.
#[test]
fn a_key_changing_update_deletes_the_old_key_for_older_changes() {
    let c = Cluster::start(2, CONF);
    form_group(&c, DB, "CREATE TABLE t (id int PRIMARY KEY, v text);");
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    n1.batch_execute("INSERT INTO t VALUES (1, 'init')")
        .unwrap();
    wait_for_replication(&c, DB);
    pause_subscriptions(&c, DB);
    n2.batch_execute("UPDATE t SET v = 'node2' WHERE id = 1")
        .unwrap();
    n1.batch_execute("UPDATE t SET id = 2 WHERE id = 1")
        .unwrap();
    resume_subscriptions(&c, DB);
    for n in [&mut n1, &mut n2] {
        assert_eq!(
            one(n, "SELECT string_agg(id || v, ',' ORDER BY id) FROM t"),
            "2init"
        );
    }
    assert_converged(&c, DB, &["t"]);
}

/// node1 inserts key 1; node2 moves it to key 2 before node3 has heard of
/// the insert. node3 then applies the key change as an insert of key 2, and
/// node1's older insert of key 1 must not bring key 1 back there.
#[test]
fn a_key_change_that_overtook_the_insert_of_the_old_key_wins() {
    let c = Cluster::start(3, CONF);
    form_group(&c, DB, "CREATE TABLE t (id int PRIMARY KEY, v text);");
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    let mut n3 = c.node(2).connect(DB);
    stop_receiving_from(&mut n3, "node1");
    n1.batch_execute("INSERT INTO t VALUES (1, 'node1')")
        .unwrap();
    wait_for("node2 to apply the insert", Duration::from_secs(60), || {
        (one(&mut n2, "SELECT count(*) FROM t") == "1").then_some(())
    });
    n2.batch_execute("UPDATE t SET id = 2 WHERE id = 1")
        .unwrap();
    wait_for(
        "node3 to apply the key change",
        Duration::from_secs(60),
        || (one(&mut n3, "SELECT count(*) FROM t WHERE id = 2") == "1").then_some(()),
    );
    n3.batch_execute(
        "SELECT bdr.alter_subscription_enable(sub_name) FROM bdr.subscription_summary WHERE origin_name = 'node1'",
    )
    .unwrap();
    wait_for_mesh(&c, DB);
    wait_for_replication(&c, DB);
    for n in [&mut n1, &mut n2, &mut n3] {
        assert_eq!(
            one(n, "SELECT string_agg(id || v, ',' ORDER BY id) FROM t"),
            "2node1"
        );
    }
    assert_converged(&c, DB, &["t"]);
}

const HOT: i32 = 12;

/// One client transaction: a few writes to hot keys (in key order, so that
/// clients and writers do not deadlock), each logged in `wlog` in the same
/// transaction with the value it left (NULL: the key is gone).
fn client_txn(
    cl: &mut Client,
    rng: &mut Rng,
    node: &str,
    seq: &mut i64,
) -> Result<(), bdr_tests::postgres::Error> {
    let mut keys: Vec<i32> = (0..1 + rng.below(2))
        .map(|_| rng.below(HOT as u64) as i32)
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let mut tx = cl.transaction()?;
    for id in keys {
        *seq += 1;
        let token = format!("{node}:{seq}");
        let left: Option<Option<String>> = match rng.below(10) {
            // update of a row that may or may not be there
            0..=3 => tx
                .query_opt(
                    "UPDATE hot SET v = $2, node = $3 WHERE id = $1 RETURNING id",
                    &[&id, &token, &node],
                )?
                .map(|_| Some(token.clone())),
            // upsert
            4..=5 => {
                tx.execute(
                    "INSERT INTO hot VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, node = EXCLUDED.node",
                    &[&id, &token, &node],
                )?;
                Some(Some(token.clone()))
            }
            // delete
            6..=7 => tx
                .query_opt("DELETE FROM hot WHERE id = $1 RETURNING id", &[&id])?
                .map(|_| None),
            // insert and delete again in one transaction
            _ => {
                tx.execute(
                    "INSERT INTO hot VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                    &[&id, &token, &node],
                )?;
                tx.execute("DELETE FROM hot WHERE id = $1", &[&id])?;
                Some(None)
            }
        };
        if let Some(v) = left {
            tx.execute(
                "INSERT INTO wlog VALUES ($1, $2, $3, $4)",
                &[&node, &*seq, &id, &v],
            )?;
        }
    }
    tx.commit()
}

/// Three nodes, node3's clock 400 ms ahead; two clients per node update,
/// upsert, delete and insert-then-delete a hot set of keys for 30 seconds
/// while node2 is killed -9 and restarted in the middle. Afterwards every
/// table is identical on every node, and every hot key holds the logged
/// write with the latest commit timestamp (ties: higher node id).
/// `BDR_TEST_SEED` repeats a run's choices (as far as timing allows).
#[test]
fn randomized_writes_with_clock_skew_and_a_crash_converge_to_the_latest_write() {
    let seed: u64 = std::env::var("BDR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("randomized convergence run: BDR_TEST_SEED={seed}");
    let mut c = skewed_group(
        3,
        2,
        0.4,
        "CREATE TABLE hot (id int PRIMARY KEY, v text NOT NULL, node text NOT NULL);
         CREATE TABLE wlog (node text, seq bigint, id int NOT NULL, v text, PRIMARY KEY (node, seq));",
    );
    {
        let mut n1 = c.node(0).connect(DB);
        for id in 0..HOT {
            n1.execute(
                "WITH i AS (INSERT INTO hot VALUES ($1, 'init', 'node1'))
                 INSERT INTO wlog VALUES ('node1', -$1::bigint - 1, $1, 'init')",
                &[&id],
            )
            .unwrap();
        }
    }
    wait_for_replication(&c, DB);

    let stop = Arc::new(AtomicBool::new(false));
    let node2_commits = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(120);
    let clients: Vec<_> = (0..6)
        .map(|k| {
            let i = k % 3;
            let dsn = c.node(i).dsn(DB);
            let node = format!("node{}", i + 1);
            let stop = stop.clone();
            let node2_commits = node2_commits.clone();
            let mut rng = Rng(seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(k as u64 + 1)));
            std::thread::spawn(move || {
                let mut seq: i64 = (k as i64 / 3) * 1_000_000_000;
                let (mut ok, mut failed) = (0u64, 0u64);
                let mut cl: Option<Client> = None;
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let Some(client) = cl.as_mut() else {
                        // Reconnect: the node may be restarting.
                        cl = Some(wait_for_ok(
                            &format!("a connection to {node} again"),
                            Duration::from_secs(60),
                            || Client::connect(&dsn, NoTls),
                        ));
                        continue;
                    };
                    match client_txn(client, &mut rng, &node, &mut seq) {
                        Ok(()) => {
                            ok += 1;
                            if i == 1 {
                                node2_commits.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            failed += 1;
                            if e.as_db_error().is_none() || client.is_closed() {
                                cl = None;
                            }
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect();

    // The writes go on for 30 s; node2 is killed once it has written for
    // 10 s (and committed a few hundred transactions), restarted, and must
    // commit as many again before the clients stop.
    let started = Instant::now();
    wait_for("node2's clients to commit", Duration::from_secs(60), || {
        (started.elapsed() >= Duration::from_secs(10)
            && node2_commits.load(Ordering::Relaxed) >= 300)
            .then_some(())
    });
    c.node(1).crash();
    c.node_mut(1).start();
    let after = node2_commits.load(Ordering::Relaxed);
    wait_for(
        "node2's clients to commit again after the restart",
        Duration::from_secs(90),
        || {
            (started.elapsed() >= Duration::from_secs(30)
                && node2_commits.load(Ordering::Relaxed) >= after + 300)
                .then_some(())
        },
    );
    stop.store(true, Ordering::Relaxed);
    let mut total = (0, 0);
    for h in clients {
        let (ok, failed) = h.join().unwrap();
        total = (total.0 + ok, total.1 + failed);
    }
    eprintln!(
        "client transactions: {} committed, {} failed",
        total.0, total.1
    );
    assert!(total.0 > 1000, "too few transactions committed: {total:?}");

    wait_for_mesh(&c, DB);
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, &["hot", "wlog"]);

    // The expected winner of every key from the log: the latest commit
    // timestamp, ties to the higher node id.
    let mut n1 = c.node(0).connect(DB);
    let ids: HashMap<String, i64> = n1
        .query("SELECT node_name::text, node_id::int8 FROM bdr.node", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let mut winner: HashMap<i32, ((i64, i64), Option<String>)> = HashMap::new();
    for r in n1
        .query(
            "SELECT id, v, node, (extract(epoch FROM pg_xact_commit_timestamp(xmin)) * 1000000)::int8 FROM wlog",
            &[],
        )
        .unwrap()
    {
        let (id, v, node, ts): (i32, Option<String>, String, i64) =
            (r.get(0), r.get(1), r.get(2), r.get(3));
        let rank = (ts, ids[&node]);
        match winner.get(&id) {
            Some((best, _)) if *best >= rank => {}
            _ => {
                winner.insert(id, (rank, v));
            }
        }
    }
    let got: HashMap<i32, String> = n1
        .query("SELECT id, v FROM hot", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    for id in 0..HOT {
        let expected = winner.get(&id).and_then(|(_, v)| v.clone());
        assert_eq!(
            got.get(&id).cloned(),
            expected,
            "key {id} does not hold its latest write (BDR_TEST_SEED={seed})"
        );
    }
}
