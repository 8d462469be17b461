//! The foundation: settings, prerequisites, the node API and the workers,
//! checked against real PostgreSQL instances.

use bdr_tests::*;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn setting_names_in_seed() -> Option<Vec<String>> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/seeds");
    let entry = std::fs::read_dir(&dir)
        .ok()?
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("004_"))?;
    let text = std::fs::read_to_string(entry.path()).ok()?;
    let not_settings = [
        "bdr.alter_node_group_config",
        "bdr.bdr_version_num",
        "bdr.worker_tasks",
    ];
    let mut names = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("bdr.") {
        let start = i + pos;
        let mut end = start + 4;
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &text[start..end];
        let is_call = bytes.get(end) == Some(&b'(');
        if end > start + 4
            && !is_call
            && !not_settings.contains(&name)
            && !names.iter().any(|n| n == name)
        {
            names.push(name.to_string());
        }
        i = end;
    }
    Some(names)
}

/// Every setting the seed names (and every one bdr declares) is in pg_settings
/// with its declared default, type, unit and context.
#[test]
fn settings_registered_with_defaults() {
    let cluster = Cluster::start(1, "");
    let mut c = cluster.node(0).connect("postgres");
    if let Some(seed) = setting_names_in_seed() {
        assert!(seed.len() > 50, "seed parse found only {seed:?}");
        for name in &seed {
            let n: i64 = c
                .query_one("SELECT count(*) FROM pg_settings WHERE name = $1", &[name])
                .unwrap()
                .get(0);
            assert_eq!(n, 1, "{name} (named in the seed) is not registered");
        }
    }
    for s in bdr_core::settings::SETTINGS {
        let row = c
            .query_opt("SELECT boot_val, reset_val, vartype, unit, context, min_val, max_val FROM pg_settings WHERE name = $1", &[&s.name])
            .unwrap()
            .unwrap_or_else(|| panic!("{} missing", s.name));
        let boot: String = row.get(0);
        assert_eq!(boot, s.default_text(), "{} default", s.name);
        let reset: String = row.get(1);
        assert_eq!(reset, s.default_text(), "{} current value", s.name);
        let vartype: String = row.get(2);
        assert_eq!(vartype, s.type_name(), "{} type", s.name);
        let context: String = row.get(4);
        assert_eq!(context, s.context.pg_name(), "{} context", s.name);
        if let bdr_core::settings::Kind::Int { min, max, unit, .. } = s.kind {
            let u: Option<String> = row.get(3);
            assert_eq!(u.as_deref(), unit.pg_name(), "{} unit", s.name);
            let lo: String = row.get(5);
            let hi: String = row.get(6);
            assert_eq!(
                (lo, hi),
                (min.to_string(), max.to_string()),
                "{} range",
                s.name
            );
        }
    }
    // Spot checks of the seed's wording.
    let q =
        |c: &mut postgres::Client, sql: &str| -> String { c.query_one(sql, &[]).unwrap().get(0) };
    assert_eq!(
        q(
            &mut c,
            "SELECT context FROM pg_settings WHERE name = 'bdr.global_lock_max_locks'"
        ),
        "postmaster"
    );
    assert_eq!(
        q(
            &mut c,
            "SELECT context FROM pg_settings WHERE name = 'bdr.trace_level'"
        ),
        "postmaster"
    );
    assert_eq!(
        q(
            &mut c,
            "SELECT max_val FROM pg_settings WHERE name = 'bdr.writer_input_queue_size'"
        ),
        "1048576"
    );
    assert_eq!(
        q(
            &mut c,
            "SELECT max_val FROM pg_settings WHERE name = 'bdr.writer_output_queue_size'"
        ),
        "1024"
    );
    assert_eq!(q(&mut c, "SHOW bdr.min_worker_backoff_delay"), "1s");
    assert_eq!(q(&mut c, "SHOW bdr.max_worker_backoff_delay"), "1min");
    assert_eq!(q(&mut c, "SHOW bdr.writer_input_queue_size"), "1MB");
}

