//! Core replication between real instances: what replicates, full-mesh
//! convergence under concurrent writes, no echo, crash safety, and a peer
//! that goes away and comes back. Every test ends by comparing the full
//! contents of every replicated table on every node.

use bdr_tests::postgres::Client;
use bdr_tests::*;
use std::time::Duration;

const DB: &str = "app";

const SCHEMA: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE pair AS (a int, b text);
CREATE TABLE kv (id int PRIMARY KEY, v text, n bigint NOT NULL DEFAULT 0);
CREATE TABLE types_t (
    id int PRIMARY KEY,
    b boolean, i2 smallint, i8 bigint, f4 real, f8 double precision, num numeric(20,5),
    t text, vc varchar(10), ch char(3), by bytea, d date, ts timestamp, tstz timestamptz,
    iv interval, u uuid, j json, jb jsonb, arr int[], tarr text[], m mood, p pair,
    inet_c inet, pt point, rng int4range, big text
);
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent(id));
CREATE TABLE serial_t (id bigserial PRIMARY KEY, v text);
CREATE TABLE xlog (node text NOT NULL, seq int NOT NULL);
CREATE TABLE nopk (a int, b text);
";

const TABLES: &[&str] = &[
    "kv", "types_t", "parent", "child", "serial_t", "xlog", "nopk",
];

fn group(n: usize) -> Cluster {
    let c = Cluster::start(n, "");
    form_group(&c, DB, SCHEMA);
    c
}

fn one(c: &mut Client, q: &str) -> String {
    c.query_one(&format!("SELECT ({q})::text"), &[])
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .get::<_, Option<String>>(0)
        .unwrap_or_default()
}

