//! The group's consensus on real instances: one leader, a key-value store
//! every node agrees on, a new leader when the leader is killed, and a
//! clear error (never a hang) without a majority. Every test ends by
//! comparing the replicated table on every node.

use bdr_tests::postgres::Client;
use bdr_tests::*;
use std::time::Duration;

const DB: &str = "app";
const SCHEMA: &str = "CREATE TABLE kv (id int PRIMARY KEY, v text);";
/// Short timeouts, so that elections and refusals are quick to watch.
const CONF: &str = "bdr.raft_election_timeout = 2000\nbdr.raft_response_timeout = 5000\n";

fn one(c: &mut Client, q: &str) -> Option<String> {
    c.query_one(&format!("SELECT ({q})::text"), &[])
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .get::<_, Option<String>>(0)
}

/// (state, leader id, voting nodes) of a node, as it reports them.
fn status(c: &mut Client) -> Result<(String, i64, i32), String> {
    let r = c
        .query_one(
            "SELECT state, COALESCE(leader_id::bigint, 0), voting_nodes FROM bdr.get_consensus_status()",
            &[],
        )
        .map_err(|e| e.to_string())?;
    Ok((r.get(0), r.get(1), r.get(2)))
}

/// Waits until the running `nodes` agree on one leader among them with
/// `voters` voters; returns the leader's index.
fn wait_for_leader(c: &Cluster, nodes: &[usize], voters: i32, timeout: Duration) -> usize {
    wait_for_ok("one consensus leader", timeout, || {
        let mut seen = Vec::new();
        for &i in nodes {
            let mut cl = c.node(i).connect(DB);
            seen.push((i, status(&mut cl)?));
        }
        let leaders: Vec<_> = seen.iter().filter(|(_, s)| s.0 == "RAFT_LEADER").collect();
        if leaders.len() != 1 {
            return Err(format!("leaders: {seen:?}"));
        }
        let lid = leaders[0].1 .1;
        if seen
            .iter()
            .all(|(_, s)| s.1 == lid && s.1 != 0 && s.2 == voters)
        {
            Ok(leaders[0].0)
        } else {
            Err(format!("not agreed yet: {seen:?}"))
        }
    })
}

fn group(n: usize) -> Cluster {
    let c = Cluster::start(n, CONF);
    form_group(&c, DB, SCHEMA);
    c
}