#[test]
fn settings_are_validated() {
    let cluster = Cluster::start(1, "");
    let mut c = cluster.node(0).connect("postgres");
    let (code, msg, hint) = expect_error(&mut c, "SET bdr.ddl_locking = 'sometimes'");
    assert_eq!(code, "22023");
    assert!(msg.contains("bdr.ddl_locking"), "{msg}");
    assert_eq!(hint.as_deref(), Some("Available values: off, on, dml."));
    let (code, msg, _) = expect_error(
        &mut c,
        "ALTER SYSTEM SET bdr.writer_output_queue_size = '2MB'",
    );
    assert_eq!(code, "22023");
    assert!(msg.contains("outside the valid range"), "{msg}");
    let (code, _, _) = expect_error(&mut c, "SET bdr.global_lock_timeout = -5");
    assert_eq!(code, "22023");
    let (code, _, _) = expect_error(&mut c, "SET bdr.lag_tracker_apply_rate_weight = 2");
    assert_eq!(code, "22023");
    let (code, _, _) = expect_error(&mut c, "ALTER SYSTEM SET bdr.max_worker_backoff_delay = -1");
    assert_eq!(code, "22023");
    let (code, msg, _) = expect_error(&mut c, "SET bdr.ddl_replicaton = off");
    assert_eq!(code, "42602", "misspelt bdr.* settings are errors: {msg}");
    assert!(msg.contains("bdr.ddl_replicaton"), "{msg}");
    // The error passed through bdr's utility hook: no Rust backtrace in DETAIL.
    let err = c.batch_execute("SET bdr.ddl_replicaton = off").unwrap_err();
    let detail = err
        .as_db_error()
        .and_then(|e| e.detail())
        .unwrap_or_default()
        .to_string();
    assert_eq!(detail, "\"bdr\" is a reserved prefix.");
    let (code, _, _) = expect_error(&mut c, "SET bdr.global_lock_max_locks = 5000");
    assert_eq!(code, "55P02", "server-start settings cannot be SET");
    // Aliases BDR documents.
    c.batch_execute("SET bdr.enable_camo = on").unwrap();
    let v: String = c.query_one("SHOW bdr.enable_camo", &[]).unwrap().get(0);
    assert_eq!(v, "remote_commit_flush");
    c.batch_execute("SET bdr.ddl_locking = 'all'; RESET bdr.enable_camo")
        .unwrap();
    let v: String = c.query_one("SHOW bdr.ddl_locking", &[]).unwrap().get(0);
    assert_eq!(v, "on");
    let (code, msg, _) = expect_error(
        &mut c,
        "ALTER SYSTEM SET bdr.standby_slot_names = 'ok_slot, Not-A-Slot'",
    );
    assert_eq!(code, "22023", "{msg}");
    assert!(msg.contains("Not-A-Slot"), "{msg}");
    c.batch_execute("ALTER SYSTEM SET bdr.standby_slot_names = 'ok_slot, other_slot'")
        .unwrap();
    c.batch_execute("ALTER SYSTEM RESET bdr.standby_slot_names")
        .unwrap();
}

#[test]
fn xact_replication_only_with_set_local() {
    let cluster = Cluster::start(1, "");
    let mut c = cluster.node(0).connect("postgres");
    let (code, msg, hint) = expect_error(&mut c, "SET bdr.xact_replication = off");
    assert_eq!(code, "22023");
    assert!(msg.contains("bdr.xact_replication"), "{msg}");
    assert!(hint.unwrap_or_default().contains("SET LOCAL"));
    let (code, _, _) = expect_error(
        &mut c,
        "SELECT set_config('bdr.xact_replication', 'off', false)",
    );
    assert_eq!(code, "22023");
    c.batch_execute("BEGIN; SET LOCAL bdr.xact_replication = off")
        .unwrap();
    let v: String = c
        .query_one("SHOW bdr.xact_replication", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, "off");
    c.batch_execute("COMMIT").unwrap();
    let v: String = c
        .query_one("SHOW bdr.xact_replication", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, "on", "SET LOCAL ends with the transaction");
    c.batch_execute("SET bdr.permit_unsafe_commands = on; SET bdr.xact_replication = off")
        .unwrap();
    c.batch_execute("RESET bdr.xact_replication; RESET bdr.permit_unsafe_commands")
        .unwrap();
    // It stays off-limits in the config file.
    let v: String = c
        .query_one("SHOW bdr.xact_replication", &[])
        .unwrap()
        .get(0);
    assert_eq!(v, "on");
}

