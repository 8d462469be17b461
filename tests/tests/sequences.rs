//! Global sequences on real instances: every way an application takes a
//! new id gives values no other node gives, under load on every node at
//! once; snowflakeid values name the node and time that made them; galloc
//! goes on from its reserved chunk while cut off from the majority, stops
//! with a clear error once that is used, and hands out nothing twice
//! across a kill -9. Every test ends by comparing the tables on every node.

use bdr_tests::postgres::Client;
use bdr_tests::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};

const DB: &str = "app";

const TABLES: &[&str] = &["t_big", "t_int", "t_small", "t_ident", "t_explicit"];

fn one(c: &mut Client, q: &str) -> Option<String> {
    c.query_one(&format!("SELECT ({q})::text"), &[])
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .get::<_, Option<String>>(0)
}

fn count(c: &mut Client, q: &str) -> i64 {
    one(c, q).and_then(|v| v.parse().ok()).unwrap_or(-1)
}

/// Waits until node `i` holds a chunk of every galloc sequence.
fn wait_for_chunks(c: &Cluster, i: usize) {
    let mut cl = c.node(i).connect(DB);
    wait_for("galloc chunks", Duration::from_secs(60), || {
        (count(
            &mut cl,
            "SELECT count(*) FROM bdr.sequences WHERE seqkind = 'galloc' AND (chunk_start IS NULL OR reserved_start IS NULL)",
        ) == 0)
            .then_some(())
    });
}

fn pgbench(c: &Cluster, i: usize, script: &str, seconds: u32) -> std::process::Child {
    let n = c.node(i);
    let path = c.root.join(format!("bench-{}.sql", n.name));
    std::fs::write(&path, script).unwrap();
    std::process::Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "/usr/lib/postgresql/15/bin/pgbench",
            "-n",
            // Prepared statements keep the plan bdr's planner hook made.
            "-M",
            "prepared",
            "-c",
            "2",
            "-R",
            "150",
            "-T",
            &seconds.to_string(),
            "-f",
            &path.to_string_lossy(),
            &n.dsn(DB),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("pgbench")
}

