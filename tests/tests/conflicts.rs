//! Conflicts between real instances: every scenario is made by pausing the
//! subscriptions of every node, committing the competing changes in a known
//! order (so the later commit is known), resuming, and then checking the
//! data on every node and the `bdr.conflict_history` of each node.

use bdr_tests::postgres::Client;
use bdr_tests::*;
use std::time::Duration;

const DB: &str = "app";

/// Workers retry quickly here, so that tests of stopped apply are short.
const CONF: &str = "bdr.min_worker_backoff_delay = 200\nbdr.max_worker_backoff_delay = 1000\n";

const SCHEMA: &str = "
CREATE TABLE ii (id int PRIMARY KEY, v text);
CREATE TABLE uq (id int PRIMARY KEY, email text UNIQUE, v text);
CREATE TABLE uu (id int PRIMARY KEY, v text);
CREATE TABLE ud (id int PRIMARY KEY, v text);
CREATE TABLE dd (id int PRIMARY KEY, v text);
CREATE TABLE pk (id int PRIMARY KEY, v text);
CREATE TABLE mu (id int PRIMARY KEY, a text UNIQUE, b text UNIQUE);
CREATE TABLE hot (id int PRIMARY KEY, wid bigint NOT NULL, node text NOT NULL, n int NOT NULL DEFAULT 0);
CREATE TABLE rf (id int PRIMARY KEY, v text);
ALTER TABLE rf REPLICA IDENTITY FULL;
";

const TABLES: &[&str] = &["ii", "uq", "uu", "ud", "dd", "pk", "mu", "hot", "rf"];

fn group(n: usize) -> Cluster {
    let c = Cluster::start(n, CONF);
    form_group(&c, DB, SCHEMA);
    c
}

fn one(c: &mut Client, q: &str) -> String {
    c.query_one(&format!("SELECT ({q})::text"), &[])
        .unwrap_or_else(|e| panic!("{q}: {e:?}"))
        .get::<_, Option<String>>(0)
        .unwrap_or_default()
}

