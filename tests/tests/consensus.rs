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
    assert_eq!(code, "55000", "{msg}");
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