#[test]
fn three_nodes_elect_one_leader_and_agree_on_keys() {
    let c = group(3);
    wait_for_leader(&c, &[0, 1, 2], 3, Duration::from_secs(60));
    let mut n2 = c.node(1).connect(DB);
    let mut n3 = c.node(2).connect(DB);
    assert!(one(&mut n2, "bdr.consensus_kv_store('k', '{\"a\": 1}')").is_some());
    assert_eq!(
        one(&mut n3, "bdr.consensus_kv_fetch('k')").as_deref(),
        Some("{\"a\": 1}")
    );
    // Compare-and-set: a stale previous value changes nothing.
    assert_eq!(
        one(&mut n3, "bdr.consensus_kv_store('k', '2', '{\"a\": 5}')"),
        None
    );
    assert!(one(&mut n3, "bdr.consensus_kv_store('k', '2', '{\"a\": 1}')").is_some());
    let mut n1 = c.node(0).connect(DB);
    assert_eq!(
        one(&mut n1, "bdr.consensus_kv_fetch('k')").as_deref(),
        Some("2")
    );
    // Absent expected (JSON null): only the first of two such stores wins.
    assert!(one(&mut n1, "bdr.consensus_kv_store('once', '1', 'null')").is_some());
    assert_eq!(
        one(&mut n2, "bdr.consensus_kv_store('once', '2', 'null')"),
        None
    );
    assert_eq!(
        one(&mut n3, "bdr.consensus_kv_fetch('once')").as_deref(),
        Some("1")
    );
    assert_eq!(
        one(&mut n1, "(SELECT state FROM bdr.get_raft_status())").as_deref(),
        one(&mut n1, "(SELECT state FROM bdr.get_consensus_status())").as_deref()
    );
    // The leadership goes where it is sent.
    n1.batch_execute("SELECT bdr.raft_leadership_transfer('node3', true)")
        .unwrap();
    wait_for("node2 to follow node3", Duration::from_secs(30), || {
        let l = one(
            &mut n2,
            "(SELECT leader_name FROM bdr.get_consensus_status())",
        );
        (l.as_deref() == Some("node3")).then_some(())
    });
    // An exported snapshot, imported later, puts the group back to it.
    let snap: Vec<u8> = n1
        .query_one("SELECT bdr.consensus_snapshot_export()", &[])
        .unwrap()
        .get(0);
    assert!(n2
        .query_one("SELECT bdr.consensus_snapshot_verify($1)", &[&snap])
        .unwrap()
        .get::<_, bool>(0));
    n2.batch_execute("SELECT bdr.consensus_kv_store('later', '1')")
        .unwrap();
    n2.execute("SELECT bdr.consensus_snapshot_import($1)", &[&snap])
        .unwrap();
    assert_eq!(one(&mut n3, "bdr.consensus_kv_fetch('later')"), None);
    assert_eq!(
        one(&mut n3, "bdr.consensus_kv_fetch('k')").as_deref(),
        Some("2")
    );
    let (code, _, _) = expect_error(
        &mut n1,
        "SELECT bdr.consensus_snapshot_verify('\\x00'::bytea)",
    );
    assert_eq!(code, "22023");
    // A node with consensus disabled takes no part; the majority goes on.
    n2.batch_execute("SELECT bdr.consensus_disable()").unwrap();
    assert_eq!(
        one(&mut n2, "(SELECT enabled FROM bdr.get_consensus_status())").as_deref(),
        Some("false")
    );
    assert!(one(&mut n1, "bdr.consensus_kv_store('without2', '1')").is_some());
    n2.batch_execute("SELECT bdr.consensus_enable()").unwrap();
    wait_for_ok("node2 to take part again", Duration::from_secs(60), || {
        n2.query_one("SELECT bdr.consensus_kv_fetch('without2')::text", &[])
            .map(|_| ())
    });
    n1.batch_execute("INSERT INTO kv VALUES (1, 'one')")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, &["kv"]);
}

#[test]
fn a_killed_leader_is_replaced_and_rejoins_as_a_follower() {
    let mut c = group(3);
    let leader = wait_for_leader(&c, &[0, 1, 2], 3, Duration::from_secs(60));
    let others: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    c.node_mut(leader).kill9();
    // Within twice the election timeout, plus the time to look.
    let next = wait_for_leader(&c, &others, 3, Duration::from_secs(10));
    assert_ne!(next, leader);
    let mut s = c.node(others[0]).connect(DB);
    assert!(one(&mut s, "bdr.consensus_kv_store('after', '1')").is_some());
    c.node_mut(leader).start();
    let back = wait_for_leader(&c, &[0, 1, 2], 3, Duration::from_secs(60));
    assert_ne!(back, leader, "a restarted node comes back as a follower");
    let mut old = c.node(leader).connect(DB);
    assert_eq!(
        one(&mut old, "bdr.consensus_kv_fetch('after')").as_deref(),
        Some("1")
    );
    old.batch_execute("INSERT INTO kv VALUES (2, 'two')")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, &["kv"]);
}

#[test]
fn without_a_majority_a_store_fails_in_time_and_works_again_after() {
    let mut c = group(3);
    wait_for_leader(&c, &[0, 1, 2], 3, Duration::from_secs(60));
    c.node_mut(1).stop("fast");
    c.node_mut(2).stop("fast");
    let mut n1 = c.node(0).connect(DB);
    let started = std::time::Instant::now();
    let (code, msg, hint) = expect_error(&mut n1, "SELECT bdr.consensus_kv_store('k', '1')");
    // 55000: never proposed (no leader known); 40003: proposed to a leader
    // that lost its majority, so it may still take effect.
    assert!(code == "55000" || code == "40003", "{code}: {msg}");
    assert!(msg.contains("no majority"), "{msg}");
    assert!(hint.is_some());
    // bdr.raft_response_timeout is 5 s here: it gave up then, not later.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    c.node_mut(1).start();
    c.node_mut(2).start();
    wait_for_leader(&c, &[0, 1, 2], 3, Duration::from_secs(60));
    let mut n1 = c.node(0).connect(DB);
    assert!(one(&mut n1, "bdr.consensus_kv_store('k', '1')").is_some());
    n1.batch_execute("INSERT INTO kv VALUES (3, 'three')")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, &["kv"]);
}

