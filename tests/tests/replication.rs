//! Core replication between real instances: what replicates, full-mesh
//! convergence under concurrent writes, no echo, crash safety, and a peer
//! that goes away and comes back. Every test ends by comparing the full
//! contents of every replicated table on every node.

use bdr_tests::postgres::Client;
use bdr_tests::*;

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

const TABLES: &[&str] = &["kv", "types_t", "parent", "child", "serial_t", "xlog", "nopk"];

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
            one(n, "SELECT string_agg(subscription_status, ',') FROM bdr.subscription_summary"),
            "replicating,replicating"
        );
        assert_eq!(
            one(n, "SELECT string_agg(peer_state_name, ',') FROM bdr.node_summary"),
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
    assert_eq!(one(&mut n3, "SELECT length(big) FROM types_t WHERE id = 1"), "1200000");

    // UPDATE (also of the key), an update that leaves the TOASTed value
    // unchanged, DELETE, each from a different node.
    n2.batch_execute(
        "UPDATE kv SET v = 'updated', n = n + 1 WHERE id <= 100;
         UPDATE kv SET id = id + 10000 WHERE id BETWEEN 101 AND 110;
         UPDATE types_t SET i2 = 99 WHERE id = 1;
         UPDATE types_t SET t = 'now set', arr = '{}' WHERE id = 2;",
    )
    .unwrap();
    n3.batch_execute("DELETE FROM kv WHERE id > 400 AND id <= 500; DELETE FROM child WHERE id = 20;")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert_eq!(one(&mut n1, "SELECT count(*) FROM kv WHERE id > 10000"), "10");
    assert_eq!(one(&mut n1, "SELECT length(big) FROM types_t WHERE id = 1"), "1200000");
    assert_eq!(one(&mut n1, "SELECT i2 FROM types_t WHERE id = 1"), "99");

    // TRUNCATE with CASCADE and RESTART IDENTITY, as on the origin.
    n3.batch_execute("TRUNCATE parent CASCADE; TRUNCATE serial_t RESTART IDENTITY;")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(one(&mut n1, "SELECT count(*) FROM child"), "0");
    n1.batch_execute("INSERT INTO serial_t (v) VALUES ('after')").unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(one(&mut n2, "SELECT id FROM serial_t WHERE v = 'after'"), "1");

    // A table without a primary key: INSERT replicates, UPDATE and DELETE
    // are refused where they are made, saying why and how to fix it.
    n1.batch_execute("INSERT INTO nopk VALUES (1, 'one')").unwrap();
    let (code, msg, hint) = expect_error(&mut n1, "UPDATE nopk SET b = 'x'");
    assert_eq!(code, "55000", "{msg}");
    assert!(msg.contains("replica identity"), "{msg}");
    assert!(hint.unwrap_or_default().contains("REPLICA IDENTITY"));
    let (code, _, _) = expect_error(&mut n2, "DELETE FROM nopk");
    assert_eq!(code, "55000");
    // With REPLICA IDENTITY FULL they replicate.
    for n in [&mut n1, &mut n2, &mut n3] {
        n.batch_execute("ALTER TABLE nopk REPLICA IDENTITY FULL").unwrap();
    }
    n2.batch_execute("UPDATE nopk SET b = 'uno' WHERE a = 1").unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(one(&mut n3, "SELECT b FROM nopk"), "uno");

    // bdr.xact_replication = off (SET LOCAL) keeps a transaction local.
    n1.batch_execute(
        "BEGIN; SET LOCAL bdr.xact_replication = off; INSERT INTO kv VALUES (-1, 'local only'); COMMIT;
         INSERT INTO kv VALUES (-2, 'replicated');",
    )
    .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(one(&mut n2, "SELECT string_agg(id::text, ',') FROM kv WHERE id < 0"), "-2");
    n1.batch_execute("DELETE FROM kv WHERE id = -1").unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
}