#[test]
fn every_kind_of_change_replicates_to_every_node() {
    let c = group(3);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    let mut n3 = c.node(2).connect(DB);

    // The mesh: every node has a slot for and a subscription from each other.
    for n in [&mut n1, &mut n2, &mut n3] {
        assert_eq!(one(n, "SELECT count(*) FROM bdr.node_slots"), "2");
        assert_eq!(
            one(
                n,
                "SELECT string_agg(subscription_status, ',') FROM bdr.subscription_summary"
            ),
            "replicating,replicating"
        );
        assert_eq!(
            one(
                n,
                "SELECT string_agg(peer_state_name, ',') FROM bdr.node_summary"
            ),
            "ACTIVE,ACTIVE,ACTIVE"
        );
    }

    // INSERT, multi-row, every type, NULLs, large (TOASTed) values.
    n1.batch_execute(
        "INSERT INTO kv SELECT g, 'v' || g FROM generate_series(1, 500) g;
         INSERT INTO types_t VALUES (1, true, 2, 3, 1.5, 2.25, 12345.67891, 'text ''q'' \\ x', 'vc', 'ab',
             '\\x00ff10', '2024-02-29', '2024-01-01 12:34:56.789', '2024-01-01 12:34:56+02', '1 day 2 hours',
             'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2]}', '{\"b\": {\"c\": null}}',
             '{1,NULL,3}', '{\"x y\",NULL,\"\"}', 'happy', ROW(7, 'seven'), '10.0.0.1/8', '(1.5,2)', '[3,7)',
             repeat('large value ', 100000));
         INSERT INTO types_t (id) VALUES (2);
         INSERT INTO parent VALUES (1), (2);
         INSERT INTO child VALUES (10, 1), (20, 2);
         INSERT INTO serial_t (v) VALUES ('a'), ('b');",
    )
    .unwrap();
    // COPY on another node.
    let mut w = n2.copy_in("COPY kv (id, v, n) FROM STDIN").unwrap();
    use std::io::Write;
    for i in 1001..=1200 {
        writeln!(w, "{i}\tcopied {i}\t{i}").unwrap();
    }
    w.finish().unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert_eq!(one(&mut n3, "SELECT count(*) FROM kv"), "700");
    assert_eq!(
        one(&mut n3, "SELECT length(big) FROM types_t WHERE id = 1"),
        "1200000"
    );

    // UPDATE (also of the key), an update that leaves the TOASTed value
    // unchanged, DELETE, each from a different node.
    n2.batch_execute(
        "UPDATE kv SET v = 'updated', n = n + 1 WHERE id <= 100;
         UPDATE kv SET id = id + 10000 WHERE id BETWEEN 101 AND 110;
         UPDATE types_t SET i2 = 99 WHERE id = 1;
         UPDATE types_t SET t = 'now set', arr = '{}' WHERE id = 2;",
    )
    .unwrap();
    n3.batch_execute(
        "DELETE FROM kv WHERE id > 400 AND id <= 500; DELETE FROM child WHERE id = 20;",
    )
    .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert_eq!(
        one(&mut n1, "SELECT count(*) FROM kv WHERE id > 10000"),
        "10"
    );
    assert_eq!(
        one(&mut n1, "SELECT length(big) FROM types_t WHERE id = 1"),
        "1200000"
    );
    assert_eq!(one(&mut n1, "SELECT i2 FROM types_t WHERE id = 1"), "99");

    // A big transaction: more rows than a writer may hold key locks for.
    n2.batch_execute("INSERT INTO kv SELECT g, 'bulk' FROM generate_series(100000, 129999) g")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(
        one(&mut n1, "SELECT count(*) FROM kv WHERE v = 'bulk'"),
        "30000"
    );
    n3.batch_execute("DELETE FROM kv WHERE v = 'bulk'").unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(
        one(&mut n1, "SELECT count(*) FROM kv WHERE v = 'bulk'"),
        "0"
    );
    assert_converged(&c, DB, TABLES);

    // TRUNCATE with CASCADE and RESTART IDENTITY, as on the origin.
    n3.batch_execute("TRUNCATE parent CASCADE; TRUNCATE serial_t RESTART IDENTITY;")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(one(&mut n1, "SELECT count(*) FROM child"), "0");
    n1.batch_execute("INSERT INTO serial_t (v) VALUES ('after')")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(
        one(&mut n2, "SELECT id FROM serial_t WHERE v = 'after'"),
        "1"
    );

    // A table without a primary key: INSERT replicates, UPDATE and DELETE
    // are refused where they are made, saying why and how to fix it.
    n1.batch_execute("INSERT INTO nopk VALUES (1, 'one')")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(one(&mut n2, "SELECT b FROM nopk"), "one");
    let (code, msg, hint) = expect_error(&mut n1, "UPDATE nopk SET b = 'x'");
    assert_eq!(code, "55000", "{msg}");
    assert!(msg.contains("replica identity"), "{msg}");
    assert!(hint.unwrap_or_default().contains("REPLICA IDENTITY"));
    let (code, _, _) = expect_error(&mut n2, "DELETE FROM nopk");
    assert_eq!(code, "55000");
    // With REPLICA IDENTITY FULL they replicate.
    for n in [&mut n1, &mut n2, &mut n3] {
        n.batch_execute("ALTER TABLE nopk REPLICA IDENTITY FULL")
            .unwrap();
    }
    assert_eq!(
        n2.execute("UPDATE nopk SET b = 'uno' WHERE a = 1", &[])
            .unwrap(),
        1
    );
    wait_for_replication(&c, DB);
    assert_eq!(one(&mut n3, "SELECT b FROM nopk"), "uno");

    // bdr.xact_replication = off (SET LOCAL) keeps a transaction local.
    n1.batch_execute(
        "BEGIN; SET LOCAL bdr.xact_replication = off; INSERT INTO kv VALUES (-1, 'local only'); COMMIT;
         INSERT INTO kv VALUES (-2, 'replicated');",
    )
    .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(
        one(
            &mut n2,
            "SELECT string_agg(id::text, ',') FROM kv WHERE id < 0"
        ),
        "-2"
    );
    n1.batch_execute("DELETE FROM kv WHERE id = -1").unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert!(c
        .node(1)
        .log()
        .contains("CONFLICT: delete_missing on \"public\".\"kv\""));

    // A key change meeting a newer row with that key (update_pkey_exists):
    // node2 pauses its stream from node1, node1 moves row 7001 to 7002,
    // node2 inserts its own 7002 later; the newer 7002 wins everywhere and
    // 7001 is gone everywhere.
    n1.batch_execute("INSERT INTO kv VALUES (7001, 'to move')")
        .unwrap();
    wait_for_replication(&c, DB);
    stop_receiving_from(&mut n2, "node1");
    n1.batch_execute("UPDATE kv SET id = 7002, v = 'moved on node1' WHERE id = 7001")
        .unwrap();
    n2.batch_execute("INSERT INTO kv VALUES (7002, 'newer on node2')")
        .unwrap();
    n2.batch_execute("SELECT bdr.alter_subscription_enable()")
        .unwrap();
    wait_for_mesh(&c, DB);
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert_eq!(
        one(
            &mut n3,
            "SELECT string_agg(id || '=' || v, ',') FROM kv WHERE id IN (7001, 7002)"
        ),
        "7002=newer on node2"
    );

    // A table that changes shape (the DDL replicates) is described again to
    // the peers and keeps replicating.
    n1.batch_execute("ALTER TABLE kv ADD COLUMN extra text DEFAULT 'd'")
        .unwrap();
    n1.batch_execute("INSERT INTO kv (id, v, extra) VALUES (-3, 'with extra', 'x'); UPDATE kv SET extra = 'y' WHERE id = 1")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(one(&mut n3, "SELECT extra FROM kv WHERE id = -3"), "x");
    assert_eq!(one(&mut n2, "SELECT extra FROM kv WHERE id = 1"), "y");
    assert_converged(&c, DB, TABLES);
}