/// `type:resolution` of every conflict logged for `table` on this node, sorted.
fn history(c: &mut Client, table: &str) -> Vec<String> {
    c.query(
        "SELECT conflict_type || ':' || conflict_resolution FROM bdr.conflict_history
          WHERE relname = $1 ORDER BY 1",
        &[&table],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn node_id(c: &mut Client, name: &str) -> u32 {
    one(
        c,
        &format!("SELECT node_id FROM bdr.node WHERE node_name = '{name}'"),
    )
    .parse()
    .unwrap()
}

/// Stops every subscription of every node; changes wait in the peers' slots.
fn pause(c: &Cluster) {
    pause_subscriptions(c, DB);
}

fn resume(c: &Cluster) {
    resume_subscriptions(c, DB);
}

fn rows(c: &mut Client, q: &str) -> String {
    one(
        c,
        &format!("SELECT string_agg(r::text, ' ' ORDER BY r::text) FROM ({q}) r"),
    )
}

#[test]
fn two_nodes_resolve_every_row_conflict_the_same_way_and_log_it() {
    let c = group(2);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    let (id1, id2) = (node_id(&mut n1, "node1"), node_id(&mut n2, "node2"));

    n1.batch_execute(
        "INSERT INTO uu VALUES (1, 'base'), (2, 'base');
         INSERT INTO ud VALUES (1, 'base'), (2, 'base');
         INSERT INTO dd VALUES (1, 'base');
         INSERT INTO pk VALUES (10, 'base');
         INSERT INTO uq VALUES (5, 'e5@example.com', 'base');",
    )
    .unwrap();
    wait_for_replication(&c, DB);
    pause(&c);

    // Each pair: node1 commits first, node2 later, so node2's change is newer.
    n1.batch_execute(
        "INSERT INTO ii VALUES (1, 'node1');
         INSERT INTO uq VALUES (1, 'a@example.com', 'node1');
         UPDATE uu SET v = 'node1' WHERE id = 1;
         DELETE FROM ud WHERE id = 1;
         UPDATE ud SET v = 'node1' WHERE id = 2;
         DELETE FROM dd WHERE id = 1;
         UPDATE pk SET id = 11, v = 'moved on node1' WHERE id = 10;
         UPDATE uq SET email = 'z@example.com' WHERE id = 5;
         INSERT INTO rf VALUES (1, 'node1');",
    )
    .unwrap();
    n2.batch_execute(
        "INSERT INTO ii VALUES (1, 'node2');
         INSERT INTO uq VALUES (2, 'a@example.com', 'node2');
         UPDATE uu SET v = 'node2' WHERE id = 1;
         UPDATE ud SET v = 'node2' WHERE id = 1;
         DELETE FROM ud WHERE id = 2;
         DELETE FROM dd WHERE id = 1;
         INSERT INTO pk VALUES (11, 'inserted on node2');
         INSERT INTO uq VALUES (6, 'z@example.com', 'node2');
         INSERT INTO rf VALUES (1, 'node2');",
    )
    .unwrap();
    // A forced tie: both commits carry the same timestamp (the bdr_local
    // origin lets a session choose it); the higher node id must win.
    let ts = one(&mut n1, "now() + interval '1 hour'");
    for (n, who) in [(&mut n1, "node1"), (&mut n2, "node2")] {
        commit_as_of(
            n,
            &ts,
            &format!("UPDATE uu SET v = 'tie {who}' WHERE id = 2"),
        );
    }
    resume(&c);
    assert_converged(&c, DB, TABLES);

    for n in [&mut n1, &mut n2] {
        assert_eq!(rows(n, "SELECT * FROM ii"), "(1,node2)");
        // The secondary unique key: the newer row replaces the older one,
        // inserted or updated (node1's update of row 5 lost against node2's
        // newer row 6, so row 5 is gone everywhere).
        assert_eq!(
            rows(n, "SELECT * FROM uq"),
            "(2,a@example.com,node2) (6,z@example.com,node2)"
        );
        // REPLICA IDENTITY FULL with a primary key: the key still decides.
        assert_eq!(rows(n, "SELECT * FROM rf"), "(1,node2)");
        assert_eq!(
            rows(n, "SELECT * FROM uu"),
            format!(
                "(1,node2) (2,\"tie {}\")",
                if id1 > id2 { "node1" } else { "node2" }
            )
        );
        // Updated after the delete: the update wins; deleted after the
        // update: the delete wins.
        assert_eq!(rows(n, "SELECT * FROM ud"), "(1,node2)");
        assert_eq!(rows(n, "SELECT * FROM dd"), "");
        assert_eq!(rows(n, "SELECT * FROM pk"), "(11,\"inserted on node2\")");
    }

    // node1 meets node2's newer changes and applies them; node2 meets
    // node1's older ones and keeps its own.
    assert_eq!(history(&mut n1, "ii"), ["insert_exists:apply_remote"]);
    assert_eq!(history(&mut n2, "ii"), ["insert_exists:skip"]);
    assert_eq!(
        history(&mut n1, "uq"),
        ["insert_exists:apply_remote", "insert_exists:apply_remote"]
    );
    assert_eq!(
        history(&mut n2, "uq"),
        ["insert_exists:skip", "update_pkey_exists:skip"]
    );
    assert_eq!(
        one(
            &mut n1,
            "SELECT string_agg(DISTINCT conflict_index::text, ',') FROM bdr.conflict_history WHERE relname = 'uq'"
        ),
        "uq_email_key"
    );
    assert_eq!(history(&mut n1, "rf"), ["insert_exists:apply_remote"]);
    assert_eq!(history(&mut n2, "rf"), ["insert_exists:skip"]);
    // Row 1: node2's update is newer. Row 2: the tie goes to the higher id.
    let tie = |me: u32, other: u32| {
        if me > other {
            "update_origin_change:skip"
        } else {
            "update_origin_change:apply_remote"
        }
    };
    let mut expect1 = vec!["update_origin_change:apply_remote", tie(id1, id2)];
    expect1.sort();
    let mut expect2 = vec!["update_origin_change:skip", tie(id2, id1)];
    expect2.sort();
    assert_eq!(history(&mut n1, "uu"), expect1);
    assert_eq!(history(&mut n2, "uu"), expect2);
    assert_eq!(
        history(&mut n1, "ud"),
        ["update_missing:apply_remote"],
        "node1 deleted row 1 before node2 updated it"
    );
    // Row 1: node1's delete is older than node2's update; row 2: node1's
    // update is older than node2's delete.
    assert_eq!(
        history(&mut n2, "ud"),
        [
            "delete_recently_updated:skip",
            "update_recently_deleted:skip"
        ]
    );
    assert_eq!(history(&mut n1, "dd"), ["delete_missing:skip"]);
    assert_eq!(history(&mut n2, "dd"), ["delete_missing:skip"]);
    assert_eq!(history(&mut n1, "pk"), ["insert_exists:apply_remote"]);
    assert_eq!(history(&mut n2, "pk"), ["update_pkey_exists:skip"]);

    // The history row carries the tuples and both sides' timestamps.
    assert_eq!(
        one(
            &mut n1,
            "SELECT format('%s|%s|%s|%s|%s|%s', key_tuple, remote_tuple->>'v', local_tuple->>'v',
                           apply_tuple->>'v', local_tuple_node_id, remote_commit_time > local_tuple_commit_time)
               FROM bdr.conflict_history WHERE relname = 'ii'"
        ),
        format!("{{\"id\" : 1}}|node2|node1|node2|{id1}|t")
    );
    assert_eq!(
        one(
            &mut n1,
            "SELECT count(*) FROM bdr.conflict_history h JOIN bdr.subscription s ON s.sub_id = h.sub_id
              WHERE h.relname = 'ii' AND h.remote_commit_lsn IS NOT NULL AND h.local_xid IS NOT NULL"
        ),
        "1"
    );
    // The summary and the statistics count the same conflicts.
    for n in [&mut n1, &mut n2] {
        let logged = one(n, "SELECT count(*) FROM bdr.conflict_history_summary");
        assert_eq!(
            one(n, "SELECT sum(nconflicts) FROM bdr.stat_subscription"),
            logged
        );
        assert_eq!(
            one(n, "SELECT sum(ninsert_exists) FROM bdr.stat_subscription"),
            one(
                n,
                "SELECT count(*) FROM bdr.conflict_history WHERE conflict_type = 'insert_exists'"
            )
        );
    }
}

#[test]
fn conflict_history_is_readable_by_table_owners_only_and_logging_is_configurable() {
    let c = group(2);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    // Each node's own roles and grants (not replicated).
    n2.batch_execute(
        "SET bdr.ddl_replication = off; SET bdr.role_replication = off;
         CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN;
         GRANT USAGE ON SCHEMA bdr TO alice, bob;",
    )
    .unwrap();
    n1.batch_execute(
        "SET bdr.ddl_replication = off; SET bdr.role_replication = off;
         CREATE ROLE alice LOGIN; CREATE ROLE bob LOGIN;",
    )
    .unwrap();
    for n in [&mut n1, &mut n2] {
        n.batch_execute("SET bdr.ddl_replication = off; ALTER TABLE ii OWNER TO alice")
            .unwrap();
    }
    n1.batch_execute("INSERT INTO dd VALUES (5, 'x')").unwrap();
    wait_for_replication(&c, DB);

    // Logging to the table is off for delete_missing only.
    n2.batch_execute(
        "SELECT bdr.alter_node_set_log_config('node2', true, true, ARRAY['insert_exists'])",
    )
    .unwrap();
    assert_eq!(
        one(&mut n2, "SELECT log_conflict_type FROM bdr.node_log_config"),
        "{insert_exists}"
    );
    let (code, msg, _) = expect_error(
        &mut n2,
        "SELECT bdr.alter_node_set_log_config('node2', true, true, ARRAY['nonsense'])",
    );
    assert_eq!(code, "22023", "{msg}");
    let (code, msg, hint) = expect_error(&mut n2, "SELECT bdr.alter_node_set_log_config('node1')");
    assert_eq!(code, "55000", "{msg}");
    assert!(hint.unwrap_or_default().contains("node1"));

    pause(&c);
    n1.batch_execute("INSERT INTO ii VALUES (1, 'node1'); DELETE FROM dd WHERE id = 5")
        .unwrap();
    n2.batch_execute("INSERT INTO ii VALUES (1, 'node2'); DELETE FROM dd WHERE id = 5")
        .unwrap();
    // A history that cannot be written must not cost the change: node1's
    // next conflict is applied even though its history insert fails.
    n1.batch_execute(
        "ALTER TABLE bdr.conflict_history ADD CONSTRAINT refuse_everything CHECK (false) NOT VALID",
    )
    .unwrap();
    resume(&c);
    assert_converged(&c, DB, TABLES);
    assert_eq!(rows(&mut n1, "SELECT * FROM ii"), "(1,node2)");
    assert_eq!(
        one(&mut n1, "SELECT count(*) FROM bdr.conflict_history"),
        "0"
    );
    wait_for(
        "the history failure in node1's log",
        Duration::from_secs(30),
        || {
            c.node(0)
            .log()
            .contains("conflict(s) in bdr.conflict_history: new row for relation \"conflict_history\" violates check constraint")
            .then_some(())
        },
    );
    // The server log has the conflict either way.
    assert!(c
        .node(0)
        .log()
        .contains("CONFLICT: insert_exists on \"public\".\"ii\""));

    // delete_missing was not logged to node2's table; insert_exists was.
    assert_eq!(history(&mut n2, "ii"), ["insert_exists:skip"]);
    assert_eq!(history(&mut n2, "dd"), Vec::<String>::new());
    assert_eq!(
        one(
            &mut n2,
            "SELECT sum(ndelete_missing) FROM bdr.stat_subscription"
        ),
        "1"
    );

    // Row-level security: alice owns ii, bob owns nothing.
    let as_role = |role: &str| {
        let mut r = c.node(1).connect(DB);
        r.batch_execute(&format!("SET ROLE {role}")).unwrap();
        (
            one(&mut r, "SELECT count(*) FROM bdr.conflict_history"),
            one(&mut r, "SELECT count(*) FROM bdr.conflict_history_summary"),
        )
    };
    assert_eq!(as_role("alice"), ("1".to_string(), "1".to_string()));
    assert_eq!(as_role("bob"), ("0".to_string(), "1".to_string()));
    // The history can be cleaned up by hand (it has no key).
    n2.batch_execute("DELETE FROM bdr.conflict_history WHERE conflict_type = 'insert_exists'")
        .unwrap();
    assert_eq!(
        one(&mut n2, "SELECT count(*) FROM bdr.conflict_history"),
        "0"
    );
}

#[test]
fn three_nodes_converge_on_the_same_insert_and_on_an_update_that_overtook_its_insert() {
    let c = group(3);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    let mut n3 = c.node(2).connect(DB);

    // Three nodes insert the same key; node3's insert is the newest.
    pause(&c);
    for (n, who) in [(&mut n1, "node1"), (&mut n2, "node2"), (&mut n3, "node3")] {
        n.batch_execute(&format!("INSERT INTO ii VALUES (1, '{who}')"))
            .unwrap();
    }
    resume(&c);
    assert_converged(&c, DB, TABLES);
    assert_eq!(rows(&mut n1, "SELECT * FROM ii"), "(1,node3)");
    assert_eq!(
        history(&mut n3, "ii"),
        ["insert_exists:skip", "insert_exists:skip"]
    );
    for n in [&mut n1, &mut n2] {
        let h = history(n, "ii");
        assert_eq!(h.len(), 2, "{h:?}");
        assert!(
            h.contains(&"insert_exists:apply_remote".to_string()),
            "{h:?}"
        );
    }

    // node2 does not hear from node1 for a while: node1's insert reaches it
    // only after node3's update of that row (update_missing, inserted), and
    // then loses against it (insert_exists, skipped).
    stop_receiving_from(&mut n2, "node1");
    n1.batch_execute("INSERT INTO uu VALUES (7, 'inserted on node1')")
        .unwrap();
    wait_for(
        "node3 to get node1's insert",
        Duration::from_secs(60),
        || (one(&mut n3, "SELECT count(*) FROM uu WHERE id = 7") == "1").then_some(()),
    );
    n3.batch_execute("UPDATE uu SET v = 'updated on node3' WHERE id = 7")
        .unwrap();
    wait_for(
        "node2 to get node3's update",
        Duration::from_secs(60),
        || (one(&mut n2, "SELECT v FROM uu WHERE id = 7") == "updated on node3").then_some(()),
    );
    n2.batch_execute("SELECT bdr.alter_subscription_enable()")
        .unwrap();
    wait_for_mesh(&c, DB);
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert_eq!(
        rows(&mut n1, "SELECT * FROM uu"),
        "(7,\"updated on node3\")"
    );
    assert_eq!(
        history(&mut n2, "uu"),
        ["insert_exists:skip", "update_missing:apply_remote"]
    );
}

/// Waits until node `n`'s writer from a peer reports an error containing `what`.
fn wait_for_apply_error(c: &mut Client, what: &str) -> String {
    wait_for(
        &format!("an apply error mentioning {what}"),
        Duration::from_secs(60),
        || {
            let e = one(
                c,
                "SELECT string_agg(error_message, ' | ') FROM bdr.worker_errors WHERE worker_role_name = 'writer'",
            );
            e.contains(what).then_some(e)
        },
    )
}

#[test]
fn apply_stops_on_an_error_resolver_and_resumes_once_the_data_or_resolver_is_fixed() {
    let c = group(2);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);

    // Resolver validation.
    let (code, msg, _) = expect_error(
        &mut n2,
        "SELECT bdr.alter_node_set_conflict_resolver('node2', 'delete_missing', 'update_if_newer')",
    );
    assert_eq!(code, "22023");
    assert!(msg.contains("use one of: error, skip"), "{msg}");
    let (code, _, _) = expect_error(
        &mut n2,
        "SELECT bdr.alter_node_set_conflict_resolver('node2', 'no_such_type', 'skip')",
    );
    assert_eq!(code, "22023");
    let (code, _, _) = expect_error(
        &mut n2,
        "SELECT bdr.alter_node_set_conflict_resolver('nobody', 'delete_missing', 'skip')",
    );
    assert_eq!(code, "42704");
    assert_eq!(
        one(
            &mut n2,
            "SELECT string_agg(conflict_type || '=' || conflict_resolver, ',') FROM bdr.node_conflict_resolvers"
        ),
        "insert_exists=update_if_newer,update_differing=update_if_newer,update_origin_change=update_if_newer,\
update_missing=insert_or_skip,update_recently_deleted=skip,update_pkey_exists=update_if_newer,\
multiple_unique_conflicts=error,delete_recently_updated=skip,delete_missing=skip,\
target_column_missing=ignore_if_null,source_column_missing=use_default_value,\
target_table_missing=skip_if_recently_dropped,apply_error_ddl=error"
    );

    // 1. Two unique violations at once: node1's row (1, x, y) meets node2's
    // rows (2, x, q) and (3, p, y). node2 stops applying, keeps retrying
    // the same transaction, and resumes by itself once row 3 is deleted.
    pause(&c);
    n1.batch_execute("INSERT INTO mu VALUES (1, 'x', 'y')")
        .unwrap();
    n2.batch_execute("INSERT INTO mu VALUES (2, 'x', 'q'), (3, 'p', 'y')")
        .unwrap();
    resume_without_waiting(&c);
    let e = wait_for_apply_error(&mut n2, "multiple_unique_conflicts");
    assert!(e.contains("mu"), "{e}");
    // Retries keep failing on the same transaction; the history logs it once.
    wait_for(
        "a retry of the stopped writer",
        Duration::from_secs(60),
        || {
            (one(
                &mut n2,
                "SELECT retries_at_same_lsn FROM bdr.stat_subscription",
            )
            .parse::<i64>()
            .unwrap_or(0)
                >= 1)
                .then_some(())
        },
    );
    assert_eq!(history(&mut n2, "mu"), ["multiple_unique_conflicts:error"]);
    n2.batch_execute("DELETE FROM mu WHERE id = 3").unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);
    assert_eq!(rows(&mut n1, "SELECT * FROM mu"), "(2,x,q)");

    // 2. The resolver decides: delete_missing set to error on node2 stops
    // its apply; setting it back to skip lets it go on by itself.
    n2.batch_execute(
        "SELECT bdr.alter_node_set_conflict_resolver('node2', 'delete_missing', 'error')",
    )
    .unwrap();
    assert_eq!(
        one(
            &mut n2,
            "SELECT conflict_resolver FROM bdr.node_conflict_resolvers WHERE conflict_type = 'delete_missing'"
        ),
        "error"
    );
    n1.batch_execute("INSERT INTO dd VALUES (1, 'a')").unwrap();
    wait_for_replication(&c, DB);
    pause(&c);
    n1.batch_execute("DELETE FROM dd WHERE id = 1").unwrap();
    n2.batch_execute("DELETE FROM dd WHERE id = 1").unwrap();
    resume_without_waiting(&c);
    wait_for_apply_error(&mut n2, "delete_missing");
    n2.batch_execute(
        "SELECT bdr.alter_node_set_conflict_resolver('node2', 'delete_missing', 'skip')",
    )
    .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);

    // 3. Skipping what cannot be applied: with the subscription disabled,
    // skip up to the commit LSN the history names.
    pause(&c);
    n1.batch_execute("INSERT INTO mu VALUES (10, 'k', 'l')")
        .unwrap();
    n2.batch_execute("INSERT INTO mu VALUES (11, 'k', 'm'), (12, 'n', 'l')")
        .unwrap();
    resume_without_waiting(&c);
    let sub = one(
        &mut n2,
        "SELECT sub_name FROM bdr.subscription_summary WHERE origin_name = 'node1'",
    );
    let (code, _, hint) = expect_error(
        &mut n2,
        &format!("SELECT bdr.alter_subscription_skip_changes_upto('{sub}', '0/1')"),
    );
    assert_eq!(code, "55000");
    assert!(hint
        .unwrap_or_default()
        .contains("alter_subscription_disable"));
    let lsn = wait_for("the stop in the history", Duration::from_secs(30), || {
        let l = one(
            &mut n2,
            "SELECT remote_commit_lsn FROM bdr.conflict_history WHERE relname = 'mu' AND remote_tuple->>'id' = '10'",
        );
        (!l.is_empty()).then_some(l)
    });
    n2.batch_execute(&format!(
        "SELECT bdr.alter_subscription_disable('{sub}');
         SELECT bdr.alter_subscription_skip_changes_upto('{sub}', '{lsn}');
         SELECT bdr.alter_subscription_enable('{sub}');"
    ))
    .unwrap();
    wait_for_replication(&c, DB);
    // node2 never applied row 10; on node1 node2's newer row (11, k, m)
    // replaced it (insert_exists on the unique index of a), so the nodes agree.
    assert_eq!(one(&mut n2, "SELECT count(*) FROM mu WHERE id = 10"), "0");
    assert_converged(&c, DB, TABLES);
    assert_eq!(
        rows(&mut n1, "SELECT * FROM mu"),
        "(11,k,m) (12,n,l) (2,x,q)"
    );
    assert!(
        one(&mut n2, "SELECT sum(nabort) FROM bdr.stat_subscription")
            .parse::<i64>()
            .unwrap()
            >= 3
    );
}