#[test]
fn unimplemented_setting_warns() {
    let cluster = Cluster::start(1, "");
    let notices = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = notices.clone();
    let mut config: postgres::Config = cluster.node(0).dsn("postgres").parse().unwrap();
    config.notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()));
    let mut c = config.connect(postgres::NoTls).unwrap();
    c.batch_execute("SET bdr.crdt_raw_value = on").unwrap();
    let got = notices.lock().unwrap().clone();
    assert!(
        got.iter()
            .any(|m| m.contains("bdr.crdt_raw_value") && m.contains("not implemented")),
        "expected a warning naming the setting, got {got:?}"
    );
    notices.lock().unwrap().clear();
    c.batch_execute("SET bdr.crdt_raw_value = off; SET bdr.debug_level = 'log'")
        .unwrap();
    let got = notices.lock().unwrap().clone();
    assert!(
        got.is_empty(),
        "defaults and implemented settings do not warn: {got:?}"
    );
    // From the config file: the postmaster logs it once.
    cluster.node(0).append_conf("bdr.commit_scope = global");
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_for("warning in the server log", T, || {
        cluster
            .node(0)
            .log()
            .contains("setting \"bdr.commit_scope\" is accepted but not implemented yet")
            .then_some(())
    });
}

#[test]
fn prerequisites_are_checked() {
    /// Restarts with `conf` appended and returns the message and hint with which
    /// CREATE EXTENSION is refused (SQLSTATE 55000).
    fn refused(cluster: &mut Cluster, conf: &str) -> (String, String) {
        cluster.node_mut(0).stop("fast");
        cluster.node(0).append_conf(conf);
        cluster.node_mut(0).start();
        let mut c = cluster.node(0).connect("postgres");
        let (code, msg, hint) = expect_error(&mut c, "CREATE EXTENSION bdr");
        assert_eq!(code, "55000", "{msg}");
        (msg, hint.unwrap_or_default())
    }

    let mut cluster = Cluster::new_stopped(1, "");
    // Not preloaded: loading the library fails with a hint.
    let (msg, hint) = refused(&mut cluster, "shared_preload_libraries = ''");
    assert!(msg.contains("shared_preload_libraries"), "{msg}");
    assert!(hint.contains("shared_preload_libraries"), "{hint}");
    let (msg, hint) = refused(
        &mut cluster,
        "shared_preload_libraries = 'bdr'\nwal_level = replica",
    );
    assert!(msg.contains("wal_level"), "{msg}");
    assert!(hint.contains("wal_level = logical"), "{hint}");
    let (msg, _) = refused(
        &mut cluster,
        "wal_level = logical\ntrack_commit_timestamp = off",
    );
    assert!(msg.contains("track_commit_timestamp"), "{msg}");

    // output_plugin_libraries (PostgreSQL 15.20+), also checked by create_node.
    cluster.node_mut(0).stop("fast");
    cluster.node(0).append_conf("track_commit_timestamp = on");
    cluster.node_mut(0).start();
    let mut c = cluster.node(0).connect("postgres");
    let has_opl: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_settings WHERE name = 'output_plugin_libraries'",
            &[],
        )
        .unwrap()
        .get(0);
    c.batch_execute("CREATE EXTENSION bdr").unwrap();
    if has_opl == 1 {
        c.batch_execute("ALTER SYSTEM SET output_plugin_libraries = pgoutput, test_decoding")
            .unwrap();
        c.batch_execute("SELECT pg_reload_conf()").unwrap();
        wait_for("reload", T, || {
            let v: String = c
                .query_one("SHOW output_plugin_libraries", &[])
                .unwrap()
                .get(0);
            (!v.contains("bdr")).then_some(())
        });
        let (code, msg, hint) = expect_error(
            &mut c,
            "SELECT bdr.create_node('a', 'host=127.0.0.1 dbname=postgres')",
        );
        assert_eq!(code, "55000");
        assert!(msg.contains("output_plugin_libraries"), "{msg}");
        assert!(hint.unwrap_or_default().contains("bdr"));
        let n: i64 = c
            .query_one("SELECT count(*) FROM bdr.node", &[])
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "a refused create_node leaves nothing behind");
    }
}

