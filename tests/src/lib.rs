//! A harness for multi-node bdr tests: real PostgreSQL 15 instances, started
//! as the `postgres` user on free ports with the settings bdr needs.
//!
//! Everything a test starts is stopped when the `Cluster` is dropped, also when
//! the test panics; a failing test prints every instance's server log.

use postgres::{Client, NoTls};
use std::fmt::Write as _;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub use postgres;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The settings every bdr node needs, written to each instance's postgresql.conf.
pub const BASE_CONF: &str = concat!(
    include_str!("../../scripts/bdr-node.conf"),
    "fsync = off\nlog_line_prefix = '%m [%p] %b '\nlog_min_messages = info\n"
);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a PostgreSQL program as the `postgres` user (PostgreSQL refuses
/// root), with RUST_BACKTRACE=1 as a developer would have it: users must still
/// never see a Rust backtrace in an error (see the foundation tests).
fn run_as_postgres(program: &str, args: &[&str]) -> std::process::Output {
    run_as_postgres_with(program, args, &[])
}

/// As `run_as_postgres`, with more environment variables.
fn run_as_postgres_with(
    program: &str,
    args: &[&str],
    env: &[(String, String)],
) -> std::process::Output {
    let path = format!("{PG_BIN}/{program}");
    // SAFETY: geteuid has no preconditions.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", &path]);
        c
    } else {
        Command::new(&path)
    };
    cmd.env("RUST_BACKTRACE", "1")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// Where the ports the servers listen on are taken from: below the
/// kernel's ephemeral range, which outgoing connections (every walreceiver
/// and libpq client of a running test) take their local ports from. A port
/// picked there could be taken by such a connection before the server
/// that was to listen on it starts.
const PORT_FLOOR: u32 = 16_384;

fn ephemeral_floor() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .filter(|&p: &u32| p > PORT_FLOOR + 1000)
        .unwrap_or(32_768)
}

/// A free TCP port on the loopback interface, outside the ephemeral range,
/// not handed out before by this process.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let span = ephemeral_floor() - PORT_FLOOR;
    // Test binaries run one after another: each starts elsewhere in the
    // range, so that a server an earlier one left behind is not met first.
    let start = std::process::id() * 97;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = PORT_FLOOR + (start + n) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free port found");
}

pub struct Instance {
    pub name: String,
    pub port: u16,
    pub datadir: PathBuf,
    pub logfile: PathBuf,
    running: bool,
    /// Environment of the server, e.g. a faked clock (`skew_clock`).
    env: Vec<(String, String)>,
}

/// Where Debian's `faketime` package puts the library.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

impl Instance {
    pub fn dsn(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} dbname={} user=postgres",
            self.port, db
        )
    }

    pub fn connect(&self, db: &str) -> Client {
        let dsn = self.dsn(db);
        wait_for_ok(
            &format!("a connection to {} ({dsn})", self.name),
            Duration::from_secs(30),
            || Client::connect(&dsn, NoTls),
        )
    }

    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        let datadir = self.datadir.to_string_lossy();
        let mut all = vec!["-D", &datadir, "-w", "-t", "60"];
        all.extend_from_slice(args);
        run_as_postgres_with("pg_ctl", &all, &self.env)
    }

    /// Makes the server's wall clock run `seconds` ahead (negative: behind)
    /// of the machine's from its next start, through libfaketime; monotonic
    /// clocks (timeouts, latches) stay real.
    pub fn skew_clock(&mut self, seconds: f64) {
        assert!(
            Path::new(LIBFAKETIME).exists(),
            "{LIBFAKETIME} is missing: install Debian's faketime package (scripts/setup.sh does)"
        );
        self.env = vec![
            ("LD_PRELOAD".into(), LIBFAKETIME.into()),
            ("FAKETIME".into(), format!("{seconds:+}")),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
        ];
    }

    pub fn start(&mut self) {
        let out = self.pg_ctl(&["-l", &self.logfile.to_string_lossy(), "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start {} failed: {}\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        self.running = true;
    }

    /// Stops the instance; `mode` is pg_ctl's: smart, fast or immediate.
    pub fn stop(&mut self, mode: &str) {
        if self.running {
            self.pg_ctl(&["-m", mode, "stop"]);
            self.running = false;
        }
    }

    /// kill -9 of the postmaster, as a crash would.
    pub fn kill9(&mut self) {
        let pidfile = fs::read_to_string(self.datadir.join("postmaster.pid")).unwrap_or_default();
        if let Some(pid) = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        {
            // SAFETY: sending a signal to a pid we started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            wait_for(
                &format!("postmaster {pid} to exit"),
                Duration::from_secs(30),
                || {
                    // SAFETY: kill with signal 0 only checks for existence.
                    (unsafe { libc::kill(pid, 0) } != 0).then_some(())
                },
            );
        }
        self.running = false;
    }

    /// kill -9 of the postmaster and every process of the instance at once,
    /// as a power cut would (their sessions end mid-transaction). Takes
    /// `&self` so that a test can crash a node while other threads use the
    /// cluster; call `start` afterwards.
    pub fn crash(&self) {
        let pidfile = fs::read_to_string(self.datadir.join("postmaster.pid")).unwrap_or_default();
        let Some(pm) = pidfile
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        else {
            return;
        };
        let mut pids = vec![pm];
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = fs::read_to_string(e.path().join("stat")).unwrap_or_default();
            // The parent pid is the 2nd field after the parenthesised command.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(pm) {
                pids.push(pid);
            }
        }
        for pid in &pids {
            // SAFETY: sending a signal to processes this harness started.
            unsafe { libc::kill(*pid, libc::SIGKILL) };
        }
        for pid in pids {
            wait_for(
                &format!("process {pid} to exit"),
                Duration::from_secs(30),
                || {
                    // Gone, or a zombie nobody has reaped yet: either way dead.
                    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                    let state = stat
                        .rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().next());
                    matches!(state, None | Some("Z") | Some("X")).then_some(())
                },
            );
        }
        // A killed postmaster may linger as a zombie if nothing reaps it,
        // which PostgreSQL would take for a running server; after a real
        // crash its pid would simply not exist.
        let _ = fs::remove_file(self.datadir.join("postmaster.pid"));
    }

    /// Appends to postgresql.conf; takes effect on reload or restart.
    pub fn append_conf(&self, text: &str) {
        let path = self.datadir.join("postgresql.conf");
        let mut conf = fs::read_to_string(&path).unwrap();
        conf.push_str(text);
        conf.push('\n');
        fs::write(&path, conf).unwrap();
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.logfile).unwrap_or_default()
    }
}