/// Enables every subscription again without waiting for the changes to apply.
fn resume_without_waiting(c: &Cluster) {
    for i in 0..c.nodes.len() {
        c.node(i)
            .connect(DB)
            .batch_execute(
                "SELECT bdr.alter_subscription_enable(sub_name) FROM bdr.subscription_summary",
            )
            .unwrap();
    }
}

#[test]
fn missing_tables_and_columns_are_conflicts_with_their_own_resolvers() {
    let c = group(2);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);

    // target_table_missing: a table node2 never had stops its apply
    // (skip_if_recently_dropped, and it was not dropped); creating it
    // there lets the writer go on.
    // Each node's DDL stays its own here (bdr.ddl_replication off).
    n1.batch_execute("SET bdr.ddl_replication = off").unwrap();
    n2.batch_execute("SET bdr.ddl_replication = off").unwrap();
    n1.batch_execute(
        "CREATE TABLE only1 (id int PRIMARY KEY, v text); INSERT INTO only1 VALUES (1, 'a')",
    )
    .unwrap();
    let e = wait_for_apply_error(&mut n2, "target_table_missing");
    assert!(e.contains("only1"), "{e}");
    n2.batch_execute("CREATE TABLE only1 (id int PRIMARY KEY, v text)")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, &["only1"]);

    // A table dropped on node2 just now: its changes are skipped.
    n2.batch_execute("DROP TABLE only1").unwrap();
    n1.batch_execute("INSERT INTO only1 VALUES (2, 'b')")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(
        history(&mut n2, "only1"),
        ["target_table_missing:error", "target_table_missing:skip"]
    );

    // target_column_missing: a column only node1 has is ignored while NULL
    // and stops the apply once a change sets it, until node2 adds it.
    n1.batch_execute(
        "ALTER TABLE ii ADD COLUMN extra text; INSERT INTO ii (id, v) VALUES (1, 'no extra')",
    )
    .unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(one(&mut n2, "SELECT v FROM ii WHERE id = 1"), "no extra");
    n1.batch_execute("INSERT INTO ii VALUES (2, 'with extra', 'value')")
        .unwrap();
    wait_for_apply_error(&mut n2, "target_column_missing");
    n2.batch_execute("ALTER TABLE ii ADD COLUMN extra text")
        .unwrap();
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, &["ii"]);

    // source_column_missing: a column only node2 has gets its default.
    n2.batch_execute("ALTER TABLE uu ADD COLUMN local_note text DEFAULT 'from default'")
        .unwrap();
    n1.batch_execute("INSERT INTO uu VALUES (1, 'x')").unwrap();
    wait_for_replication(&c, DB);
    assert_eq!(
        one(&mut n2, "SELECT local_note FROM uu WHERE id = 1"),
        "from default"
    );
    assert_eq!(
        history(&mut n2, "uu"),
        ["source_column_missing:apply_remote"]
    );
    assert_converged(&c, DB, &["ii", "dd"]);
}