#[test]
fn node_api_and_errors() {
    let cluster = Cluster::start(1, "");
    let mut c = cluster.node(0).connect("postgres");
    c.batch_execute("CREATE EXTENSION bdr").unwrap();
    let v: i32 = c
        .query_one("SELECT bdr.bdr_version_num()", &[])
        .unwrap()
        .get(0);
    let s: String = c.query_one("SELECT bdr.bdr_version()", &[]).unwrap().get(0);
    assert_eq!(v, bdr_core::version::version_num(&s));

    for (sql, code) in [
        (
            "SELECT bdr.create_node('Bad Name', 'dbname=postgres')",
            "42602",
        ),
        ("SELECT bdr.create_node('', 'dbname=postgres')", "42602"),
        ("SELECT bdr.create_node('a', '')", "22023"),
        ("SELECT bdr.create_node('a', 'this is not a dsn')", "22023"),
        ("SELECT bdr.create_node('a', 'hots=localhost')", "22023"),
        (
            "SELECT bdr.create_node('a', 'host=''unterminated')",
            "22023",
        ),
        ("SELECT bdr.create_node_group('g')", "55000"),
        ("SELECT bdr.drop_node('nosuch')", "42704"),
    ] {
        let (got, msg, hint) = expect_error(&mut c, sql);
        assert_eq!(got, code, "{sql}: {msg}");
        assert!(hint.is_some(), "{sql} gives a hint");
    }
    let n: i64 = c
        .query_one("SELECT count(*) FROM bdr.node", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "failed calls leave nothing behind");

    let dsn = cluster.node(0).dsn("postgres");
    let id: u32 = c
        .query_one("SELECT bdr.create_node('node-a', $1)", &[&dsn])
        .unwrap()
        .get(0);
    assert_eq!(id, bdr_core::node::node_id_for("node-a"));
    let (code, msg, _) = expect_error(
        &mut c,
        &format!("SELECT bdr.create_node('node-b', '{dsn}')"),
    );
    assert_eq!(code, "42710", "{msg}");
    assert!(msg.contains("node-a"));
    let (code, _, _) = expect_error(
        &mut c,
        &format!("SELECT bdr.create_node('node-a', '{dsn}')"),
    );
    assert_eq!(code, "42710");

    let row = c
        .query_one("SELECT node_name::text, node_group_name::text, interface_connstr, peer_state_name, node_local_dbname::text FROM bdr.node_summary", &[])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "node-a");
    assert_eq!(row.get::<_, Option<String>>(1), None);
    assert_eq!(row.get::<_, String>(2), dsn);
    assert_eq!(row.get::<_, String>(3), "CREATED");
    assert_eq!(row.get::<_, String>(4), "postgres");

    let (code, _, _) = expect_error(
        &mut c,
        "SELECT bdr.create_node_group('g', node_group_type := 'subscriber-only')",
    );
    assert_eq!(code, "0A000");
    let (code, _, _) = expect_error(&mut c, "SELECT bdr.create_node_group('g', 'parent')");
    assert_eq!(code, "0A000");
    let gid: u32 = c
        .query_one("SELECT bdr.create_node_group('g')", &[])
        .unwrap()
        .get(0);
    assert_eq!(gid, bdr_core::node::group_id_for("g"));
    let (code, _, _) = expect_error(&mut c, "SELECT bdr.create_node_group('g2')");
    assert_eq!(code, "55000", "a node belongs to one group");
    let row = c
        .query_one("SELECT node_group_name::text, peer_state_name, peer_target_state_name, node_seq_id, node_group_id FROM bdr.local_node_summary", &[])
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "g");
    assert_eq!(row.get::<_, String>(1), "ACTIVE");
    assert_eq!(row.get::<_, String>(2), "ACTIVE");
    assert_eq!(row.get::<_, i32>(3), 1);
    assert_eq!(row.get::<_, u32>(4), gid);

    let (code, msg, _) = expect_error(&mut c, "SELECT bdr.part_node('node-a')");
    assert_eq!(
        code, "55000",
        "the last node has nothing to part from: {msg}"
    );
    let (code, msg, _) = expect_error(&mut c, "SELECT bdr.join_node_group('host=x dbname=y', 'g')");
    assert_eq!(
        code, "55000",
        "a node already in a group cannot join another: {msg}"
    );

    c.batch_execute("SELECT bdr.drop_node('node-a')").unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM bdr.node", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let n: i64 = c
        .query_one("SELECT count(*) FROM bdr.node_group", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // The name is free again.
    c.batch_execute(&format!("SELECT bdr.create_node('node-a', '{dsn}')"))
        .unwrap();
}

fn manager_pid(c: &mut postgres::Client, db: &str) -> Option<i32> {
    c.query_opt(
        "SELECT task_pid FROM bdr.worker_tasks WHERE task_key_worker_role_name = 'manager' AND datname = $1",
        &[&db],
    )
    .unwrap()
    .and_then(|r| r.get::<_, Option<i32>>(0))
}