/// One node's share of a concurrent workload on shared rows: small
/// transactions of inserts, updates and deletes of ids all nodes touch, each
/// also appending a (node, seq) row to `xlog`, which has no key, so that a
/// transaction applied twice anywhere would show as a duplicate.
fn workload(node: &Instance, name: &str, seed: u64, txns: usize) -> Vec<i32> {
    let mut c = node.connect(DB);
    let mut rng = Rng(seed);
    let mut committed = Vec::new();
    for seq in 0..txns as i32 {
        let mut sql = String::from("BEGIN;");
        for _ in 0..(1 + rng.below(4)) {
            let id = rng.below(300) as i32;
            match rng.below(10) {
                0..=3 => sql.push_str(&format!(
                    "INSERT INTO kv VALUES ({id}, '{name} {seq}', {seq}) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, n = kv.n + 1;"
                )),
                4..=7 => sql.push_str(&format!("UPDATE kv SET v = '{name} upd {seq}', n = n + 1 WHERE id = {id};")),
                _ => sql.push_str(&format!("DELETE FROM kv WHERE id = {id};")),
            }
        }
        sql.push_str(&format!(
            "INSERT INTO xlog VALUES ('{name}', {seq}); COMMIT;"
        ));
        match c.batch_execute(&sql) {
            Ok(()) => committed.push(seq),
            Err(e) => {
                // The node went away (crash test): the session ends with
                // the connection, or with a FATAL "admin shutdown" error.
                let node_gone = c.is_closed()
                    || e.as_db_error().is_none()
                    || e.code().is_some_and(|c| c.code().starts_with("57P"));
                if node_gone {
                    return committed;
                }
                // A client transaction touching several rows can deadlock
                // with a writer applying a peer's transaction on the same
                // rows; PostgreSQL rolls one back, as it would between any
                // two sessions. This one is simply not committed.
                if e.code()
                    .is_some_and(|c| c.code() == "40P01" || c.code() == "40001")
                {
                    c.batch_execute("ROLLBACK").unwrap();
                    continue;
                }
                panic!("{name}: {e:?}");
            }
        }
    }
    committed
}

fn assert_xlog(cluster: &Cluster, expect: &[(&str, Vec<i32>)]) {
    for n in 0..3 {
        let mut c = cluster.node(n).connect(DB);
        let dups: i64 = c
            .query_one("SELECT count(*) FROM (SELECT node, seq FROM xlog GROUP BY 1, 2 HAVING count(*) > 1) d", &[])
            .unwrap()
            .get(0);
        assert_eq!(dups, 0, "a transaction was applied twice on node{}", n + 1);
        for (name, seqs) in expect {
            let got: Vec<i32> = c
                .query("SELECT seq FROM xlog WHERE node = $1 ORDER BY seq", &[name])
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            for s in seqs {
                assert!(
                    got.binary_search(s).is_ok(),
                    "node{} lacks committed transaction {name}/{s}",
                    n + 1
                );
            }
        }
    }
}