#[test]
fn every_way_of_taking_an_id_is_unique_across_the_group_under_load() {
    let c = Cluster::start(3, "");
    form_group(&c, DB, "");
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute(
        "CREATE TABLE t_big (id bigserial PRIMARY KEY, who text NOT NULL);
         CREATE TABLE t_int (id serial PRIMARY KEY, who text NOT NULL);
         CREATE TABLE t_small (id smallserial PRIMARY KEY, who text NOT NULL);
         CREATE TABLE t_ident (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, who text NOT NULL);
         CREATE SEQUENCE explicit_seq;
         CREATE TABLE t_explicit (id bigint PRIMARY KEY DEFAULT nextval('explicit_seq'), who text NOT NULL);",
    )
    .unwrap();
    wait_for_replication(&c, DB);
    // The kinds bdr.default_sequence_kind = distributed gives, on every node.
    for i in 0..3 {
        let mut cl = c.node(i).connect(DB);
        let kinds = one(
            &mut cl,
            "SELECT string_agg(relname || '=' || seqkind, ',' ORDER BY relname) FROM bdr.sequences",
        );
        assert_eq!(
            kinds.as_deref(),
            Some("explicit_seq=snowflakeid,t_big_id_seq=snowflakeid,t_ident_id_seq=snowflakeid,t_int_id_seq=galloc,t_small_id_seq=galloc"),
            "node{}",
            i + 1
        );
        wait_for_chunks(&c, i);
    }
    // Every node has its own sequence id, and every node knows them all.
    let ids: Vec<String> = (0..3)
        .map(|i| {
            let mut cl = c.node(i).connect(DB);
            one(
                &mut cl,
                "SELECT string_agg(node_name || '=' || node_seq_id, ',' ORDER BY node_name) FROM bdr.node_summary",
            )
            .unwrap()
        })
        .collect();
    assert_eq!(ids[0], "node1=1,node2=2,node3=3");
    assert!(ids.iter().all(|s| *s == ids[0]), "{ids:?}");

    let started = one(&mut n1, "clock_timestamp() - interval '1 second'").unwrap();
    let benches: Vec<_> = (0..3)
        .map(|i| {
            let who = format!("node{}", i + 1);
            let script = format!(
                "INSERT INTO t_big (who) VALUES ('{who}');
                 INSERT INTO t_int (who) VALUES ('{who}');
                 INSERT INTO t_small (who) VALUES ('{who}');
                 INSERT INTO t_ident (who) VALUES ('{who}');
                 INSERT INTO t_explicit (who) VALUES ('{who}');
                 INSERT INTO t_explicit (id, who) VALUES (nextval('explicit_seq'), '{who}');\n"
            );
            pgbench(&c, i, &script, 20)
        })
        .collect();
    for b in benches {
        let out = b.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "pgbench: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // COPY takes the column defaults without the planner: plain nextval.
    for i in 0..3 {
        let mut cl = c.node(i).connect(DB);
        let who = format!("node{}", i + 1);
        let data = format!("{who}\n{who}\n{who}\n");
        for t in ["t_big", "t_int", "t_ident"] {
            let mut w = cl.copy_in(&format!("COPY {t} (who) FROM STDIN")).unwrap();
            use std::io::Write;
            w.write_all(data.as_bytes()).unwrap();
            w.finish().unwrap();
        }
    }
    wait_for_replication(&c, DB);
    for t in TABLES {
        let total = count(&mut n1, &format!("SELECT count(*) FROM {t}"));
        let distinct = count(&mut n1, &format!("SELECT count(DISTINCT id) FROM {t}"));
        assert!(total > 300, "{t}: only {total} rows");
        assert_eq!(total, distinct, "{t}");
        for i in 1..=3 {
            assert!(
                count(
                    &mut n1,
                    &format!("SELECT count(*) FROM {t} WHERE who = 'node{i}'")
                ) > 100,
                "{t}: node{i}'s rows"
            );
        }
    }
    // A snowflakeid names the node that made it (each node's own id, from
    // bdr.node_summary) and a time inside the run.
    let wrong = count(
        &mut n1,
        "SELECT count(*) FROM t_big b JOIN bdr.node_summary s ON s.node_name = b.who
          WHERE bdr.extract_nodeid_from_snowflakeid(b.id) <> s.node_seq_id",
    );
    assert_eq!(wrong, 0, "rows whose snowflakeid names another node");
    let outside = count(
        &mut n1,
        &format!(
            "SELECT count(*) FROM t_explicit
              WHERE bdr.extract_timestamp_from_snowflakeid(id) NOT BETWEEN '{started}' AND clock_timestamp() + interval '2 seconds'"
        ),
    );
    assert_eq!(outside, 0, "snowflakeids with a time outside the run");
    // Timestamps round-trip: the smallest snowflakeid of a value's
    // millisecond is at or below it, that of the next millisecond above.
    let bad = count(
        &mut n1,
        "SELECT count(*) FROM t_big
          WHERE bdr.timestamp_to_snowflakeid(bdr.extract_timestamp_from_snowflakeid(id)) > id
             OR bdr.timestamp_to_snowflakeid(bdr.extract_timestamp_from_snowflakeid(id) + interval '1 millisecond') <= id",
    );
    assert_eq!(bad, 0);
    for i in 0..3 {
        let mut cl = c.node(i).connect(DB);
        assert_eq!(
            count(
                &mut cl,
                "SELECT count(*) FROM bdr.conflict_history WHERE conflict_type = 'insert_exists'"
            ),
            0,
            "node{}",
            i + 1
        );
    }
    assert_converged(&c, DB, TABLES);
}

#[test]
fn bad_kinds_and_setval_are_refused_and_change_nothing() {
    let c = Cluster::start(2, "");
    form_group(&c, DB, "");
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute(
        "CREATE SEQUENCE s_int AS integer;
         CREATE SEQUENCE s_big;
         SET bdr.default_sequence_kind = 'local';
         CREATE SEQUENCE s_local AS integer;
         RESET bdr.default_sequence_kind;",
    )
    .unwrap();
    let kinds =
        "SELECT string_agg(relname || '=' || seqkind, ',' ORDER BY relname) FROM bdr.sequences";
    let before = one(&mut n1, kinds);
    assert_eq!(
        before.as_deref(),
        Some("s_big=snowflakeid,s_int=galloc,s_local=local")
    );
    let (code, msg, hint) = expect_error(
        &mut n1,
        "SELECT bdr.alter_sequence_set_kind('s_int', 'snowflakeid')",
    );
    assert_eq!(code, "22023", "{msg}");
    assert!(msg.contains("needs the bigint type"), "{msg}");
    assert!(hint.unwrap_or_default().contains("galloc"));
    let (code, msg, _) = expect_error(
        &mut n1,
        "SELECT bdr.alter_sequence_set_kind('s_big', 'bogus')",
    );
    assert_eq!(code, "22023", "{msg}");
    let (code, msg, hint) = expect_error(&mut n1, "SELECT setval('s_big', 5)");
    assert_eq!(code, "22023", "{msg}");
    assert!(msg.contains("setval"), "{msg}");
    assert!(hint.is_some());
    let (code, msg, _) = expect_error(&mut n1, "ALTER SEQUENCE s_int RESTART WITH 7");
    assert_eq!(code, "22023", "{msg}");
    let (code, msg, hint) = expect_error(&mut n1, "ALTER SEQUENCE s_big SET UNLOGGED");
    assert_eq!(code, "22023", "{msg}");
    assert!(hint
        .unwrap_or_default()
        .contains("starts over after a crash"));
    n1.batch_execute("CREATE TABLE owned (id serial PRIMARY KEY)")
        .unwrap();
    let (code, msg, hint) = expect_error(&mut n1, "TRUNCATE owned RESTART IDENTITY");
    assert_eq!(code, "22023", "{msg}");
    assert!(msg.contains("owned_id_seq"), "{msg}");
    assert!(hint.unwrap_or_default().contains("CONTINUE IDENTITY"));
    n1.batch_execute("TRUNCATE owned").unwrap();
    // A local sequence is PostgreSQL's own.
    n1.batch_execute("SELECT setval('s_local', 41); ALTER SEQUENCE s_local RESTART WITH 50")
        .unwrap();
    let before = before.map(|b| format!("owned_id_seq=galloc,{b}"));
    assert_eq!(one(&mut n1, kinds), before);
    // Converting replicates: node2 has the same kinds.
    n1.batch_execute("SELECT bdr.alter_sequence_set_kind('s_local', 'galloc', 1000)")
        .unwrap();
    wait_for_replication(&c, DB);
    let mut n2 = c.node(1).connect(DB);
    let after = "owned_id_seq=galloc,s_big=snowflakeid,s_int=galloc,s_local=galloc";
    assert_eq!(one(&mut n1, kinds).as_deref(), Some(after));
    assert_eq!(one(&mut n2, kinds).as_deref(), Some(after));
    wait_for_chunks(&c, 1);
    // Chunks of the converted sequence start at the given start, and no two
    // nodes hold the same one.
    let a: i64 = count(&mut n1, "SELECT nextval('s_local')");
    let b: i64 = count(&mut n2, "SELECT nextval('s_local')");
    assert!(a >= 1000 && b >= 1000 && a != b, "{a} {b}");
    assert!((a - b).abs() >= 1_000_000 - 1, "{a} {b} share a chunk");
    // currval and the snowflakeid layout.
    let v = count(&mut n2, "SELECT nextval('s_big')");
    assert_eq!(count(&mut n2, "SELECT currval('s_big')"), v);
    assert_eq!(
        count(
            &mut n2,
            &format!("SELECT bdr.extract_nodeid_from_snowflakeid({v})")
        ),
        2
    );
    // KSUUID v2 orders by time.
    assert_eq!(
        count(
            &mut n1,
            "SELECT bdr.ksuuid_v2_cmp(bdr.gen_ksuuid_v2('2020-01-01'), bdr.gen_ksuuid_v2('2021-01-01'))"
        ),
        -1
    );
    assert_eq!(
        one(&mut n1, "bdr.extract_timestamp_from_ksuuid_v2(bdr.gen_ksuuid_v2('2020-01-01 10:00:00.123456+00')) = '2020-01-01 10:00:00.123456+00'").as_deref(),
        Some("true")
    );
    n1.batch_execute("CREATE TABLE seen (id int PRIMARY KEY)")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, &["seen", "owned"]);
}