/// A set of instances under one temporary directory.
pub struct Cluster {
    pub root: PathBuf,
    pub nodes: Vec<Instance>,
    keep: bool,
}

impl Cluster {
    /// Starts `n` instances with `BASE_CONF` plus `extra_conf`.
    pub fn start(n: usize, extra_conf: &str) -> Cluster {
        let mut c = Cluster::new_stopped(n, extra_conf);
        for i in &mut c.nodes {
            i.start();
        }
        c
    }

    /// Creates `n` instances without starting them (to change their config first).
    pub fn new_stopped(n: usize, extra_conf: &str) -> Cluster {
        let base = std::env::var("BDR_TEST_TMP").unwrap_or_else(|_| "/tmp".into());
        let root = PathBuf::from(base).join(format!(
            "bdr-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        fs::set_permissions(&root, fs::Permissions::from_mode(0o777)).unwrap();
        chown_postgres(&root);
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("node{}", i + 1);
            let datadir = root.join(&name);
            let logfile = root.join(format!("{name}.log"));
            let out = run_as_postgres(
                "initdb",
                &[
                    "-D",
                    &datadir.to_string_lossy(),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
            );
            assert!(
                out.status.success(),
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let port = free_port();
            let inst = Instance {
                name,
                port,
                datadir,
                logfile,
                running: false,
                env: Vec::new(),
            };
            inst.append_conf(&format!("{BASE_CONF}port = {port}\n{extra_conf}"));
            nodes.push(inst);
        }
        let keep = std::env::var_os("BDR_TEST_KEEP").is_some();
        Cluster { root, nodes, keep }
    }

    pub fn node(&self, i: usize) -> &Instance {
        &self.nodes[i]
    }

    pub fn node_mut(&mut self, i: usize) -> &mut Instance {
        &mut self.nodes[i]
    }

    /// All server logs, for a failure report.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            let _ = writeln!(
                s,
                "===== server log of {} (port {}) =====\n{}",
                n.name,
                n.port,
                n.log()
            );
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for n in &mut self.nodes {
            n.stop("immediate");
        }
        if !self.keep {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

fn chown_postgres(p: &Path) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let st = Command::new("chown")
            .args(["postgres:postgres", p.to_str().unwrap()])
            .stdout(Stdio::null())
            .status();
        assert!(
            st.map(|s| s.success()).unwrap_or(false),
            "chown postgres {p:?}"
        );
    }
}

/// Polls `f` until it returns Ok, failing the test with `what` and the last
/// error after `timeout`.
pub fn wait_for_ok<T, E: std::fmt::Display>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {e}")
            }
            // The poll interval; the deadline above bounds the wait.
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Polls `f` until it returns Some, failing the test with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    wait_for_ok(what, timeout, || f().ok_or("condition not met yet"))
}