#[test]
fn concurrent_writes_on_three_nodes_converge_without_echo_or_duplicates() {
    let c = group(3);
    c.node(0)
        .connect(DB)
        .batch_execute("INSERT INTO kv SELECT g, 'seed' FROM generate_series(0, 299) g")
        .unwrap();
    wait_for_replication(&c, DB);
    let txns = 1500;
    let results: Vec<(String, Vec<i32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let node = c.node(i);
                s.spawn(move || {
                    let name = format!("node{}", i + 1);
                    let done = workload(node, &name, 0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1), txns);
                    (name, done)
                })
            })
            .collect();
        // Meanwhile, TRUNCATE replicates too: node1 refills and empties a table.
        let mut n1 = c.node(0).connect(DB);
        for round in 0..20 {
            n1.batch_execute(&format!(
                "INSERT INTO parent SELECT g FROM generate_series({0}, {0} + 49) g;
                 INSERT INTO child SELECT g, g FROM generate_series({0}, {0} + 49) g;",
                round * 100
            ))
            .unwrap();
            if round % 3 == 2 {
                n1.batch_execute("TRUNCATE parent, child").unwrap();
            }
        }
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    let expect: Vec<(&str, Vec<i32>)> = results
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    for (_, s) in &expect {
        assert_eq!(s.len(), txns);
    }
    assert_xlog(&c, &expect);
    // Every node applied exactly the other two nodes' transactions.
    for i in 0..3 {
        let mut n = c.node(i).connect(DB);
        assert_eq!(
            one(&mut n, "SELECT count(*) FROM xlog"),
            (3 * txns).to_string()
        );
    }
}

#[test]
fn a_node_killed_during_writes_loses_and_duplicates_nothing() {
    let mut c = group(3);
    let txns = 600;
    let results: Vec<(String, Vec<i32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let node = c.node(i);
                s.spawn(move || {
                    let name = format!("node{}", i + 1);
                    let done = workload(node, &name, 77 + i as u64, txns);
                    (name, done)
                })
            })
            .collect();
        // Let the stream get going, then kill node2's postmaster and all its
        // processes without warning.
        let mut n1 = c.node(0).connect(DB);
        wait_for(
            "node1 to receive from node2",
            Duration::from_secs(60),
            || {
                (one(&mut n1, "SELECT count(*) FROM xlog WHERE node = 'node2'")
                    .parse::<i64>()
                    .unwrap()
                    > 100)
                    .then_some(())
            },
        );
        c.node(1).crash();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    c.node_mut(1).start();
    wait_for_mesh(&c, DB);
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    let expect: Vec<(&str, Vec<i32>)> = results
        .iter()
        .map(|(n, s)| (n.as_str(), s.clone()))
        .collect();
    assert!(
        expect[1].1.len() < txns,
        "node2 was killed before it finished"
    );
    assert_xlog(&c, &expect);
}

#[test]
fn a_stopped_peer_catches_up_and_the_group_converges() {
    let mut c = group(3);
    c.node_mut(2).stop("fast");
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    n1.batch_execute(
        "INSERT INTO kv SELECT g, 'while node3 was down' FROM generate_series(1, 2000) g",
    )
    .unwrap();
    wait_for(
        "node2 to receive node1's rows",
        Duration::from_secs(60),
        || (one(&mut n2, "SELECT count(*) FROM kv") == "2000").then_some(()),
    );
    n2.batch_execute("UPDATE kv SET n = 7 WHERE id % 2 = 0; DELETE FROM kv WHERE id % 5 = 0")
        .unwrap();
    // node1 sees that node3 is down: its receiver from node3 fails, backs
    // off, and says why.
    wait_for(
        "node1 to notice node3 is down",
        Duration::from_secs(60),
        || {
            let status = one(&mut n1, "SELECT subscription_status FROM bdr.subscription_summary WHERE origin_name = 'node3'");
            let failures = one(&mut n1, "SELECT max(task_consecutive_failures) FROM bdr.worker_tasks WHERE task_key_worker_role_name = 'receiver'");
            let err = one(
                &mut n1,
                "SELECT error_message FROM bdr.worker_errors WHERE origin_name = 'node3'",
            );
            (status == "down" && failures.parse::<i64>().unwrap_or(0) >= 1 && err.contains("node3"))
                .then_some(())
        },
    );
    c.node_mut(2).start();
    wait_for_mesh(&c, DB);
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    let mut n3 = c.node(2).connect(DB);
    assert_eq!(one(&mut n3, "SELECT count(*) FROM kv"), "1600");
}