#[test]
fn a_node_joining_with_the_schema_gets_the_kinds_and_its_own_values() {
    let c = Cluster::start(3, "");
    form_group_of(&c, DB, "", 2);
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute(
        "CREATE TABLE a (id serial PRIMARY KEY, who text);
         CREATE TABLE b (id bigserial PRIMARY KEY, who text);
         INSERT INTO a (who) SELECT 'node1' FROM generate_series(1, 10);
         INSERT INTO b (who) SELECT 'node1' FROM generate_series(1, 10);",
    )
    .unwrap();
    wait_for_replication_on(&c, DB, &[0, 1]);
    prepare_node(&c, 2, DB, "");
    let mut n3 = c.node(2).connect(DB);
    n3.execute(
        "SELECT bdr.join_node_group($1, 'g', synchronize_structure => 'all')",
        &[&c.node(0).dsn(DB)],
    )
    .unwrap();
    wait_for_mesh(&c, DB);
    let kinds =
        "SELECT string_agg(relname || '=' || seqkind, ',' ORDER BY relname) FROM bdr.sequences";
    assert_eq!(
        one(&mut n3, kinds).as_deref(),
        Some("a_id_seq=galloc,b_id_seq=snowflakeid")
    );
    assert_eq!(
        one(&mut n3, "SELECT node_seq_id FROM bdr.local_node_summary").as_deref(),
        Some("3")
    );
    wait_for_chunks(&c, 2);
    for i in 0..3 {
        let mut cl = c.node(i).connect(DB);
        let who = format!("node{}", i + 1);
        for t in ["a", "b"] {
            cl.execute(
                &format!("INSERT INTO {t} (who) SELECT $1 FROM generate_series(1, 20)"),
                &[&who],
            )
            .unwrap();
        }
    }
    wait_for_replication(&c, DB);
    for t in ["a", "b"] {
        let total = count(&mut n1, &format!("SELECT count(*) FROM {t}"));
        assert_eq!(total, 70, "{t}");
        assert_eq!(
            count(&mut n1, &format!("SELECT count(DISTINCT id) FROM {t}")),
            total,
            "{t}"
        );
    }
    assert_eq!(
        count(
            &mut n1,
            "SELECT count(*) FROM b WHERE who = 'node3' AND bdr.extract_nodeid_from_snowflakeid(id) <> 3"
        ),
        0
    );
    assert_converged(&c, DB, &["a", "b"]);
}