#[test]
fn maximum_clock_skew_wait_holds_a_future_commit_until_the_local_clock_reaches_it() {
    let c = group(2);
    let mut n1 = c.node(0).connect(DB);
    let mut n2 = c.node(1).connect(DB);
    for q in [
        "ALTER SYSTEM SET bdr.maximum_clock_skew = 0",
        "ALTER SYSTEM SET bdr.maximum_clock_skew_action = 'wait'",
        "SELECT pg_reload_conf()",
    ] {
        n2.batch_execute(q).unwrap();
    }
    // The writer re-reads its configuration after a commit; give it one.
    n1.batch_execute("INSERT INTO dd VALUES (100, 'reload')")
        .unwrap();
    wait_for_replication(&c, DB);

    // node1 commits "3 seconds in the future" (bdr_local origin).
    let ts = one(&mut n1, "clock_timestamp() + interval '3 seconds'");
    commit_as_of(&mut n1, &ts, "INSERT INTO dd VALUES (1, 'from the future')");
    wait_for(
        "node2 to apply the future commit",
        Duration::from_secs(60),
        || (one(&mut n2, "SELECT count(*) FROM dd WHERE id = 1") == "1").then_some(()),
    );
    // node2 applied it only once its own clock had passed the commit time.
    assert_eq!(
        one(
            &mut n2,
            &format!("clock_timestamp() >= '{ts}'::timestamptz")
        ),
        "true"
    );

    // WARN only logs, at most once a minute.
    for q in [
        "ALTER SYSTEM SET bdr.maximum_clock_skew_action = 'warn'",
        "SELECT pg_reload_conf()",
    ] {
        n2.batch_execute(q).unwrap();
    }
    n1.batch_execute("INSERT INTO dd VALUES (101, 'reload')")
        .unwrap();
    wait_for_replication(&c, DB);
    let ts = one(&mut n1, "clock_timestamp() + interval '1 hour'");
    commit_as_of(&mut n1, &ts, "INSERT INTO dd VALUES (2, 'far future')");
    wait_for_replication(&c, DB);
    assert!(c.node(1).log().contains("clock skew: node"));
    assert_converged(&c, DB, TABLES);
}

