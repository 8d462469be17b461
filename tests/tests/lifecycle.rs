//! Node lifecycle under load: nodes join a group while every member keeps
//! committing writes, and the group converges with nothing lost or applied
//! twice.

use bdr_tests::postgres::Client;
use bdr_tests::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const DB: &str = "app";

const SCHEMA: &str = "
CREATE TABLE acc (id int PRIMARY KEY, node text NOT NULL, v int NOT NULL);
CREATE TABLE dropped (id int PRIMARY KEY, a text, gone int, b text);
ALTER TABLE dropped DROP COLUMN gone;
CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL);
";

/// The joiners' tables: the same columns (a joiner never had the dropped one).
const JOINER_SCHEMA: &str = "
CREATE TABLE acc (id int PRIMARY KEY, node text NOT NULL, v int NOT NULL);
CREATE TABLE dropped (id int PRIMARY KEY, a text, b text);
CREATE TABLE big (id int PRIMARY KEY, payload text NOT NULL);
";

const TABLES: &[&str] = &["acc", "dropped", "big"];

fn one(c: &mut Client, q: &str) -> String {
    c.query_one(&format!("SELECT ({q})::text"), &[])
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .get::<_, Option<String>>(0)
        .unwrap_or_default()
}

/// Commits small transactions on instance `i` until `stop`: inserts into its
/// own key range, updates and deletes of its own rows, updates of a few
/// shared rows, and large TOASTed values. Returns how many it committed.
fn writer(dsn: String, i: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut c = bdr_tests::postgres::Client::connect(&dsn, bdr_tests::postgres::NoTls).unwrap();
        let base = (i as i32 + 1) * 1_000_000;
        let name = format!("node{}", i + 1);
        let mut n: i32 = 0;
        let mut committed = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let id = base + n;
            let sql = match n % 6 {
                0 => format!(
                    "UPDATE acc SET v = v + 1, node = '{name}' WHERE id = {}",
                    n % 5
                ),
                1 => format!("INSERT INTO big VALUES ({id}, repeat(md5('{id}'), 400) || '{name}')"),
                2 => format!(
                    "UPDATE big SET payload = payload || 'x' WHERE id = {}",
                    id - 1
                ),
                3 => format!("INSERT INTO dropped VALUES ({id}, 'a{id}', 'b{id}')"),
                4 => format!("DELETE FROM dropped WHERE id = {}", id - 1),
                _ => format!("INSERT INTO acc VALUES ({id}, '{name}', {n})"),
            };
            match c.batch_execute(&sql) {
                Ok(()) => committed += 1,
                // Two nodes updating a shared row may deadlock with a
                // writer applying the other's update: that write is lost,
                // as it would be for any application.
                Err(e) if e.as_db_error().is_some() => {}
                Err(e) => panic!("{name}: {e}"),
            }
            // A throttle, not a wait: it leaves 2 cores room for the join.
            std::thread::sleep(Duration::from_millis(5));
        }
        committed
    })
}