#[test]
fn five_voters_follow_joins_and_parts_and_a_lagging_node_still_votes() {
    let mut c = Cluster::start(5, CONF);
    form_group(&c, DB, SCHEMA);
    let all = [0, 1, 2, 3, 4];
    wait_for_leader(&c, &all, 5, Duration::from_secs(60));
    let mut n1 = c.node(0).connect(DB);
    assert_eq!(
        one(&mut n1, "(SELECT status FROM bdr.monitor_group_raft())").as_deref(),
        Some("OK")
    );
    // Parting node5 takes it out of the voters everywhere.
    n1.batch_execute("SELECT bdr.part_node('node5')").unwrap();
    let four = [0, 1, 2, 3];
    wait_for_leader(&c, &four, 4, Duration::from_secs(60));
    c.node_mut(4).stop("fast");
    // node4 applies nothing (its subscriptions are disabled); with node2
    // stopped too, a majority of the voters 1-4 needs node1, node3 and
    // node4: a store that succeeds had node4's vote.
    let mut n4 = c.node(3).connect(DB);
    n4.batch_execute(
        "SELECT bdr.alter_subscription_disable(sub_name) FROM bdr.subscription_summary",
    )
    .unwrap();
    wait_for(
        "node4's apply workers to stop",
        Duration::from_secs(60),
        || (running_apply_workers(&mut n4) == 0).then_some(()),
    );
    c.node_mut(1).stop("fast");
    let mut n3 = c.node(2).connect(DB);
    wait_for_ok(
        "a store with node4 in the majority",
        Duration::from_secs(60),
        || {
            n3.query_one("SELECT bdr.consensus_kv_store('lag', '1')", &[])
                .map(|_| ())
        },
    );
    assert_eq!(
        one(&mut n4, "bdr.consensus_kv_fetch('lag')").as_deref(),
        Some("1")
    );
    n4.batch_execute(
        "SELECT bdr.alter_subscription_enable(sub_name) FROM bdr.subscription_summary",
    )
    .unwrap();
    c.node_mut(1).start();
    let mut n2 = c.node(1).connect(DB);
    n2.batch_execute("INSERT INTO kv VALUES (5, 'five')")
        .unwrap();
    wait_for_mesh_on(&c, DB, &four);
    wait_for_replication_on(&c, DB, &four);
    assert_converged_on(&c, DB, &["kv"], &four);
}

#[test]
fn the_log_is_compacted_and_a_node_that_was_down_catches_up_from_a_snapshot() {
    let mut c = Cluster::start(3, &format!("{CONF}bdr.raft_keep_min_entries = 5\n"));
    form_group(&c, DB, SCHEMA);
    wait_for_leader(&c, &[0, 1, 2], 3, Duration::from_secs(60));
    c.node_mut(2).stop("fast");
    let mut n1 = c.node(0).connect(DB);
    for i in 0..40 {
        n1.batch_execute(&format!("SELECT bdr.consensus_kv_store('n', '{i}')"))
            .unwrap();
    }
    let snap: i64 = n1
        .query_one("SELECT snapshot_index FROM bdr.get_consensus_status()", &[])
        .unwrap()
        .get(0);
    assert!(snap > 5, "compacted up to {snap}");
    let kept: i64 = n1
        .query_one("SELECT count(*) FROM bdr.global_consensus_journal", &[])
        .unwrap()
        .get(0);
    assert!(kept < 40, "{kept} entries kept");
    c.node_mut(2).start();
    wait_for_leader(&c, &[0, 1, 2], 3, Duration::from_secs(60));
    let mut n3 = c.node(2).connect(DB);
    wait_for("node3 to catch up", Duration::from_secs(60), || {
        let s: i64 = n3
            .query_one("SELECT snapshot_index FROM bdr.get_consensus_status()", &[])
            .ok()?
            .get(0);
        (s > 5).then_some(())
    });
    assert_eq!(
        one(&mut n3, "bdr.consensus_kv_fetch('n')").as_deref(),
        Some("39")
    );
    n3.batch_execute("INSERT INTO kv VALUES (6, 'six')")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, &["kv"]);
}