#[test]
fn an_older_update_waiting_behind_a_newer_one_loses() {
    // On node2, the writer applying node3's newer update of row 1 holds that
    // row while the writer applying node1's older update waits for it. Once
    // the newer one commits, the older one must compare against it (not
    // against the row as it was before) and lose, as it does everywhere.
    // Local sessions on node2 hold rows 100 and 200 to order the writers.
    let c = group(3);
    let mut n2 = c.node(1).connect(DB);
    n2.batch_execute("INSERT INTO kv VALUES (1, 'start'), (100, 'gate 1'), (200, 'gate 3')")
        .unwrap();
    wait_for_replication(&c, DB);
    let mut gate1 = c.node(1).connect(DB);
    let mut gate3 = c.node(1).connect(DB);
    gate1
        .batch_execute("BEGIN; SELECT * FROM kv WHERE id = 100 FOR UPDATE")
        .unwrap();
    gate3
        .batch_execute("BEGIN; SELECT * FROM kv WHERE id = 200 FOR UPDATE")
        .unwrap();
    c.node(0)
        .connect(DB)
        .batch_execute("BEGIN; UPDATE kv SET n = n + 1 WHERE id = 100; UPDATE kv SET v = 'node1 (older)' WHERE id = 1; COMMIT")
        .unwrap();
    c.node(2)
        .connect(DB)
        .batch_execute("BEGIN; UPDATE kv SET v = 'node3 (newer)' WHERE id = 1; UPDATE kv SET n = n + 1 WHERE id = 200; COMMIT")
        .unwrap();
    let mut watcher = c.node(1).connect(DB);
    let waiting = |watcher: &mut Client, n: &str| {
        wait_for(
            &format!("{n} writers on node2 to wait for a lock"),
            Duration::from_secs(60),
            || {
                (one(watcher, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'bdr writer' AND wait_event_type = 'Lock'") == n)
                .then_some(())
            },
        )
    };
    // node1's writer waits at row 100; node3's has updated row 1 and waits at row 200.
    waiting(&mut watcher, "2");
    gate1.batch_execute("COMMIT").unwrap();
    // node1's writer moves on to row 1 and waits for node3's writer.
    wait_for(
        "node1's writer on node2 to wait for node3's",
        Duration::from_secs(60),
        || {
            (one(
            &mut watcher,
            "SELECT count(*) FROM pg_stat_activity a WHERE a.backend_type = 'bdr writer'
                AND EXISTS (SELECT 1 FROM pg_stat_activity b
                             WHERE b.pid = ANY (pg_blocking_pids(a.pid)) AND b.backend_type = 'bdr writer')",
        ) == "1")
            .then_some(())
        },
    );
    gate3.batch_execute("COMMIT").unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert_eq!(
        one(&mut n2, "SELECT v FROM kv WHERE id = 1"),
        "node3 (newer)"
    );
    // The conflict is in node2's server log, with who won.
    let log = c.node(1).log();
    assert!(
        log.lines().any(
            |l| l.contains("CONFLICT: update_origin_change on \"public\".\"kv\"")
                && l.contains("resolution skip")
        ),
        "no conflict logged on node2"
    );
    assert_eq!(
        one(
            &mut n2,
            "SELECT string_agg(conflict_resolution || ':' || (remote_tuple->>'v'), ',' ORDER BY 1)
               FROM bdr.conflict_history WHERE relname = 'kv' AND key_tuple->>'id' = '1'"
        ),
        "apply_remote:node3 (newer),skip:node1 (older)"
    );
}
