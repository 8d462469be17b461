//! Global locks on real instances: the DDL lock (`bdr.ddl_locking = on`)
//! lets one DDL transaction run in the group at a time, works with a node
//! of three down, fails within `bdr.global_lock_timeout` with a clear error
//! while another node holds it, is let go when its holder's node is killed
//! and comes back; advisory locks are the group's. Every test ends by
//! comparing the tables on every node.

use bdr_tests::postgres::Client;
use bdr_tests::*;
use std::time::{Duration, Instant};

const DB: &str = "app";

fn one(c: &mut Client, q: &str) -> Option<String> {
    c.query_one(&format!("SELECT ({q})::text"), &[])
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .get::<_, Option<String>>(0)
}

/// Waits until node `i`'s copy of the consensus state shows `n` locks.
fn wait_for_locks(c: &Cluster, i: usize, n: i64) {
    let mut cl = c.node(i).connect(DB);
    wait_for("the global locks", Duration::from_secs(60), || {
        (one(&mut cl, "SELECT count(*) FROM bdr.global_locks").as_deref() == Some(&n.to_string()))
            .then_some(())
    });
}

#[test]
fn the_ddl_lock_serialises_ddl_survives_a_node_down_and_its_holder_dying() {
    let mut c = Cluster::start(3, "");
    form_group(&c, DB, "CREATE TABLE base (id int PRIMARY KEY, v text);");
    // One node of three down: the majority decides.
    c.node_mut(2).stop("fast");
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute("CREATE TABLE one_down (id int PRIMARY KEY)")
        .unwrap();
    wait_for_locks(&c, 0, 0);

    // A transaction on node1 holds the lock; node2's DDL waits for it and
    // fails after its timeout, naming the holder.
    n1.batch_execute("BEGIN; CREATE TABLE held (id int PRIMARY KEY)")
        .unwrap();
    wait_for_locks(&c, 1, 1);
    let mut n2 = c.node(1).connect(DB);
    let shown = one(
        &mut n2,
        "SELECT origin_node_name || ' ' || lock_type FROM bdr.global_locks",
    );
    assert_eq!(shown.as_deref(), Some("node1 ddl"));
    n2.batch_execute("SET bdr.global_lock_timeout = '2s'")
        .unwrap();
    let started = Instant::now();
    let (code, msg, hint) = expect_error(&mut n2, "CREATE TABLE blocked (id int PRIMARY KEY)");
    let took = started.elapsed();
    assert_eq!(code, "55P03", "{msg}");
    assert!(msg.contains("node \"node1\""), "{msg}");
    assert!(hint.unwrap_or_default().contains("bdr.global_locks"));
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(30),
        "{took:?}"
    );
    // With bdr.ddl_locking off the statement does not ask.
    n2.batch_execute("SET bdr.ddl_locking = off; CREATE TABLE unlocked (id int PRIMARY KEY); RESET bdr.ddl_locking")
        .unwrap();
    // The holder commits: the lock goes, node2's DDL runs.
    n1.batch_execute("COMMIT").unwrap();
    wait_for_ok("the lock to go", Duration::from_secs(30), || {
        n2.batch_execute("CREATE TABLE after_commit (id int PRIMARY KEY)")
    });

    // The stopped node returns and receives what it missed.
    c.node_mut(2).start();
    wait_for_mesh(&c, DB);
    // The holder's node is killed while it holds the lock: the others fail
    // within their timeout, and get the lock once it is back.
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute("BEGIN; CREATE TABLE dies (id int PRIMARY KEY)")
        .unwrap();
    wait_for_locks(&c, 1, 1);
    c.node_mut(0).kill9();
    let (code, msg, _) = expect_error(&mut n2, "CREATE TABLE while_dead (id int PRIMARY KEY)");
    assert_eq!(code, "55P03", "{msg}");
    assert!(msg.contains("node \"node1\""), "{msg}");
    c.node_mut(0).start();
    wait_for_ok(
        "the dead holder's lock to go",
        Duration::from_secs(90),
        || n2.batch_execute("CREATE TABLE after_restart (id int PRIMARY KEY)"),
    );
    wait_for_locks(&c, 1, 0);
    wait_for_mesh(&c, DB);
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute("INSERT INTO after_restart VALUES (1); INSERT INTO base VALUES (1, 'x')")
        .unwrap();
    wait_for_replication(&c, DB);
    let mut n3 = c.node(2).connect(DB);
    assert_eq!(
        one(&mut n3, "SELECT to_regclass('dies') IS NULL AND to_regclass('held') IS NOT NULL AND to_regclass('unlocked') IS NOT NULL").as_deref(),
        Some("true")
    );
    assert_converged(
        &c,
        DB,
        &[
            "base",
            "one_down",
            "held",
            "after_commit",
            "after_restart",
            "unlocked",
        ],
    );
}