#[test]
fn galloc_goes_on_from_its_reserved_chunk_while_cut_off_and_never_repeats() {
    let mut c = Cluster::start(3, "bdr.raft_response_timeout = 3000\n");
    form_group(&c, DB, "");
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute("CREATE TABLE items (id smallserial PRIMARY KEY, v text)")
        .unwrap();
    wait_for_replication(&c, DB);
    for i in 0..3 {
        wait_for_chunks(&c, i);
    }
    // Node1 alone: no majority for a new chunk.
    c.node_mut(1).stop("fast");
    c.node_mut(2).stop("fast");
    let mut n1 = c.node(0).connect(DB);
    let started = Instant::now();
    let mut inserted = 0;
    let err = loop {
        match n1.batch_execute("INSERT INTO items (v) VALUES ('cut off')") {
            Ok(()) => inserted += 1,
            Err(e) => break e,
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "never ran out"
        );
    };
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "2200H", "{}", db.message());
    assert!(
        db.message().contains("no values left on this node"),
        "{}",
        db.message()
    );
    assert!(db.hint().unwrap_or_default().contains("majority"));
    // The current chunk's last tenth is given up when it moves to the
    // reserved one; the reserved one is used to its end.
    assert!(inserted >= 1000, "only {inserted} inserts from two chunks");
    // The majority returns: the node takes new chunks and goes on.
    c.node_mut(1).start();
    c.node_mut(2).start();
    let mut n1 = c.node(0).connect(DB);
    wait_for_ok("a new chunk", Duration::from_secs(90), || {
        n1.batch_execute("INSERT INTO items (v) VALUES ('back')")
    });
    // Inserts on every node, a kill -9 of node2 in the middle of them, and
    // more inserts after its restart: nothing is handed out twice.
    let mut n2 = c.node(1).connect(DB);
    let mut n3 = c.node(2).connect(DB);
    for _ in 0..50 {
        n2.batch_execute("INSERT INTO items (v) VALUES ('node2')")
            .unwrap();
        n3.batch_execute("INSERT INTO items (v) VALUES ('node3')")
            .unwrap();
    }
    c.node_mut(1).kill9();
    c.node_mut(1).start();
    let mut n2 = c.node(1).connect(DB);
    for _ in 0..50 {
        n2.batch_execute("INSERT INTO items (v) VALUES ('node2 again')")
            .unwrap();
        n1.batch_execute("INSERT INTO items (v) VALUES ('node1 again')")
            .unwrap();
    }
    wait_for_replication(&c, DB);
    let total = count(&mut n1, "SELECT count(*) FROM items");
    assert_eq!(
        total,
        count(&mut n1, "SELECT count(DISTINCT id) FROM items")
    );
    assert_eq!(total, inserted + 1 + 200);
    let allocated = count(&mut n1, "SELECT seq_nallocs FROM bdr.sequence_alloc");
    assert!(allocated >= 7, "{allocated} chunks allocated");
    assert_converged(&c, DB, &["items"]);
    let seen: HashSet<String> = (0..3)
        .map(|i| {
            let mut cl = c.node(i).connect(DB);
            one(
                &mut cl,
                "SELECT string_agg(id::text, ',' ORDER BY id) FROM items",
            )
            .unwrap()
        })
        .collect();
    assert_eq!(seen.len(), 1);
}