#[test]
fn nodes_join_one_after_another_while_every_member_writes() {
    let c = Cluster::start(4, "");
    form_group_of(&c, DB, SCHEMA, 2);
    {
        let mut n1 = c.node(0).connect(DB);
        n1.batch_execute("INSERT INTO acc SELECT g, 'seed', 0 FROM generate_series(0, 4) g")
            .unwrap();
        n1.batch_execute(
            "INSERT INTO big SELECT g, repeat(md5(g::text), 500) FROM generate_series(1, 50) g",
        )
        .unwrap();
    }
    wait_for_replication_on(&c, DB, &[0, 1]);

    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = vec![
        writer(c.node(0).dsn(DB), 0, stop.clone()),
        writer(c.node(1).dsn(DB), 1, stop.clone()),
    ];

    // node3 joins through node1, then node4 through node2, while every
    // member keeps writing (node3 too, once it is in).
    // node3 starts from an empty database and gets the schema with the
    // data (synchronize_structure 'all'); node4 has the tables already.
    for (joiner, target, sync) in [(2usize, 0usize, "all"), (3, 1, "none")] {
        prepare_node(
            &c,
            joiner,
            DB,
            if sync == "all" { "" } else { JOINER_SCHEMA },
        );
        // For the first join, the target lags behind the other member:
        // node1 stops receiving from node2 while node2 writes on, and
        // resumes only once the join has made its slot on node2. What node2
        // committed before that slot must reach the joiner through node1's
        // data; the join has to wait for node1 to catch up first.
        let resume = (joiner == 2).then(|| {
            let mut n1 = c.node(0).connect(DB);
            stop_receiving_from(&mut n1, "node2");
            let lag_from = one(&mut c.node(1).connect(DB), "SELECT count(*) FROM acc");
            let n2_dsn = c.node(1).dsn(DB);
            let n1_dsn = c.node(0).dsn(DB);
            std::thread::spawn(move || {
                let connect = |d: &str| bdr_tests::postgres::Client::connect(d, bdr_tests::postgres::NoTls).unwrap();
                let mut n2 = connect(&n2_dsn);
                wait_for("the join's slot on node2", Duration::from_secs(120), || {
                    (one(
                        &mut n2,
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%node3'",
                    ) == "1")
                        .then_some(())
                });
                // node2 wrote on while node1 did not listen.
                assert_ne!(one(&mut n2, "SELECT count(*) FROM acc"), lag_from);
                connect(&n1_dsn)
                    .batch_execute("SELECT bdr.alter_subscription_enable(sub_name) FROM bdr.subscription_summary")
                    .unwrap();
            })
        });
        let mut j = c.node(joiner).connect(DB);
        j.execute(
            "SELECT bdr.join_node_group($1, 'g', synchronize_structure => $2)",
            &[&c.node(target).dsn(DB), &sync],
        )
        .unwrap_or_else(|e| panic!("join of node{} failed: {e:?}", joiner + 1));
        j.batch_execute("SET statement_timeout = '120s'; SELECT bdr.wait_for_join_completion()")
            .unwrap();
        if let Some(r) = resume {
            r.join().unwrap();
        }
        // Every table came with its tombstone trigger, made here.
        assert_eq!(
            one(
                &mut j,
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'bdr_tombstone'"
            ),
            "3"
        );
        if joiner == 2 {
            // The real last writer of every row copied from node1 came
            // along (the copied rows themselves commit with the earliest
            // timestamp), and so did node1's tombstones.
            let copied = one(
                &mut j,
                "SELECT count(*) FROM bdr.copied_row WHERE relid = 'acc'::regclass AND NOT deleted
                    AND commit_us IS NOT NULL AND node_id IS NOT NULL",
            );
            assert!(copied.parse::<i64>().unwrap() > 0);
            assert!(
                count(&mut j, "SELECT count(*) FROM bdr.copied_row WHERE relid = 'dropped'::regclass AND deleted") > 0,
                "node1's deletes were not copied"
            );
        }
        writers.push(writer(c.node(joiner).dsn(DB), joiner, stop.clone()));
    }
    // Writes go on until the newest node has committed some of its own.
    let mut n4 = c.node(3).connect(DB);
    wait_for("node4's writes", Duration::from_secs(60), || {
        (count(&mut n4, "SELECT count(*) FROM acc WHERE id > 4000000") >= 20).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    let committed: Vec<u64> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(committed.iter().all(|n| *n > 0), "{committed:?}");

    wait_for_mesh(&c, DB);
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);

    // Every insert each node committed is everywhere (none lost).
    for i in 0..4 {
        let lo = (i + 1) * 1_000_000;
        let rows = one(
            &mut n4,
            &format!(
                "SELECT count(*) FROM acc WHERE id > {lo} AND id < {}",
                lo + 1_000_000
            ),
        );
        assert!(
            rows.parse::<i64>().unwrap() > 0,
            "no rows of node{} on node4",
            i + 1
        );
    }
    // The newest node's writes reach every other node.
    n4.batch_execute("INSERT INTO acc VALUES (42, 'node4 after join', 1)")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert_eq!(
        one(
            &mut c.node(0).connect(DB),
            "SELECT node FROM acc WHERE id = 42"
        ),
        "node4 after join"
    );
}

fn count(c: &mut Client, q: &str) -> i64 {
    one(c, q).parse().unwrap()
}

#[test]
fn part_a_live_node_and_a_stopped_node_then_rejoin_under_the_same_name() {
    let mut c = Cluster::start(4, "");
    form_group(&c, DB, JOINER_SCHEMA);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    let mut n3 = c.node(2).connect(DB);

    // node3's last change reaches node1 only: node2 is not listening.
    stop_receiving_from(&mut n2, "node3");
    n3.batch_execute("INSERT INTO acc VALUES (300, 'node3, last words', 1)")
        .unwrap();
    wait_for(
        "node1 to get node3's change",
        Duration::from_secs(60),
        || (count(&mut n1, "SELECT count(*) FROM acc WHERE id = 300") == 1).then_some(()),
    );
    assert_eq!(count(&mut n2, "SELECT count(*) FROM acc WHERE id = 300"), 0);

    // Parting a live node: its last changes reach every member first.
    n1.batch_execute("SET statement_timeout = '300s'; SELECT bdr.part_node('node3')")
        .unwrap();
    assert_eq!(count(&mut n2, "SELECT count(*) FROM acc WHERE id = 300"), 1);
    for (i, n) in [(0usize, &mut n1), (1, &mut n2)] {
        assert_eq!(
            one(
                n,
                "SELECT peer_state_name FROM bdr.node_summary WHERE node_name = 'node3'"
            ),
            "PARTED",
            "on node{}",
            i + 1
        );
    }
    for i in [0usize, 1, 3] {
        let mut n = c.node(i).connect(DB);
        assert_eq!(
            count(
                &mut n,
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%node3'"
            ),
            0,
            "slot for node3 left on node{}",
            i + 1
        );
        assert_eq!(
            count(
                &mut n,
                "SELECT count(*) FROM pg_replication_origin WHERE roname LIKE '%node3'"
            ),
            0,
            "origin for node3 left on node{}",
            i + 1
        );
    }
    assert_eq!(
        count(
            &mut n3,
            "SELECT count(*) FROM pg_replication_slots WHERE plugin = 'bdr'"
        ),
        0
    );
    wait_for("node3's workers to stop", Duration::from_secs(60), || {
        (count(
            &mut n3,
            "SELECT count(*) FROM bdr.worker_tasks w JOIN pg_stat_activity a ON a.pid = w.task_pid
              WHERE w.task_key_worker_role_name IN ('receiver', 'writer')",
        ) == 0)
            .then_some(())
    });
    // A parted node's writes go nowhere.
    n3.batch_execute("INSERT INTO acc VALUES (301, 'after parting', 1)")
        .unwrap();

    // A node that goes down after sending its last changes to node1 only:
    // refused without force, parted with it, and node2 gets those changes
    // from node1 (the most advanced member).
    n1.batch_execute("INSERT INTO acc VALUES (700, 'to be deleted by node4', 1)")
        .unwrap();
    wait_for_replication_on(&c, DB, &[0, 1, 3]);
    stop_receiving_from(&mut n2, "node4");
    c.node(3)
        .connect(DB)
        .batch_execute(
            "INSERT INTO acc VALUES (600, 'node4, last words', 1);
             DELETE FROM acc WHERE id = 700;
             UPDATE acc SET v = 44 WHERE id = 300;",
        )
        .unwrap();
    wait_for(
        "node1 to get node4's last changes",
        Duration::from_secs(60),
        || {
            (count(
                &mut n1,
                "SELECT count(*) FROM acc WHERE id = 600 OR (id = 300 AND v = 44)",
            ) == 2
                && count(&mut n1, "SELECT count(*) FROM acc WHERE id = 700") == 0)
                .then_some(())
        },
    );
    c.node_mut(3).stop("immediate");
    let (code, msg, hint) = expect_error(&mut n1, "SELECT bdr.part_node('node4')");
    assert_eq!(code, "55000", "{msg}");
    assert!(hint.unwrap_or_default().contains("force"));
    n1.batch_execute("SELECT bdr.part_node('node4', force := true)")
        .unwrap();
    for n in [&mut n1, &mut n2] {
        assert_eq!(
            count(
                n,
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%node4'"
            ),
            0
        );
    }
    assert_eq!(count(&mut n2, "SELECT count(*) FROM acc WHERE id = 600"), 1);
    assert_eq!(count(&mut n2, "SELECT count(*) FROM acc WHERE id = 700"), 0);
    assert_eq!(one(&mut n2, "SELECT v FROM acc WHERE id = 300"), "44");

    // The remaining two go on and agree.
    n1.batch_execute("INSERT INTO acc VALUES (400, 'node1 after the parts', 1)")
        .unwrap();
    n2.batch_execute("UPDATE acc SET v = 2 WHERE id = 300")
        .unwrap();
    wait_for_replication_on(&c, DB, &[0, 1]);
    assert_converged_on(&c, DB, TABLES, &[0, 1]);
    assert_eq!(count(&mut n1, "SELECT count(*) FROM acc WHERE id = 301"), 0);

    // node3 comes back under its name, in a fresh database, once dropped.
    n1.batch_execute("SELECT bdr.drop_node('node3')").unwrap();
    for n in [&mut n1, &mut n2] {
        assert_eq!(
            count(n, "SELECT count(*) FROM bdr.node WHERE node_name = 'node3'"),
            0
        );
    }
    drop(n3);
    c.node(2)
        .connect("postgres")
        .batch_execute(&format!("DROP DATABASE {DB} WITH (FORCE)"))
        .unwrap();
    prepare_node(&c, 2, DB, "");
    let mut n3 = c.node(2).connect(DB);
    n3.execute("SELECT bdr.join_node_group($1, 'g')", &[&c.node(1).dsn(DB)])
        .unwrap();
    wait_for_mesh_on(&c, DB, &[0, 1, 2]);
    n3.batch_execute("INSERT INTO acc VALUES (500, 'node3 is back', 1)")
        .unwrap();
    wait_for_replication_on(&c, DB, &[0, 1, 2]);
    assert_converged_on(&c, DB, TABLES, &[0, 1, 2]);
}

/// What a refused join must not leave: on the joiner no slot, origin,
/// group or other node; on the members no row or slot for it.
fn assert_nothing_left(c: &Cluster, joiner: usize, members: &[usize]) {
    let mut j = c.node(joiner).connect(DB);
    assert_eq!(
        count(&mut j, "SELECT count(*) FROM pg_replication_slots"),
        0
    );
    assert_eq!(
        count(
            &mut j,
            "SELECT count(*) FROM pg_replication_origin WHERE roname !~ '^bdr_local(_[0-9]+)?$'"
        ),
        0
    );
    assert_eq!(count(&mut j, "SELECT count(*) FROM bdr.node"), 1);
    assert_eq!(count(&mut j, "SELECT count(*) FROM bdr.node_group"), 0);
    assert_eq!(count(&mut j, "SELECT count(*) FROM bdr.subscription"), 0);
    for &m in members {
        let mut n = c.node(m).connect(DB);
        assert_eq!(
            count(
                &mut n,
                "SELECT count(*) FROM bdr.node WHERE node_name = 'node3' OR dbname = 'joiner'"
            ),
            0,
            "a row for the joiner on node{}",
            m + 1
        );
        assert_eq!(
            count(
                &mut n,
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%node3'"
            ),
            0,
            "a slot for the joiner on node{}",
            m + 1
        );
    }
}

#[test]
fn refused_joins_leave_nothing_behind() {
    let c = Cluster::start(3, "");
    form_group_of(&c, DB, JOINER_SCHEMA, 2);
    prepare_node(&c, 2, DB, "");
    let mut j = c.node(2).connect(DB);
    let n1 = c.node(0).dsn(DB);
    let join = |j: &mut Client, dsn: &str, group: &str| {
        expect_error(
            j,
            &format!("SELECT bdr.join_node_group('{dsn}', '{group}')"),
        )
    };

    // An unreachable target.
    let (code, msg, _) = join(&mut j, "host=127.0.0.1 port=1 dbname=app", "g");
    assert_eq!(code, "08001", "{msg}");
    assert_nothing_left(&c, 2, &[0, 1]);

    // A target that is not a bdr node.
    c.node(0)
        .connect("postgres")
        .batch_execute("CREATE DATABASE plain")
        .unwrap();
    let (code, msg, _) = join(&mut j, &c.node(0).dsn("plain"), "g");
    assert_eq!(code, "55000", "{msg}");
    assert!(msg.contains("not a BDR node"), "{msg}");
    assert_nothing_left(&c, 2, &[0, 1]);

    // A group name that does not exist.
    let (code, msg, _) = join(&mut j, &n1, "nosuchgroup");
    assert_eq!(code, "55000", "{msg}");
    assert_nothing_left(&c, 2, &[0, 1]);

    // Tables of its own, with synchronize_structure 'all'.
    j.batch_execute("CREATE TABLE mine (id int PRIMARY KEY)")
        .unwrap();
    let (code, msg, hint) = join(&mut j, &n1, "g");
    assert_eq!(code, "55000", "{msg}");
    assert!(msg.contains("already has tables"), "{msg}");
    assert!(hint.unwrap_or_default().contains("'none'"));
    j.batch_execute("DROP TABLE mine").unwrap();
    assert_nothing_left(&c, 2, &[0, 1]);

    // A node name the group has already.
    j.batch_execute(&format!(
        "SELECT bdr.drop_node('node3'); SELECT bdr.create_node('node2', '{}')",
        c.node(2).dsn(DB)
    ))
    .unwrap();
    let (code, msg, _) = join(&mut j, &n1, "g");
    assert_eq!(code, "42710", "{msg}");
    let mut n2 = c.node(1).connect(DB);
    assert_eq!(
        count(
            &mut n2,
            "SELECT count(*) FROM bdr.node WHERE node_name = 'node2'"
        ),
        1
    );
    j.batch_execute(&format!(
        "SELECT bdr.drop_node('node2'); SELECT bdr.create_node('node3', '{}')",
        c.node(2).dsn(DB)
    ))
    .unwrap();
    assert_nothing_left(&c, 2, &[0, 1]);

    // A target that is not active: node2, once parted.
    c.node(0)
        .connect(DB)
        .batch_execute("SELECT bdr.part_node('node2')")
        .unwrap();
    let (code, msg, _) = join(&mut j, &c.node(1).dsn(DB), "g");
    assert_eq!(code, "55000", "{msg}");
    assert!(msg.contains("not active"), "{msg}");
    assert_nothing_left(&c, 2, &[0]);

    // After all that, the join works, schema and all.
    c.node(0)
        .connect(DB)
        .batch_execute("INSERT INTO acc VALUES (1, 'node1', 1)")
        .unwrap();
    j.batch_execute(&format!("SELECT bdr.join_node_group('{n1}', 'g')"))
        .unwrap();
    wait_for_mesh_on(&c, DB, &[0, 2]);
    wait_for_replication_on(&c, DB, &[0, 2]);
    assert_converged_on(&c, DB, TABLES, &[0, 2]);
}

/// Runs `join_node_group` on instance `joiner` in a thread; the result is
/// the error message, if it failed.
fn join_in_background(
    c: &Cluster,
    joiner: usize,
    target: usize,
) -> std::thread::JoinHandle<Option<String>> {
    let dsn = c.node(joiner).dsn(DB);
    let target_dsn = c.node(target).dsn(DB);
    std::thread::spawn(move || {
        let mut j = bdr_tests::postgres::Client::connect(&dsn, bdr_tests::postgres::NoTls).unwrap();
        j.execute("SELECT bdr.join_node_group($1, 'g')", &[&target_dsn])
            .err()
            .map(|e| e.to_string())
    })
}

#[test]
fn a_join_interrupted_by_a_crash_of_the_joiner_or_the_target_can_be_retried() {
    let mut c = Cluster::start(3, "");
    prepare_node(&c, 0, DB, JOINER_SCHEMA);
    {
        let mut n1 = c.node(0).connect(DB);
        n1.batch_execute(
            "SELECT bdr.create_node_group('g');
             INSERT INTO acc SELECT g, 'node1', g FROM generate_series(10, 1000000) g;",
        )
        .unwrap();
    }

    // 1. The joiner crashes while it copies the data.
    prepare_node(&c, 1, DB, "");
    let join = join_in_background(&c, 1, 0);
    let mut n1 = c.node(0).connect(DB);
    wait_for("the join's COPY on node1", Duration::from_secs(120), || {
        (count(
            &mut n1,
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'walsender' AND query LIKE 'COPY%'",
        ) > 0)
            .then_some(())
    });
    c.node(1).crash();
    assert!(join.join().unwrap().is_some(), "the join survived a crash");
    c.node_mut(1).start();
    let mut n2 = c.node(1).connect(DB);
    n2.execute("SELECT bdr.join_node_group($1, 'g')", &[&c.node(0).dsn(DB)])
        .unwrap();
    wait_for_mesh_on(&c, DB, &[0, 1]);

    // 2. The target crashes while the join waits for it to catch up with
    // another member (node1 does not listen to node2 for a while).
    n1.batch_execute(
        "SELECT bdr.alter_subscription_disable(sub_name) FROM bdr.subscription_summary WHERE origin_name = 'node2'",
    )
    .unwrap();
    n2.batch_execute("INSERT INTO acc VALUES (2, 'node2 while node1 is deaf', 2)")
        .unwrap();
    prepare_node(&c, 2, DB, "");
    let join = join_in_background(&c, 2, 0);
    wait_for("the join's slot on node2", Duration::from_secs(120), || {
        (count(
            &mut n2,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '%node3'",
        ) == 1)
            .then_some(())
    });
    drop(n1);
    c.node(0).crash();
    assert!(
        join.join().unwrap().is_some(),
        "the join survived its target's crash"
    );
    c.node_mut(0).start();
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute(
        "SELECT bdr.alter_subscription_enable(sub_name) FROM bdr.subscription_summary",
    )
    .unwrap();
    let mut n3 = c.node(2).connect(DB);
    n3.execute("SELECT bdr.join_node_group($1, 'g')", &[&c.node(0).dsn(DB)])
        .unwrap();
    wait_for_mesh(&c, DB);
    n3.batch_execute("INSERT INTO acc VALUES (3, 'node3', 3)")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert_eq!(
        count(&mut n3, "SELECT count(*) FROM acc"),
        1_000_000 - 9 + 2
    );
}

#[test]
fn a_background_join_returns_at_once_and_shows_its_progress() {
    let c = Cluster::start(3, "");
    form_group_of(&c, DB, JOINER_SCHEMA, 2);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    prepare_node(&c, 2, DB, "");
    let mut n3 = c.node(2).connect(DB);

    // A background join that cannot succeed says why when waited for.
    n3.batch_execute(
        "SELECT bdr.join_node_group('host=127.0.0.1 port=1 dbname=app', 'g', wait_for_completion => false)",
    )
    .unwrap();
    let (code, msg, _) = expect_error(
        &mut n3,
        "SET statement_timeout = '60s'; SELECT bdr.wait_for_join_completion()",
    );
    assert_eq!(code, "55000", "{msg}");
    assert!(msg.contains("could not connect"), "{msg}");
    assert_eq!(
        one(
            &mut n3,
            "SELECT peer_state_name FROM bdr.local_node_summary"
        ),
        "CREATED"
    );

    // The target lags behind node2, so the join waits for it: meanwhile
    // the call has returned, this node is JOIN_START, and node2 shows it
    // catching up.
    n1.batch_execute(
        "SELECT bdr.alter_subscription_disable(sub_name) FROM bdr.subscription_summary WHERE origin_name = 'node2'",
    )
    .unwrap();
    n2.batch_execute("INSERT INTO acc VALUES (2, 'node2', 2)")
        .unwrap();
    n3.execute(
        "SELECT bdr.join_node_group($1, 'g', wait_for_completion => false)",
        &[&c.node(0).dsn(DB)],
    )
    .unwrap();
    assert_eq!(
        one(
            &mut n3,
            "SELECT peer_state_name FROM bdr.local_node_summary"
        ),
        "JOIN_START"
    );
    // One join at a time.
    let (code, msg, _) = expect_error(
        &mut n3,
        &format!(
            "SELECT bdr.join_node_group('{}', 'g', wait_for_completion => false)",
            c.node(0).dsn(DB)
        ),
    );
    assert_eq!(code, "55000", "{msg}");
    assert!(msg.contains("already pending"), "{msg}");
    wait_for(
        "node2 to show node3 catching up",
        Duration::from_secs(60),
        || {
            (one(
                &mut n2,
                "SELECT peer_state_name FROM bdr.node_summary WHERE node_name = 'node3'",
            ) == "CATCHUP")
                .then_some(())
        },
    );
    n1.batch_execute(
        "SELECT bdr.alter_subscription_enable(sub_name) FROM bdr.subscription_summary",
    )
    .unwrap();
    n3.batch_execute(
        "SET statement_timeout = '120s'; SELECT bdr.wait_for_join_completion(verbose_progress => true)",
    )
    .unwrap();
    for n in [&mut n1, &mut n2, &mut n3] {
        assert_eq!(
            one(
                n,
                "SELECT peer_state_name FROM bdr.node_summary WHERE node_name = 'node3'"
            ),
            "ACTIVE"
        );
    }
    wait_for_mesh(&c, DB);
    n3.batch_execute("INSERT INTO acc VALUES (3, 'node3', 3)")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert_eq!(count(&mut n3, "SELECT count(*) FROM acc"), 2);

    // node3 gets a new connection string, everywhere; receivers use it.
    let new_dsn = format!(
        "host=localhost port={} dbname={DB} user=postgres",
        c.node(2).port
    );
    n1.execute("SELECT bdr.alter_node_interface('node3', $1)", &[&new_dsn])
        .unwrap();
    for n in [&mut n1, &mut n2, &mut n3] {
        assert_eq!(
            one(
                n,
                "SELECT interface_connstr FROM bdr.node_summary WHERE node_name = 'node3'"
            ),
            new_dsn
        );
    }
    let (code, _, _) = expect_error(
        &mut n1,
        "SELECT bdr.alter_node_interface('node3', 'nonsense_option=1')",
    );
    assert_eq!(code, "22023");
    // Reconnect the receivers from node3, which then use the new DSN.
    for n in [&mut n1, &mut n2] {
        stop_receiving_from(n, "node3");
        n.batch_execute(
            "SELECT bdr.alter_subscription_enable(sub_name) FROM bdr.subscription_summary",
        )
        .unwrap();
    }
    wait_for_mesh(&c, DB);
    n3.batch_execute("INSERT INTO acc VALUES (4, 'node3 via its new interface', 4)")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
}