#[test]
fn advisory_locks_are_the_groups() {
    let c = Cluster::start(2, "");
    form_group(&c, DB, "CREATE TABLE base (id int PRIMARY KEY);");
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    n1.batch_execute("SELECT bdr.global_advisory_lock(42); SELECT bdr.global_advisory_lock(1, 2)")
        .unwrap();
    n2.batch_execute("SET bdr.global_lock_timeout = '1s'")
        .unwrap();
    let (code, msg, _) = expect_error(&mut n2, "SELECT bdr.global_advisory_lock(42)");
    assert_eq!(code, "55P03", "{msg}");
    // Another key is free.
    n2.batch_execute("SELECT bdr.global_advisory_lock(43)")
        .unwrap();
    assert_eq!(
        one(&mut n1, "bdr.global_advisory_unlock(42)").as_deref(),
        Some("true")
    );
    assert_eq!(
        one(&mut n1, "bdr.global_advisory_unlock(42)").as_deref(),
        Some("false")
    );
    n2.batch_execute("SET bdr.global_lock_timeout = '20s'; SELECT bdr.global_advisory_lock(42)")
        .unwrap();
    // A session's locks go when it ends.
    drop(n1);
    let mut n2b = c.node(1).connect(DB);
    n2b.batch_execute("SET bdr.global_lock_timeout = '20s'; SELECT bdr.global_advisory_lock(1, 2)")
        .unwrap();
    n2.batch_execute("INSERT INTO base VALUES (1)").unwrap();
    // A transaction that holds the DDL lock cannot be prepared; the lock
    // goes with its abort.
    n2.batch_execute("BEGIN; CREATE TABLE prepared (id int PRIMARY KEY)")
        .unwrap();
    let (code, msg, _) = expect_error(&mut n2, "PREPARE TRANSACTION 'p1'");
    assert_eq!(code, "55P03", "{msg}");
    n2.batch_execute("ROLLBACK").unwrap();
    // CREATE INDEX CONCURRENTLY commits on its own: its lock goes when it
    // returns, and the other node's DDL gets it.
    n2.batch_execute("CREATE INDEX CONCURRENTLY base_id ON base (id)")
        .unwrap();
    let mut n1 = c.node(0).connect(DB);
    wait_for_ok(
        "the DDL lock after CONCURRENTLY",
        Duration::from_secs(30),
        || {
            n1.batch_execute(
                "SET bdr.global_lock_timeout = '5s'; CREATE TABLE after_cic (id int PRIMARY KEY)",
            )
        },
    );
    // node2 holds 42 and 43 in one session, (1, 2) in another.
    wait_for_locks(&c, 0, 3);
    wait_for_replication(&c, DB);
    let mut n1 = c.node(0).connect(DB);
    assert_eq!(
        one(
            &mut n1,
            "to_regclass('base_id') IS NOT NULL AND to_regclass('prepared') IS NULL"
        )
        .as_deref(),
        Some("true")
    );
    assert_converged(&c, DB, &["base", "after_cic"]);
}