fn backend_type_running(c: &mut postgres::Client, pid: i32) -> Option<String> {
    c.query_opt(
        "SELECT backend_type FROM pg_stat_activity WHERE pid = $1",
        &[&pid],
    )
    .unwrap()
    .map(|r| r.get(0))
}

#[test]
fn supervisor_and_managers() {
    let cluster = Cluster::start(
        1,
        "bdr.min_worker_backoff_delay = '3s'\nbdr.max_worker_backoff_delay = '20s'",
    );
    let mut admin = cluster.node(0).connect("postgres");
    admin.batch_execute("CREATE DATABASE db1").unwrap();
    admin.batch_execute("CREATE DATABASE db2").unwrap();

    let sup: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'bdr supervisor'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(sup, 1, "one supervisor per instance");

    let mut c1 = cluster.node(0).connect("db1");
    let mut c2 = cluster.node(0).connect("db2");
    for (c, db) in [(&mut c1, "db1"), (&mut c2, "db2")] {
        c.batch_execute("CREATE EXTENSION bdr").unwrap();
        c.batch_execute(&format!(
            "SELECT bdr.create_node('n_{db}', '{}')",
            cluster.node(0).dsn(db)
        ))
        .unwrap();
    }
    let pid1 = wait_for("manager of db1", T, || manager_pid(&mut c1, "db1"));
    let pid2 = wait_for("manager of db2", T, || manager_pid(&mut c1, "db2"));
    assert_ne!(pid1, pid2);
    assert_eq!(
        backend_type_running(&mut admin, pid1).as_deref(),
        Some("bdr manager")
    );

    // A manager that dies is restarted, no sooner than the backoff allows.
    admin
        .execute("SELECT pg_terminate_backend($1)", &[&pid1])
        .unwrap();
    let row = wait_for("failure recorded", T, || {
        let r = c1
            .query_one(
                "SELECT task_consecutive_failures, until_launch_allowed > interval '0', task_nregistrations
                   FROM bdr.worker_tasks WHERE datname = 'db1'",
                &[],
            )
            .unwrap();
        (r.get::<_, i32>(0) >= 1).then_some(r)
    });
    assert!(row.get::<_, bool>(1), "the relaunch waits for the backoff");
    let new_pid = wait_for("manager of db1 restarted", T, || {
        manager_pid(&mut c1, "db1").filter(|p| *p != pid1)
    });
    assert_eq!(
        backend_type_running(&mut admin, new_pid).as_deref(),
        Some("bdr manager")
    );
    let nreg: i64 = c1
        .query_one(
            "SELECT task_nregistrations FROM bdr.worker_tasks WHERE datname = 'db1'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(nreg >= 2);

    // Dropping the node stops the manager; so does dropping the extension.
    c1.batch_execute("SELECT bdr.drop_node('n_db1')").unwrap();
    wait_for("manager of db1 gone", T, || {
        backend_type_running(&mut admin, new_pid)
            .is_none()
            .then_some(())
    });
    c2.batch_execute("DROP EXTENSION bdr").unwrap();
    wait_for("manager of db2 gone", T, || {
        backend_type_running(&mut admin, pid2)
            .is_none()
            .then_some(())
    });
    // With no managers left, both databases can be dropped.
    drop(c1);
    drop(c2);
    admin.batch_execute("DROP DATABASE db1").unwrap();
    admin.batch_execute("DROP DATABASE db2").unwrap();
}

#[test]
fn managers_come_back_after_restart() {
    let mut cluster = Cluster::start(1, "");
    {
        let mut c = cluster.node(0).connect("postgres");
        c.batch_execute("CREATE EXTENSION bdr").unwrap();
        c.batch_execute(&format!(
            "SELECT bdr.create_node('a', '{}')",
            cluster.node(0).dsn("postgres")
        ))
        .unwrap();
        wait_for("manager", T, || manager_pid(&mut c, "postgres"));
    }
    cluster.node_mut(0).kill9();
    cluster.node_mut(0).start();
    let mut c = cluster.node(0).connect("postgres");
    let pid = wait_for("manager after crash restart", T, || {
        manager_pid(&mut c, "postgres")
    });
    assert_eq!(
        backend_type_running(&mut c, pid).as_deref(),
        Some("bdr manager")
    );
}
