//! DDL replication on real instances: statements run on any node reach
//! every node in commit order with the row changes around them, what stays
//! local stays local, refusals change nothing, and a statement that fails
//! on a peer stops its apply until it is fixed. Every test ends by
//! comparing the schema (pg_dump --schema-only) and the replicated tables
//! on every node.

use bdr_tests::postgres::Client;
use bdr_tests::*;
use std::time::Duration;

const DB: &str = "app";
const SCHEMA: &str = "CREATE TABLE base (id int PRIMARY KEY, v text);";

fn group(n: usize) -> Cluster {
    let c = Cluster::start(n, "");
    form_group(&c, DB, SCHEMA);
    c
}

fn one(c: &mut Client, q: &str) -> Option<String> {
    c.query_one(&format!("SELECT ({q})::text"), &[])
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .get::<_, Option<String>>(0)
}

/// `pg_dump --schema-only` of node `i`, without what differs between nodes
/// by design (bdr's own schema is the extension's).
fn schema_of(c: &Cluster, i: usize) -> String {
    let n = c.node(i);
    let out = std::process::Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "/usr/lib/postgresql/15/bin/pg_dump",
            "--schema-only",
            "--exclude-schema=bdr",
            "--no-publications",
            "--no-subscriptions",
            &n.dsn(DB),
        ])
        .output()
        .expect("pg_dump");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        // pg_dump's \restrict key is random per run.
        .filter(|l| {
            !l.starts_with("--")
                && !l.starts_with("\\restrict")
                && !l.starts_with("\\unrestrict")
                && !l.contains("bdr_tombstone")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_same_schema(c: &Cluster, nodes: &[usize]) {
    let first = schema_of(c, nodes[0]);
    for &i in &nodes[1..] {
        let other = schema_of(c, i);
        assert_eq!(
            first,
            other,
            "schema of node{} differs from node{}",
            i + 1,
            nodes[0] + 1
        );
    }
}

#[test]
fn statements_run_on_any_node_reach_every_node_in_order_with_their_rows() {
    let c = group(3);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    let mut n3 = c.node(2).connect(DB);
    // DDL and DML in one transaction, in order.
    n1.batch_execute(
        "BEGIN;
         CREATE SCHEMA app;
         CREATE TABLE app.items (id int PRIMARY KEY, name text NOT NULL);
         INSERT INTO app.items VALUES (1, 'one'), (2, 'two');
         COMMIT;",
    )
    .unwrap();
    // Each step runs on another node once the previous one reached it.
    wait_for_replication(&c, DB);
    // A multi-statement string: each statement replicates as itself.
    n2.batch_execute(
        "ALTER TABLE app.items ADD COLUMN qty int NOT NULL DEFAULT 0; UPDATE app.items SET qty = id * 10;
         CREATE INDEX items_name ON app.items (name);",
    )
    .unwrap();
    wait_for_replication(&c, DB);
    n3.batch_execute(
        "CREATE TYPE app.color AS ENUM ('red', 'green');
         CREATE DOMAIN app.posint AS int CHECK (VALUE > 0);
         CREATE SEQUENCE app.s START 100;
         CREATE FUNCTION app.double(x int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT x * 2';
         CREATE VIEW app.big AS SELECT id, app.double(qty) AS d FROM app.items WHERE qty > 10;
         CREATE TABLE app.painted (id int PRIMARY KEY, c app.color, n app.posint);
         COMMENT ON TABLE app.painted IS 'colours';
         INSERT INTO app.painted VALUES (1, 'red', 3);",
    )
    .unwrap();
    // CONCURRENTLY runs outside a transaction block, here and on the peers.
    n3.batch_execute("CREATE INDEX CONCURRENTLY painted_c ON app.painted (c)")
        .unwrap();
    wait_for_replication(&c, DB);
    n1.batch_execute(
        "CREATE TABLE app.parted (id int, k int, PRIMARY KEY (id, k)) PARTITION BY RANGE (k);
         CREATE TABLE app.parted_1 PARTITION OF app.parted FOR VALUES FROM (0) TO (100);
         INSERT INTO app.parted VALUES (1, 5), (2, 50);
         ALTER TABLE app.items RENAME COLUMN name TO label;
         DROP TABLE base;",
    )
    .unwrap();
    wait_for_replication(&c, DB);
    for n in [&mut n1, &mut n2, &mut n3] {
        assert_eq!(
            one(
                n,
                "SELECT string_agg(label, ',' ORDER BY id) FROM app.items"
            )
            .as_deref(),
            Some("one,two")
        );
        assert_eq!(one(n, "SELECT count(*) FROM app.big").as_deref(), Some("1"));
        assert_eq!(
            one(n, "SELECT obj_description('app.painted'::regclass)").as_deref(),
            Some("colours")
        );
        assert_eq!(one(n, "SELECT to_regclass('public.base')"), None);
    }
    assert_same_schema(&c, &[0, 1, 2]);
    assert_converged(&c, DB, &["app.items", "app.painted", "app.parted"]);
}

#[test]
fn local_statements_stay_local_and_refusals_change_nothing() {
    let c = group(3);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    // Temporary objects and maintenance stay here.
    n1.batch_execute(
        "CREATE TEMP TABLE scratch (a int); ALTER TABLE scratch ADD COLUMN b int; DROP TABLE scratch;",
    )
    .unwrap();
    n1.batch_execute("VACUUM base").unwrap();
    n1.batch_execute("ANALYZE base").unwrap();
    n1.batch_execute("SELECT * INTO TEMP tmpcopy FROM base")
        .unwrap();
    // A materialized view's definition replicates; refreshing it is each
    // node's (also CONCURRENTLY, which runs statements of its own).
    n1.batch_execute("CREATE MATERIALIZED VIEW mv AS SELECT id, v FROM base; CREATE UNIQUE INDEX mv_id ON mv (id);")
        .unwrap();
    n1.batch_execute("REFRESH MATERIALIZED VIEW CONCURRENTLY mv")
        .unwrap();
    // ddl_replication off: local, with a WARNING.
    n1.batch_execute("SET bdr.ddl_replication = off; CREATE TABLE only_here (id int PRIMARY KEY); RESET bdr.ddl_replication;")
        .unwrap();
    // Refused, and nothing is left of them anywhere.
    let (code, msg, hint) = expect_error(&mut n1, "CREATE TABLE copy AS SELECT * FROM base");
    assert_eq!(code, "0A000", "{msg}");
    assert!(hint.unwrap_or_default().contains("INSERT ... SELECT"));
    let (code, msg, _) = expect_error(
        &mut n1,
        "CREATE EXTENSION IF NOT EXISTS btree_gist; CREATE TABLE booking (id int PRIMARY KEY, r int4range, EXCLUDE USING gist (r WITH &&))",
    );
    assert_eq!(code, "0A000", "{msg}");
    // bdr.default_replica_identity: a keyless table that can take updates,
    // the same on every node.
    n1.batch_execute(
        "SET bdr.default_replica_identity = full; CREATE TABLE keyless (a int, b text); RESET bdr.default_replica_identity;
         INSERT INTO keyless VALUES (1, 'x'); UPDATE keyless SET b = 'y' WHERE a = 1;",
    )
    .unwrap();
    // replicate_ddl_command replicates whatever bdr.ddl_replication says.
    n1.batch_execute(
        "SET bdr.ddl_replication = off; SELECT bdr.replicate_ddl_command('CREATE TABLE public.via_function (id int PRIMARY KEY)'); RESET bdr.ddl_replication;",
    )
    .unwrap();
    n1.batch_execute("INSERT INTO via_function VALUES (1)")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(
        one(&mut n2, "SELECT count(*) FROM via_function").as_deref(),
        Some("1")
    );
    assert_eq!(one(&mut n2, "SELECT to_regclass('only_here')"), None);
    assert_eq!(
        one(
            &mut n2,
            "SELECT relreplident FROM pg_class WHERE oid = 'keyless'::regclass"
        )
        .as_deref(),
        Some("f")
    );
    assert_eq!(one(&mut n2, "SELECT b FROM keyless").as_deref(), Some("y"));
    assert_eq!(one(&mut n2, "SELECT to_regclass('copy')"), None);
    assert_eq!(one(&mut n2, "SELECT to_regclass('booking')"), None);
    assert_eq!(one(&mut n1, "SELECT to_regclass('booking')"), None);
    n1.batch_execute(
        "SET bdr.ddl_replication = off; DROP TABLE IF EXISTS only_here; RESET bdr.ddl_replication;",
    )
    .unwrap();
    assert_same_schema(&c, &[0, 1, 2]);
    assert_converged(&c, DB, &["base", "via_function", "keyless"]);
}

#[test]
fn a_statement_that_fails_on_a_peer_stops_its_apply_until_fixed() {
    let c = group(2);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    // Something only node2 lacks: a role the statement needs (roles are
    // the instance's; this one is made on node1 only).
    n1.batch_execute(
        "SET bdr.role_replication = off; CREATE ROLE auditor; RESET bdr.role_replication;",
    )
    .unwrap();
    n1.batch_execute(
        "GRANT SELECT ON base TO auditor; INSERT INTO base VALUES (1, 'after the grant');",
    )
    .unwrap();
    wait_for("apply_error_ddl on node2", Duration::from_secs(60), || {
        one(
            &mut n2,
            "SELECT error_message FROM bdr.worker_errors WHERE error_message LIKE '%apply_error_ddl%' LIMIT 1",
        )
        .filter(|m| m.contains("GRANT SELECT ON base TO auditor"))
    });
    assert_eq!(
        one(&mut n2, "SELECT count(*) FROM base").as_deref(),
        Some("0")
    );
    // The DBA fixes the cause; the apply resumes by itself.
    n2.batch_execute(
        "SET bdr.role_replication = off; CREATE ROLE auditor; RESET bdr.role_replication;",
    )
    .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(
        one(
            &mut n2,
            "SELECT has_table_privilege('auditor', 'base', 'SELECT')"
        )
        .as_deref(),
        Some("true")
    );
    assert_same_schema(&c, &[0, 1]);
    assert_converged(&c, DB, &["base"]);
}

#[test]
fn schema_changes_while_the_others_write_and_a_join_after_them() {
    let c = Cluster::start(3, "");
    form_group_of(&c, DB, SCHEMA, 2);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // node2 inserts as fast as it can while node1 changes the table.
    let writer = {
        let stop = stop.clone();
        let dsn = c.node(1).dsn(DB);
        std::thread::spawn(move || {
            let mut cl =
                bdr_tests::postgres::Client::connect(&dsn, bdr_tests::postgres::NoTls).unwrap();
            let mut i = 1000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                cl.execute("INSERT INTO base (id, v) VALUES ($1, 'from node2')", &[&i])
                    .unwrap();
                i += 1;
            }
            i - 1000
        })
    };
    let mut n1 = c.node(0).connect(DB);
    n1.batch_execute("INSERT INTO base VALUES (1, 'from node1')")
        .unwrap();
    n1.batch_execute("ALTER TABLE base ADD COLUMN note text")
        .unwrap();
    n1.batch_execute("CREATE INDEX base_v ON base (v)").unwrap();
    n1.batch_execute("INSERT INTO base VALUES (2, 'after', 'with a note')")
        .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();
    assert!(written > 0);
    wait_for_replication_on(&c, DB, &[0, 1]);
    let mut n2 = c.node(1).connect(DB);
    assert_eq!(
        one(&mut n2, "SELECT note FROM base WHERE id = 2").as_deref(),
        Some("with a note")
    );
    assert_eq!(
        one(&mut n2, "SELECT count(*) FROM bdr.worker_errors").as_deref(),
        Some("0")
    );
    // A node that joins now gets today's schema and every row once.
    let n3 = c.node(2);
    n3.connect("postgres")
        .batch_execute(&format!("CREATE DATABASE {DB}"))
        .unwrap();
    let mut j = n3.connect(DB);
    j.batch_execute("CREATE EXTENSION bdr").unwrap();
    j.execute("SELECT bdr.create_node('node3', $1)", &[&n3.dsn(DB)])
        .unwrap();
    j.execute("SELECT bdr.join_node_group($1, 'g')", &[&c.node(0).dsn(DB)])
        .unwrap();
    wait_for_mesh(&c, DB);
    n2.batch_execute("ALTER TABLE base ADD COLUMN later int DEFAULT 7")
        .unwrap();
    n2.batch_execute("INSERT INTO base (id, v) VALUES (3, 'after the join')")
        .unwrap();
    wait_for_replication(&c, DB);
    let mut j = n3.connect(DB);
    assert_eq!(
        one(&mut j, "SELECT later FROM base WHERE id = 3").as_deref(),
        Some("7")
    );
    assert_same_schema(&c, &[0, 1, 2]);
    assert_converged(&c, DB, &["base"]);
}