#[test]
fn snowflakeids_never_go_back_across_a_crash_with_the_clock_set_back() {
    let mut c = Cluster::start(2, "");
    form_group(&c, DB, "");
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute("CREATE TABLE t (id bigserial PRIMARY KEY, phase int NOT NULL)")
        .unwrap();
    n1.batch_execute("INSERT INTO t (phase) SELECT 1 FROM generate_series(1, 2000)")
        .unwrap();
    let before = one(&mut n1, "SELECT max(id) FROM t").unwrap();
    // A crash, and the clock two minutes behind when the node comes back.
    c.node_mut(0).kill9();
    c.node_mut(0).skew_clock(-120.0);
    c.node_mut(0).start();
    let mut n1 = c.node(0).connect(DB);
    // The server's clock is behind the values it handed out before.
    let behind = one(
        &mut n1,
        &format!("clock_timestamp() < bdr.extract_timestamp_from_snowflakeid({before})"),
    );
    assert_eq!(behind.as_deref(), Some("true"));
    n1.batch_execute("INSERT INTO t (phase) SELECT 2 FROM generate_series(1, 2000)")
        .unwrap();
    let lower = count(
        &mut n1,
        &format!("SELECT count(*) FROM t WHERE phase = 2 AND id <= {before}"),
    );
    assert_eq!(lower, 0, "values after the restart at or below {before}");
    assert_eq!(count(&mut n1, "SELECT count(DISTINCT id) FROM t"), 4000);
    // The other node's values never meet them.
    let mut n2 = c.node(1).connect(DB);
    n2.batch_execute("INSERT INTO t (phase) SELECT 3 FROM generate_series(1, 500)")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(count(&mut n1, "SELECT count(DISTINCT id) FROM t"), 4500);
    assert_converged(&c, DB, &["t"]);
}