/// The full contents of a table, ordered by every column, as text rows.
pub fn table_contents(client: &mut Client, table: &str) -> Vec<String> {
    let q = format!("SELECT bdr_row::text FROM {table} bdr_row ORDER BY 1");
    client
        .query(&q, &[])
        .unwrap_or_else(|e| panic!("{q}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Asserts that `tables` hold the same rows in database `db` on every instance.
pub fn assert_converged(cluster: &Cluster, db: &str, tables: &[&str]) {
    let all: Vec<usize> = (0..cluster.nodes.len()).collect();
    assert_converged_on(cluster, db, tables, &all);
}

/// Asserts that `tables` hold the same rows in database `db` on the
/// instances numbered `nodes` (0-based).
pub fn assert_converged_on(cluster: &Cluster, db: &str, tables: &[&str], nodes: &[usize]) {
    let mut first: Option<(String, Vec<Vec<String>>)> = None;
    for n in nodes.iter().map(|i| &cluster.nodes[*i]) {
        let mut c = n.connect(db);
        let contents: Vec<Vec<String>> = tables.iter().map(|t| table_contents(&mut c, t)).collect();
        match &first {
            None => first = Some((n.name.clone(), contents)),
            Some((name, expect)) => {
                for (i, t) in tables.iter().enumerate() {
                    if contents[i] != expect[i] {
                        let only = |a: &[String], b: &[String]| -> Vec<String> {
                            a.iter()
                                .filter(|r| b.binary_search(r).is_err())
                                .cloned()
                                .collect()
                        };
                        panic!(
                            "table {t} differs between {name} and {}:\n only on {name}: {:?}\n only on {}: {:?}\n{}",
                            n.name,
                            only(&expect[i], &contents[i]),
                            n.name,
                            only(&contents[i], &expect[i]),
                            row_history(cluster, db, t)
                        );
                    }
                }
            }
        }
    }
}

/// Who last wrote each row of `table`, on every node, for a failure report.
fn row_history(cluster: &Cluster, db: &str, table: &str) -> String {
    let mut out = String::new();
    for n in &cluster.nodes {
        let mut c = n.connect(db);
        let q = format!(
            "SELECT string_agg(format('%s@%s/%s', r::text, (x).timestamp, (x).roident), E'\\n' ORDER BY r::text)
               FROM (SELECT r, pg_xact_commit_timestamp_origin(r.xmin) x FROM {table} r) s"
        );
        let rows: Option<String> = c.query_one(&q, &[]).ok().and_then(|r| r.get(0));
        let _ = writeln!(
            out,
            "--- {} ({table}: row@commit_ts/origin)\n{}",
            n.name,
            rows.unwrap_or_default()
        );
    }
    out
}

/// The SQLSTATE and message of a failed statement.
pub fn expect_error(client: &mut Client, sql: &str) -> (String, String, Option<String>) {
    match client.batch_execute(sql) {
        Ok(()) => panic!("expected an error from: {sql}"),
        Err(e) => {
            let db = e
                .as_db_error()
                .unwrap_or_else(|| panic!("not a server error: {e}"));
            (
                db.code().code().to_string(),
                db.message().to_string(),
                db.hint().map(str::to_string),
            )
        }
    }
}

/// Makes database `db` on every instance a node of group `g`: `schema_sql`
/// runs first on each, node1 creates the group, the others join through
/// node1 with their own tables (`synchronize_structure => 'none'`), and every
/// node then waits until it receives from all the others.
pub fn form_group(cluster: &Cluster, db: &str, schema_sql: &str) {
    form_group_of(cluster, db, schema_sql, cluster.nodes.len());
}

/// Creates database `db` with `schema_sql`, the extension and the node
/// `node<i+1>` on instance `i`, without joining any group.
pub fn prepare_node(cluster: &Cluster, i: usize, db: &str, schema_sql: &str) {
    let n = &cluster.nodes[i];
    let mut c = n.connect("postgres");
    c.batch_execute(&format!("CREATE DATABASE {db}")).unwrap();
    let mut c = n.connect(db);
    c.batch_execute(schema_sql).unwrap();
    c.batch_execute("CREATE EXTENSION bdr").unwrap();
    c.execute(
        "SELECT bdr.create_node($1, $2)",
        &[&format!("node{}", i + 1), &n.dsn(db)],
    )
    .unwrap();
}

/// As `form_group`, with the first `count` instances only.
pub fn form_group_of(cluster: &Cluster, db: &str, schema_sql: &str, count: usize) {
    for i in 0..count {
        prepare_node(cluster, i, db, schema_sql);
    }
    let first = cluster.node(0);
    first
        .connect(db)
        .batch_execute("SELECT bdr.create_node_group('g')")
        .unwrap();
    for n in cluster.nodes.iter().take(count).skip(1) {
        n.connect(db)
            .execute(
                "SELECT bdr.join_node_group($1, 'g', synchronize_structure => 'none')",
                &[&first.dsn(db)],
            )
            .unwrap_or_else(|e| panic!("join of {} failed: {e:?}", n.name));
    }
    let nodes: Vec<usize> = (0..count).collect();
    wait_for_mesh_on(cluster, db, &nodes);
}

/// Waits until every node of `db` streams from every other.
pub fn wait_for_mesh(cluster: &Cluster, db: &str) {
    let all: Vec<usize> = (0..cluster.nodes.len()).collect();
    wait_for_mesh_on(cluster, db, &all);
}

/// Waits until every node of `nodes` (0-based) streams from every other.
pub fn wait_for_mesh_on(cluster: &Cluster, db: &str, nodes: &[usize]) {
    for n in nodes.iter().map(|i| &cluster.nodes[*i]) {
        let mut c = n.connect(db);
        c.batch_execute("SET statement_timeout = '90s'; SELECT bdr.wait_for_join_completion()")
            .unwrap_or_else(|e| panic!("{} did not complete its join: {e:?}", n.name));
    }
}

/// Waits until every node has applied everything every other node wrote so
/// far: each node waits for its peers to confirm its current WAL position.
pub fn wait_for_replication(cluster: &Cluster, db: &str) {
    let all: Vec<usize> = (0..cluster.nodes.len()).collect();
    wait_for_replication_on(cluster, db, &all);
}

/// As `wait_for_replication`, for the instances numbered `nodes` (0-based).
pub fn wait_for_replication_on(cluster: &Cluster, db: &str, nodes: &[usize]) {
    for n in nodes.iter().map(|i| &cluster.nodes[*i]) {
        let mut c = n.connect(db);
        c.batch_execute(
            "SET statement_timeout = '120s'; SELECT bdr.wait_slot_confirm_lsn(NULL, NULL)",
        )
        .unwrap_or_else(|e| panic!("replication from {} did not catch up: {e:?}", n.name));
    }
}

/// Disables, on the node of `c`, its subscription from node `origin`, and
/// waits until that subscription's receiver and writer have stopped.
pub fn stop_receiving_from(c: &mut Client, origin: &str) {
    c.execute(
        "SELECT bdr.alter_subscription_disable(sub_name) FROM bdr.subscription_summary WHERE origin_name = $1",
        &[&origin],
    )
    .unwrap();
    wait_for(
        &format!("the subscription from {origin} to stop"),
        Duration::from_secs(60),
        || {
            let n: i64 = c
                .query_one(
                    "SELECT count(*) FROM bdr.worker_tasks w JOIN pg_stat_activity a ON a.pid = w.task_pid
                       JOIN bdr.subscription s ON s.sub_name = w.sub_name
                       JOIN bdr.node o ON o.node_id = s.origin_node_id
                      WHERE o.node_name = $1",
                    &[&origin],
                )
                .unwrap()
                .get(0);
            (n == 0).then_some(())
        },
    );
}

/// Commits `sql` on the node of `c` as a local change with commit timestamp
/// `ts`, through bdr's `bdr_local` replication origin.
pub fn commit_as_of(c: &mut Client, ts: &str, sql: &str) {
    c.batch_execute(&format!(
        "SELECT pg_replication_origin_session_setup('bdr_local');
         BEGIN;
         SELECT pg_replication_origin_xact_setup('0/0', '{ts}');
         {sql};
         COMMIT;
         SELECT pg_replication_origin_session_reset();"
    ))
    .unwrap();
}

/// How many receivers and writers run on the node of `c`.
pub fn running_apply_workers(c: &mut Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM bdr.worker_tasks w JOIN pg_stat_activity a ON a.pid = w.task_pid
          WHERE w.task_key_worker_role_name IN ('receiver', 'writer')",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Stops every subscription of every node of `db`; changes wait in the
/// peers' slots.
pub fn pause_subscriptions(c: &Cluster, db: &str) {
    for i in 0..c.nodes.len() {
        let mut n = c.node(i).connect(db);
        n.batch_execute(
            "SELECT bdr.alter_subscription_disable(sub_name) FROM bdr.subscription_summary",
        )
        .unwrap();
        wait_for("the apply workers to stop", Duration::from_secs(60), || {
            (running_apply_workers(&mut n) == 0).then_some(())
        });
    }
}

/// Enables every subscription again and waits until all is applied.
pub fn resume_subscriptions(c: &Cluster, db: &str) {
    for i in 0..c.nodes.len() {
        c.node(i)
            .connect(db)
            .batch_execute(
                "SELECT bdr.alter_subscription_enable(sub_name) FROM bdr.subscription_summary",
            )
            .unwrap();
    }
    wait_for_mesh(c, db);
    wait_for_replication(c, db);
}

/// A small xorshift generator: a test's randomness, repeatable from a seed.
pub struct Rng(pub u64);

impl Rng {
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