/// Compare-and-set increments of one key from every node while nodes are
/// killed and restarted, never more than one at a time. A call that
/// reported success was applied exactly once; one whose outcome is unknown
/// (40003, or its connection died) may have been: the final value lies
/// between the successes and the successes plus the unknowns.
#[test]
fn compare_and_set_increments_survive_kills_of_a_minority() {
    let seed: u64 = std::env::var("BDR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_c0de);
    println!("BDR_TEST_SEED={seed}");
    let mut c = group(3);
    wait_for_leader(&c, &[0, 1, 2], 3, Duration::from_secs(60));
    c.node(0)
        .connect(DB)
        .batch_execute("SELECT bdr.consensus_kv_store('ctr', '0')")
        .unwrap();
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    // Successful increments so far: the schedule below waits on them.
    let progress = std::sync::Arc::new(AtomicU64::new(0));
    let dsns: Vec<String> = (0..3).map(|i| c.node(i).dsn(DB)).collect();
    let clients: Vec<_> = dsns
        .into_iter()
        .map(|dsn| {
            let (stop, progress) = (stop.clone(), progress.clone());
            std::thread::spawn(move || {
                let (mut ok, mut unknown) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    // Its node may be down for now: until it is back.
                    let mut cl = wait_for_ok("a connection to its node", Duration::from_secs(120), || {
                        bdr_tests::postgres::Client::connect(&dsn, bdr_tests::postgres::NoTls)
                    });
                    while !stop.load(Ordering::Relaxed) {
                        let Ok(r) = cl.query_one("SELECT bdr.consensus_kv_fetch('ctr')::text", &[]) else {
                            break;
                        };
                        let v: String = r.get(0);
                        let n: u64 = v.parse().unwrap_or(0);
                        match cl.query_one(
                            "SELECT bdr.consensus_kv_store('ctr', to_jsonb($1::bigint), to_jsonb($2::bigint)) IS NOT NULL",
                            &[&((n + 1) as i64), &(n as i64)],
                        ) {
                            Ok(r) => {
                                if r.get::<_, bool>(0) {
                                    ok += 1;
                                    progress.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(e) => {
                                let definite = e.code().is_some_and(|c| c.code() == "55000");
                                if !definite {
                                    unknown += 1;
                                }
                                if e.as_db_error().is_none() {
                                    break;
                                }
                            }
                        }
                    }
                }
                (ok, unknown)
            })
        })
        .collect();
    // Waits until the clients have made `n` more increments.
    let advance = |n: u64| {
        let target = progress.load(Ordering::Relaxed) + n;
        wait_for(
            "the clients to go on incrementing",
            Duration::from_secs(60),
            || (progress.load(Ordering::Relaxed) >= target).then_some(()),
        );
    };
    let mut rng = Rng(seed);
    for _ in 0..3 {
        advance(20 + rng.below(30));
        let victim = rng.below(3) as usize;
        c.node_mut(victim).kill9();
        // The majority goes on while it is down.
        advance(5 + rng.below(20));
        c.node_mut(victim).start();
        wait_for_leader(&c, &[0, 1, 2], 3, Duration::from_secs(60));
    }
    advance(20);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut unknown) = (0, 0);
    for t in clients {
        let (o, u) = t.join().unwrap();
        ok += o;
        unknown += u;
    }
    let mut n1 = c.node(0).connect(DB);
    let v: u64 = one(&mut n1, "bdr.consensus_kv_fetch('ctr')")
        .unwrap_or_default()
        .parse()
        .unwrap();
    println!("successes {ok}, unknown {unknown}, final {v}");
    assert!(ok > 0, "no increment succeeded");
    assert!(
        v >= ok && v <= ok + unknown,
        "final {v}, successes {ok}, unknown {unknown}"
    );
    n1.batch_execute("INSERT INTO kv VALUES (7, 'seven')")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, &["kv"]);
}