/// Three nodes update a small hot set of rows concurrently for 30 seconds
/// (most updates conflict), while one node's writer is killed now and then.
/// Afterwards every node holds, for every row, the write with the latest
/// commit timestamp (ties to the higher node id).
#[test]
fn randomized_hot_set_converges_to_the_latest_write_of_every_row() {
    let c = group(3);
    const ROWS: i64 = 8;
    {
        let mut n1 = c.node(0).connect(DB);
        for id in 0..ROWS {
            n1.execute("INSERT INTO hot VALUES ($1, 0, 'init')", &[&(id as i32)])
                .unwrap();
        }
    }
    wait_for_replication(&c, DB);
    let ids: Vec<u32> = {
        let mut n1 = c.node(0).connect(DB);
        (1..=3)
            .map(|i| node_id(&mut n1, &format!("node{i}")))
            .collect()
    };

    let stop_at = std::time::Instant::now() + Duration::from_secs(30);
    // Each client records (row, write id, commit timestamp in µs, node id).
    let handles: Vec<_> = (0..3)
        .map(|i| {
            let dsn = c.node(i).dsn(DB);
            let node_name = format!("node{}", i + 1);
            let node_id = ids[i];
            std::thread::spawn(move || {
                let mut cl = bdr_tests::postgres::Client::connect(&dsn, bdr_tests::postgres::NoTls)
                    .unwrap();
                let mut seed: u64 = 0x9e37_79b9_7f4a_7c15 ^ (node_id as u64);
                let mut next = || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let mut writes = Vec::new();
                let mut seq: i64 = 0;
                while std::time::Instant::now() < stop_at {
                    seq += 1;
                    let wid = (i as i64 + 1) * 1_000_000_000 + seq;
                    // One or two rows per transaction, in key order on every
                    // node, so that clients and writers never deadlock.
                    let a = (next() % ROWS as u64) as i32;
                    let b = (next() % ROWS as u64) as i32;
                    let mut touched = vec![a];
                    if b != a && next() % 2 == 0 {
                        touched.push(b);
                    }
                    touched.sort_unstable();
                    let r = (|| -> Result<String, bdr_tests::postgres::Error> {
                        let mut tx = cl.transaction()?;
                        for id in &touched {
                            tx.execute(
                                "UPDATE hot SET wid = $1, node = $2, n = n + 1 WHERE id = $3",
                                &[&wid, &node_name, id],
                            )?;
                        }
                        let xid: String = tx
                            .query_one("SELECT pg_current_xact_id()::text", &[])?
                            .get(0);
                        tx.commit()?;
                        Ok(xid)
                    })();
                    let xid = match r {
                        Ok(x) => x,
                        // A serialization or deadlock error loses only this write.
                        Err(e) if e.as_db_error().is_some() => continue,
                        Err(e) => panic!("{e}"),
                    };
                    let ts: i64 = cl
                        .query_one(
                            "SELECT (extract(epoch FROM pg_xact_commit_timestamp($1::text::xid8::xid)) * 1000000)::int8",
                            &[&xid],
                        )
                        .unwrap()
                        .get(0);
                    for id in touched {
                        writes.push((id, wid, ts, node_id));
                    }
                }
                writes
            })
        })
        .collect();

    // Meanwhile, kill node2's writers again each time they have applied
    // another 50 transactions.
    let mut killer = c.node(1).connect(DB);
    let mut kills = 0;
    let applied = |k: &mut Client| -> i64 {
        one(
            k,
            "SELECT COALESCE(sum(ncommit), 0) FROM bdr.stat_subscription",
        )
        .parse()
        .unwrap()
    };
    let mut last = applied(&mut killer);
    while std::time::Instant::now() < stop_at {
        wait_for(
            "node2's writers to apply more",
            Duration::from_secs(60),
            || {
                let now = applied(&mut killer);
                (now >= last + 50 || std::time::Instant::now() >= stop_at).then_some(())
            },
        );
        last = applied(&mut killer);
        let killed: i64 = killer
            .query_one(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(w.task_pid)
                   FROM bdr.worker_tasks w JOIN pg_stat_activity a ON a.pid = w.task_pid
                  WHERE w.task_key_worker_role_name = 'writer') k",
                &[],
            )
            .unwrap()
            .get(0);
        kills += killed;
    }
    assert!(kills > 0, "no writer was killed");

    let mut writes = Vec::new();
    for h in handles {
        writes.extend(h.join().unwrap());
    }
    wait_for_mesh(&c, DB);
    wait_for_replication(&c, DB);
    assert_converged(&c, DB, TABLES);

    // The winner of each row: latest commit timestamp, ties to the higher id.
    let mut n1 = c.node(0).connect(DB);
    let mut conflicts = 0;
    for id in 0..ROWS as i32 {
        let expected = writes
            .iter()
            .filter(|w| w.0 == id)
            .max_by_key(|w| (w.2, w.3))
            .map(|w| w.1);
        let Some(expected) = expected else { continue };
        let got: i64 = n1
            .query_one("SELECT wid FROM hot WHERE id = $1", &[&id])
            .unwrap()
            .get(0);
        assert_eq!(got, expected, "row {id}: not the latest write");
        conflicts += 1;
    }
    assert!(conflicts > 0);
    assert!(
        one(
            &mut n1,
            "SELECT count(*) FROM bdr.conflict_history WHERE relname = 'hot'"
        )
        .parse::<i64>()
        .unwrap()
            > 0
    );
}
