//! The global DML lock on real instances: it stops writes to a table on
//! every node and waits until every node has applied what the others
//! wrote, so that a computed column, a new constraint or a unique index
//! sees the same rows everywhere while the other nodes write at full
//! speed; it needs every node, fails within `bdr.global_lock_timeout` with
//! one down, and is let go when its holder's node is killed. Every test
//! ends by comparing the tables on every node.

use bdr_tests::postgres::Client;
use bdr_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const DB: &str = "app";
const SCHEMA: &str = "CREATE TABLE t (id int PRIMARY KEY, v int NOT NULL);
                      CREATE TABLE other (id int PRIMARY KEY);";

fn one(c: &mut Client, q: &str) -> Option<String> {
    c.query_one(&format!("SELECT ({q})::text"), &[])
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .get::<_, Option<String>>(0)
}

/// Inserts into `t` on node `i` (ids from `base`) until told to stop, as
/// an application would: a write the DML lock turns away (55P03) is
/// retried; returns how many rows it wrote.
fn writer(
    c: &Cluster,
    i: usize,
    base: i32,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<i32> {
    let stop = stop.clone();
    let dsn = c.node(i).dsn(DB);
    std::thread::spawn(move || {
        let mut cl = Client::connect(&dsn, bdr_tests::postgres::NoTls).unwrap();
        let mut n = 0;
        while !stop.load(Ordering::Relaxed) {
            let id = base + n;
            match cl.execute("INSERT INTO t (id, v) VALUES ($1::int, $1::int)", &[&id]) {
                Ok(_) => n += 1,
                Err(e) if e.code().map(|c| c.code()) == Some("55P03") => {}
                Err(e) => panic!("insert {id} on node{}: {e:?}", i + 1),
            }
        }
        n
    })
}

fn no_dml_locks(c: &Cluster) {
    for i in 0..3 {
        let mut cl = c.node(i).connect(DB);
        wait_for("the DML locks to go", Duration::from_secs(60), || {
            (one(
                &mut cl,
                "SELECT count(*) FROM bdr.global_locks WHERE lock_type = 'dml'",
            )
            .as_deref()
                == Some("0"))
            .then_some(())
        });
    }
}

#[test]
#[ignore = "known bug: a peer lets go of the DML lock once it applied the DDL, not once every node has, so its next write can reach a third node before the DDL does (target_column_missing, apply recovers after a backoff); fix: acks of the DDL through each node's stream"]
fn rewrites_and_constraints_see_the_same_rows_everywhere_while_the_others_write() {
    let c = Cluster::start(3, "");
    form_group(&c, DB, SCHEMA);
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute("INSERT INTO t SELECT g, g FROM generate_series(1, 500) g")
        .unwrap();
    wait_for_replication(&c, DB);
    let stop = Arc::new(AtomicBool::new(false));
    let w2 = writer(&c, 1, 100_000, &stop);
    let w3 = writer(&c, 2, 200_000, &stop);
    // Let both writers get going.
    let mut n2 = c.node(1).connect(DB);
    let mut n3 = c.node(2).connect(DB);
    wait_for("node2 and node3 to write", Duration::from_secs(60), || {
        (one(&mut n1, "SELECT count(*) > 0 FROM t WHERE id >= 200000").as_deref() == Some("true"))
            .then_some(())
    });
    // random() gives each node other values: the origin's are sent as rows.
    n1.batch_execute("ALTER TABLE t ADD COLUMN r float8 NOT NULL DEFAULT random()")
        .unwrap();
    // Constraints and a unique index check rows that must be everywhere.
    n1.batch_execute("ALTER TABLE t ADD CONSTRAINT v_positive CHECK (v > 0)")
        .unwrap();
    n2.batch_execute("CREATE UNIQUE INDEX t_v ON t (v)")
        .unwrap();
    // A rewrite whose USING computes: the origin's values too.
    n3.batch_execute("ALTER TABLE t ALTER COLUMN v TYPE bigint USING v::bigint + 0")
        .unwrap();
    // bdr.global_lock_table drains without DDL.
    n1.batch_execute("BEGIN; SELECT bdr.global_lock_table('t'); COMMIT")
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let (a, b) = (w2.join().unwrap(), w3.join().unwrap());
    assert!(a > 0 && b > 0, "{a} {b}");

    // wait_for_xid_progress: once it returns, every node has the row.
    n1.batch_execute("BEGIN; INSERT INTO other VALUES (1)")
        .unwrap();
    let xid: i64 = n1
        .query_one(
            "SELECT (pg_current_xact_id()::text::bigint % 4294967296)",
            &[],
        )
        .unwrap()
        .get(0);
    n1.batch_execute("COMMIT").unwrap();
    let id: i64 = n1
        .query_one("SELECT node_id::bigint FROM bdr.local_node", &[])
        .unwrap()
        .get(0);
    n1.batch_execute(&format!(
        "SELECT bdr.wait_for_xid_progress({id}, {}, true)",
        xid as i32
    ))
    .unwrap();
    for cl in [&mut n2, &mut n3] {
        assert_eq!(one(cl, "SELECT count(*) FROM other").as_deref(), Some("1"));
    }

    wait_for_replication(&c, DB);
    no_dml_locks(&c);
    for i in 0..3 {
        let mut cl = c.node(i).connect(DB);
        assert_eq!(
            one(&mut cl, "SELECT count(*) FROM bdr.worker_errors").as_deref(),
            Some("0"),
            "node{}",
            i + 1
        );
        assert_eq!(
            one(&mut cl, "SELECT count(*) FROM t WHERE r IS NULL").as_deref(),
            Some("0")
        );
    }
    assert_converged(&c, DB, &["t", "other"]);
}

#[test]
fn a_dml_lock_needs_every_node_and_its_holder_dying_frees_the_others() {
    let mut c = Cluster::start(3, "");
    form_group(&c, DB, SCHEMA);
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute("INSERT INTO t SELECT g, g FROM generate_series(1, 100) g")
        .unwrap();
    wait_for_replication(&c, DB);

    // One node of three down: DDL that needs only the DDL lock goes on,
    // what needs the DML lock fails within the timeout, naming the node.
    c.node_mut(2).stop("fast");
    n1.batch_execute(
        "SET bdr.global_lock_timeout = '3s'; CREATE TABLE during (id int PRIMARY KEY)",
    )
    .unwrap();
    let started = Instant::now();
    let (code, msg, hint) = expect_error(
        &mut n1,
        "ALTER TABLE t ADD CONSTRAINT small CHECK (v < 1000)",
    );
    let took = started.elapsed();
    assert_eq!(code, "55P03", "{msg}");
    assert!(msg.contains("node3"), "{msg}");
    assert!(hint.unwrap_or_default().contains("every node"));
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(30),
        "{took:?}"
    );
    // TRUNCATE takes it only with bdr.truncate_locking.
    let (code, msg, _) = expect_error(&mut n1, "SET bdr.truncate_locking = on; TRUNCATE other");
    assert_eq!(code, "55P03", "{msg}");
    n1.batch_execute("RESET bdr.truncate_locking; TRUNCATE other")
        .unwrap();
    // Nothing was left locked: both live nodes write.
    let mut n2 = c.node(1).connect(DB);
    n1.batch_execute("INSERT INTO t VALUES (101, 101)").unwrap();
    n2.batch_execute("SET bdr.global_lock_timeout = '3s'; INSERT INTO t VALUES (102, 102)")
        .unwrap();
    c.node_mut(2).start();
    wait_for_mesh(&c, DB);
    n1.batch_execute(
        "SET bdr.global_lock_timeout = '60s'; ALTER TABLE t ADD CONSTRAINT small CHECK (v < 1000)",
    )
    .unwrap();

    // node1 holds the lock in an open transaction: writes elsewhere wait,
    // and fail after the timeout.
    n1.batch_execute("BEGIN; SELECT bdr.global_lock_table('t')")
        .unwrap();
    let mut n2 = c.node(1).connect(DB);
    assert_eq!(
        one(&mut n2, "SELECT origin_node_name || ' ' || relation::text FROM bdr.global_locks WHERE lock_type = 'dml'").as_deref(),
        Some("node1 t")
    );
    n2.batch_execute("SET bdr.global_lock_timeout = '2s'")
        .unwrap();
    let (code, msg, _) = expect_error(&mut n2, "INSERT INTO t VALUES (103, 103)");
    assert_eq!(code, "55P03", "{msg}");
    assert!(msg.contains("node1"), "{msg}");
    // Other tables are not locked.
    n2.batch_execute("INSERT INTO other VALUES (2)").unwrap();
    // The holder's node dies: its connections go, and so do its locks.
    c.node_mut(0).kill9();
    wait_for_ok(
        "the dead holder's DML lock to go",
        Duration::from_secs(60),
        || n2.batch_execute("INSERT INTO t VALUES (103, 103)"),
    );
    c.node_mut(0).start();
    wait_for_mesh(&c, DB);
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute("SET bdr.global_lock_timeout = '60s'; CREATE UNIQUE INDEX t_v ON t (v)")
        .unwrap();
    n1.batch_execute("INSERT INTO t VALUES (104, 104)").unwrap();
    wait_for_replication(&c, DB);
    no_dml_locks(&c);
    let mut n3 = c.node(2).connect(DB);
    assert_eq!(
        one(
            &mut n3,
            "SELECT count(*) FROM pg_constraint WHERE conname = 'small'"
        )
        .as_deref(),
        Some("1")
    );
    assert_converged(&c, DB, &["t", "other", "during"]);
}
