#!/usr/bin/env python3
"""bdr benchmarks, side by side with PostgreSQL 15's own logical replication.

Run through bench/run.sh, which builds and installs the release build first.
Everything runs on this machine, in one run, with one postgresql.conf for
both systems; A/B runs are interleaved. Results go to bench/results/<date>-<HHMM>.md
and .json. Nothing here asserts a time: it measures and reports.

Parameters (environment): BENCH_REPS (3), BENCH_CATCHUP_TXNS (10000),
BENCH_BULK_ROWS (1000000), BENCH_STEADY_SECONDS (60), BENCH_TPS_SECONDS (30),
BENCH_MM_SECONDS (30), BENCH_SCALE (10), BENCH_ONLY (comma list of 1..5).
"""

import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

BIN = "/usr/lib/postgresql/15/bin"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

REPS = int(os.environ.get("BENCH_REPS", "3"))
CATCHUP_TXNS = int(os.environ.get("BENCH_CATCHUP_TXNS", "10000"))
BULK_ROWS = int(os.environ.get("BENCH_BULK_ROWS", "1000000"))
STEADY_SECONDS = int(os.environ.get("BENCH_STEADY_SECONDS", "60"))
TPS_SECONDS = int(os.environ.get("BENCH_TPS_SECONDS", "30"))
MM_SECONDS = int(os.environ.get("BENCH_MM_SECONDS", "30"))
SCALE = int(os.environ.get("BENCH_SCALE", "10"))
ONLY = set(os.environ.get("BENCH_ONLY", "1,2,3,4,5").split(","))
CLIENTS = 4
DB = "bench"

# One configuration for every instance of both systems.
CONF = """
shared_preload_libraries = 'bdr'
output_plugin_libraries = 'pgoutput, test_decoding, bdr'
wal_level = logical
track_commit_timestamp = on
max_worker_processes = 32
max_wal_senders = 16
max_replication_slots = 16
listen_addresses = '127.0.0.1'
unix_socket_directories = ''
shared_buffers = 512MB
max_wal_size = 8GB
checkpoint_timeout = 30min
log_min_messages = warning
"""


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def as_pg(args):
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--"] + args
    return args


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Node:
    def __init__(self, root, name, bdr=True, env=None):
        self.name = name
        # Extra server environment, e.g. libfaketime for a skewed clock.
        self.env = dict(os.environ, **(env or {}))
        self.port = free_port()
        self.data = os.path.join(root, name)
        self.logfile = os.path.join(root, name + ".log")
        subprocess.run(as_pg([f"{BIN}/initdb", "-D", self.data, "-U", "postgres", "--auth=trust",
                              "-E", "UTF8", "--locale=C"]), check=True, stdout=subprocess.DEVNULL)
        conf = CONF if bdr else CONF.replace("shared_preload_libraries = 'bdr'", "")
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(conf + f"\nport = {self.port}\n")
        subprocess.run(as_pg([f"{BIN}/pg_ctl", "-D", self.data, "-l", self.logfile, "-w", "start"]),
                       check=True, stdout=subprocess.DEVNULL, env=self.env)
        self.sql("CREATE DATABASE " + DB, db="postgres")

    def dsn(self):
        return f"host=127.0.0.1 port={self.port} dbname={DB} user=postgres"

    def sql(self, q, db=DB):
        r = subprocess.run([f"{BIN}/psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                            "-p", str(self.port), "-U", "postgres", "-d", db, "-c", q],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{self.name}: {q[:200]}: {r.stderr.strip()}")
        return r.stdout.strip()

    def pgbench(self, args):
        r = subprocess.run([f"{BIN}/pgbench", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"] + args + [DB],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{self.name}: pgbench {args}: {r.stderr.strip()[-2000:]}")
        return r.stdout + r.stderr

    def stop(self):
        subprocess.run(as_pg([f"{BIN}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tps_of(out):
    for line in out.splitlines():
        if line.startswith("tps =") and "without initial connection time" in line:
            return float(line.split()[2])
    raise RuntimeError("no tps in pgbench output: " + out[-500:])


def cpu_seconds(pids):
    """User+system CPU seconds used so far by these processes."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            pass
    return total


def wait_until(what, f, timeout=3600, interval=0.02):
    deadline = time.time() + timeout
    while True:
        v = f()
        if v:
            return v
        if time.time() > deadline:
            raise RuntimeError("timed out waiting for " + what)
        time.sleep(interval)


EXTRA_TABLES = """
CREATE TABLE marker (id bigserial PRIMARY KEY, t timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE TABLE bulk (id int PRIMARY KEY, v int NOT NULL);
CREATE TABLE heartbeat (id int PRIMARY KEY, t timestamptz NOT NULL);
CREATE TABLE mm (id int PRIMARY KEY, n bigint NOT NULL, v text);
"""


class System:
    """A provider and subscriber pair (and for bdr a third node for 4 and 5)."""

    def marker(self):
        return int(self.provider.sql("INSERT INTO marker DEFAULT VALUES RETURNING id"))

    def wait_marker(self, m, node=None):
        node = node or self.subscriber
        wait_until("marker", lambda: node.sql(f"SELECT 1 FROM marker WHERE id = {m}") == "1")

    def sync(self):
        m = self.marker()
        self.wait_marker(m)


class Bdr(System):
    name = "bdr"

    def __init__(self, root, nodes=2):
        self.nodes = [Node(root, f"bdr{i + 1}") for i in range(nodes)]
        self.provider, self.subscriber = self.nodes[0], self.nodes[1]
        for i, n in enumerate(self.nodes):
            n.pgbench(["-i", "-q", "-s", str(SCALE)])
            if i > 0:
                n.sql("TRUNCATE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history")
            n.sql(EXTRA_TABLES)
            n.sql("CREATE EXTENSION bdr")
            n.sql(f"SELECT bdr.create_node('node{i + 1}', '{n.dsn()}')")
        self.provider.sql("SELECT bdr.create_node_group('benchgroup')")
        for n in self.nodes[1:]:
            n.sql(f"SELECT bdr.join_node_group('{self.provider.dsn()}', 'benchgroup', synchronize_structure => 'none')")
        for n in self.nodes:
            n.sql("SET statement_timeout = '300s'; SELECT bdr.wait_for_join_completion()")
        self.sync()
        self.sub_name = self.subscriber.sql(
            "SELECT sub_name FROM bdr.subscription_summary WHERE origin_name = 'node1'")

    def pause(self):
        self.subscriber.sql(f"SELECT bdr.alter_subscription_disable('{self.sub_name}')")
        wait_until("receiver to stop", lambda: self.subscriber.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type IN ('bdr receiver', 'bdr writer')") == "0"
            if len(self.nodes) == 2 else True)

    def resume(self):
        self.subscriber.sql(f"SELECT bdr.alter_subscription_enable('{self.sub_name}')")

    def apply_pids(self):
        return [int(p) for p in self.subscriber.sql(
            "SELECT pid FROM pg_stat_activity WHERE backend_type IN ('bdr receiver', 'bdr writer')").split()]

    def sender_pids(self):
        return [int(p) for p in self.provider.sql(
            f"SELECT pid FROM pg_stat_replication WHERE application_name = '{self.sub_name}'").split()]

    def origin_lsn(self):
        return self.subscriber.sql(
            "SELECT pg_replication_origin_progress(sub_origin_name, false) FROM bdr.subscription_summary"
            " WHERE origin_name = 'node1'")


class Native(System):
    name = "native"

    def __init__(self, root):
        self.provider, self.subscriber = Node(root, "pg1"), Node(root, "pg2")
        for n in (self.provider, self.subscriber):
            n.pgbench(["-i", "-q", "-s", str(SCALE)])
            n.sql(EXTRA_TABLES)
        self.provider.sql("CREATE PUBLICATION benchpub FOR ALL TABLES")
        self.subscriber.sql(
            f"CREATE SUBSCRIPTION benchsub CONNECTION '{self.provider.dsn()}' PUBLICATION benchpub"
            " WITH (binary = true, streaming = on, copy_data = false)")
        wait_until("subscription", lambda: self.subscriber.sql(
            "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL") == "1")
        self.sync()

    def pause(self):
        self.subscriber.sql("ALTER SUBSCRIPTION benchsub DISABLE")
        wait_until("apply worker to stop", lambda: self.subscriber.sql(
            "SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL") == "0")

    def resume(self):
        self.subscriber.sql("ALTER SUBSCRIPTION benchsub ENABLE")

    def apply_pids(self):
        return [int(p) for p in self.subscriber.sql(
            "SELECT pid FROM pg_stat_subscription WHERE pid IS NOT NULL").split()]

    def sender_pids(self):
        return [int(p) for p in self.provider.sql(
            "SELECT pid FROM pg_stat_replication WHERE application_name = 'benchsub'").split()]

    def origin_lsn(self):
        return self.subscriber.sql(
            "SELECT pg_replication_origin_progress('pg_' || oid, false) FROM pg_subscription WHERE subname = 'benchsub'")


def med(xs):
    return statistics.median(xs) if xs else None


def spread(xs):
    return (min(xs), max(xs)) if xs else (None, None)


# ---------------------------------------------------------------- benchmarks

def bench_catchup(systems):
    """1: the subscriber's apply is paused while the provider runs a fixed
    number of pgbench transactions; then apply resumes and is timed until the
    subscriber has it all."""
    per_client = max(1, CATCHUP_TXNS // CLIENTS)
    txns = per_client * CLIENTS
    res = {s.name: [] for s in systems}
    for rep in range(REPS):
        for s in systems:
            s.pause()
            out = s.provider.pgbench(["-n", "-c", str(CLIENTS), "-j", "2", "-t", str(per_client)])
            provider_tps = tps_of(out)
            m = s.marker()
            s.resume()
            # Timed from when the apply side is connected: how fast each
            # system starts its workers is not what this measures.
            wait_until("apply processes", lambda: len(s.apply_pids()) > 0 and len(s.sender_pids()) > 0,
                       interval=0.005)
            t0 = time.time()
            s.wait_marker(m)
            secs = time.time() - t0
            cpu_apply = cpu_seconds(s.apply_pids())
            cpu_send = cpu_seconds(s.sender_pids())
            r = {"txns": txns, "seconds": secs, "apply_tps": txns / secs, "rows_per_s": 4 * txns / secs,
                 "provider_tps": provider_tps, "ratio_to_provider": (txns / secs) / provider_tps,
                 "cpu_walsender_s": cpu_send, "cpu_apply_s": cpu_apply}
            res[s.name].append(r)
            log(f"catch-up {s.name} rep {rep + 1}: {r['apply_tps']:.0f} txn/s applied"
                f" (provider {provider_tps:.0f} tps), walsender {cpu_send:.1f}s, apply {cpu_apply:.1f}s CPU")
    return res


def bench_bulk(systems):
    """2: one big transaction per operation; time from its commit on the
    provider until the subscriber has applied it."""
    csv = os.path.join(tempfile.gettempdir(), "bdr_bench_bulk.csv")
    with open(csv, "w") as f:
        for i in range(1, BULK_ROWS + 1):
            f.write(f"{i},{i}\n")
    os.chmod(csv, 0o644)
    ops = [
        ("insert", f"INSERT INTO bulk SELECT g, g FROM generate_series(1, {BULK_ROWS}) g"),
        ("truncate", "TRUNCATE bulk"),
        ("copy", f"COPY bulk FROM '{csv}' WITH (FORMAT csv)"),
        ("update", "UPDATE bulk SET v = v + 1"),
        ("delete", "DELETE FROM bulk"),
    ]
    res = {s.name: {op: [] for op, _ in ops if op != "truncate"} for s in systems}
    for rep in range(REPS):
        for s in systems:
            for op, q in ops:
                before_a, before_s = cpu_seconds(s.apply_pids()), cpu_seconds(s.sender_pids())
                s.provider.sql(q)
                t0 = time.time()
                s.sync()
                secs = time.time() - t0
                if op == "truncate":
                    continue
                r = {"rows": BULK_ROWS, "seconds": secs, "rows_per_s": BULK_ROWS / secs,
                     "cpu_walsender_s": cpu_seconds(s.sender_pids()) - before_s,
                     "cpu_apply_s": cpu_seconds(s.apply_pids()) - before_a}
                res[s.name][op].append(r)
                log(f"bulk {op} {s.name} rep {rep + 1}: applied {secs:.1f}s after commit, {r['rows_per_s']:.0f} rows/s")
    os.unlink(csv)
    return res


class Heartbeat(threading.Thread):
    """Updates the provider's heartbeat row every 100 ms through one psql."""

    def __init__(self, node):
        super().__init__(daemon=True)
        self.stop_flag = threading.Event()
        self.p = subprocess.Popen([f"{BIN}/psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(node.port),
                                   "-U", "postgres", "-d", DB], stdin=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, text=True)

    def run(self):
        while not self.stop_flag.is_set():
            self.p.stdin.write("INSERT INTO heartbeat VALUES (1, clock_timestamp()) "
                               "ON CONFLICT (id) DO UPDATE SET t = EXCLUDED.t;\n")
            self.p.stdin.flush()
            time.sleep(0.1)

    def stop(self):
        self.stop_flag.set()
        self.join()
        self.p.stdin.close()
        self.p.wait()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def bench_steady(systems, max_tps):
    """3: pgbench at fixed rates; lag sampled every second."""
    res = {s.name: {} for s in systems}
    for frac in (25, 50, 75):
        rate = max(1, int(max_tps * frac / 100))
        for s in systems:
            res[s.name][frac] = []
        for rep in range(REPS):
            for s in systems:
                hb = Heartbeat(s.provider)
                hb.start()
                s.sync()
                samples_t, samples_b = [], []
                proc = subprocess.Popen([f"{BIN}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(s.provider.port),
                                         "-U", "postgres", "-c", str(CLIENTS), "-j", "2", "-R", str(rate),
                                         "-T", str(STEADY_SECONDS), DB],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                before_a, before_s = cpu_seconds(s.apply_pids()), cpu_seconds(s.sender_pids())
                end = time.time() + STEADY_SECONDS
                while time.time() < end:
                    t_lag = float(s.subscriber.sql(
                        "SELECT COALESCE(extract(epoch FROM clock_timestamp() - max(t)), 0) FROM heartbeat"))
                    # Applied position first, then the provider's: the
                    # difference is never flattered by the order of reads.
                    origin = s.origin_lsn()
                    wal = s.provider.sql("SELECT pg_current_wal_lsn()")
                    b_lag = float(s.provider.sql(f"SELECT pg_wal_lsn_diff('{wal}', '{origin or '0/0'}')"))
                    samples_t.append(t_lag)
                    samples_b.append(max(0.0, b_lag))
                    time.sleep(1)
                out, _ = proc.communicate()
                hb.stop()
                achieved = tps_of(out)
                third = max(1, len(samples_b) // 3)
                first, last = statistics.mean(samples_b[:third]), statistics.mean(samples_b[-third:])
                r = {"rate": rate, "achieved_tps": achieved,
                     "lag_s_p50": pct(samples_t, 50), "lag_s_p99": pct(samples_t, 99),
                     "lag_bytes_p50": pct(samples_b, 50), "lag_bytes_p99": pct(samples_b, 99),
                     "lag_grows": last > 2 * first + 1_000_000,
                     "cpu_walsender_s": cpu_seconds(s.sender_pids()) - before_s,
                     "cpu_apply_s": cpu_seconds(s.apply_pids()) - before_a}
                res[s.name][frac].append(r)
                log(f"steady {frac}% ({rate} tps) {s.name} rep {rep + 1}: lag p50 {r['lag_s_p50']:.3f}s"
                    f" p99 {r['lag_s_p99']:.3f}s, bytes p99 {r['lag_bytes_p99']:.0f}, grows {r['lag_grows']}")
                s.sync()
    return res


def bench_overhead(root, bdr3):
    """4: pgbench TPS on a bdr node with two peers, on a bdr node with no
    peers, and on PostgreSQL without bdr."""
    alone = Node(root, "bdr_alone")
    alone.pgbench(["-i", "-q", "-s", str(SCALE)])
    alone.sql("CREATE EXTENSION bdr")
    alone.sql(f"SELECT bdr.create_node('alone', '{alone.dsn()}')")
    plain = Node(root, "plain", bdr=False)
    plain.pgbench(["-i", "-q", "-s", str(SCALE)])
    variants = [("bdr, 2 peers", bdr3.provider), ("bdr, no peers", alone), ("no bdr", plain)]
    res = {v: [] for v, _ in variants}
    for n in bdr3.nodes:
        n.sql("SET statement_timeout = '600s'; SELECT bdr.wait_slot_confirm_lsn(NULL, NULL)")
    for rep in range(REPS):
        for v, node in variants:
            tps = tps_of(node.pgbench(["-n", "-c", str(CLIENTS), "-j", "2", "-T", str(TPS_SECONDS)]))
            res[v].append(tps)
            log(f"overhead {v} rep {rep + 1}: {tps:.0f} tps")
            if node is bdr3.provider:
                for n in bdr3.nodes:
                    n.sql("SET statement_timeout = '600s'; SELECT bdr.wait_slot_confirm_lsn(NULL, NULL)")
    alone.stop()
    plain.stop()
    return res


MM_SCRIPT_DISJOINT = """\\set aid random({lo}, {hi})
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
"""
MM_SCRIPT_HOT = """\\set aid random(1, 100)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
"""


def bench_multimaster(bdr3):
    """5: every node writes at once; time to convergence after the load
    stops, and a full-content comparison."""
    res = {"disjoint": [], "hot": []}
    per_node = SCALE * 100000 // len(bdr3.nodes)
    for rep in range(REPS):
        for kind in ("disjoint", "hot"):
            procs = []
            for i, n in enumerate(bdr3.nodes):
                script = os.path.join(tempfile.gettempdir(), f"bdr_bench_mm_{i}.sql")
                with open(script, "w") as f:
                    if kind == "disjoint":
                        f.write(MM_SCRIPT_DISJOINT.format(lo=i * per_node + 1, hi=(i + 1) * per_node))
                    else:
                        f.write(MM_SCRIPT_HOT)
                procs.append(subprocess.Popen(
                    [f"{BIN}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(n.port), "-U", "postgres",
                     "-c", "2", "-j", "1", "-T", str(MM_SECONDS), "-f", script, DB],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            tps = [tps_of(p.communicate()[0]) for p in procs]
            t0 = time.time()
            for n in bdr3.nodes:
                n.sql("SET statement_timeout = '3600s'; SELECT bdr.wait_slot_confirm_lsn(NULL, NULL)")
            secs = time.time() - t0
            digests = [n.sql("SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a")
                       for n in bdr3.nodes]
            r = {"tps_per_node": tps, "convergence_s": secs, "converged": len(set(digests)) == 1}
            res[kind].append(r)
            log(f"multi-master {kind} rep {rep + 1}: {sum(tps):.0f} tps in all, converged in {secs:.1f}s: {r['converged']}")
    return res


# ------------------------------------------------------------------ report

def fmt(x, d=0):
    return "-" if x is None else f"{x:,.{d}f}"


def span(xs, d=0):
    """Median with the min..max of the repetitions."""
    lo, hi = spread(xs)
    return f"{fmt(med(xs), d)} ({fmt(lo, d)}..{fmt(hi, d)})"


def ratio(a, b):
    return None if not a or not b else a / b


def report(results, started, path_md, path_json):
    L = [f"# bdr benchmarks, {started}", ""]
    L.append(f"Machine: {platform.node()}, {os.cpu_count()} cores, {platform.platform()}. "
             f"PostgreSQL 15 ({subprocess.run([BIN + '/postgres', '--version'], capture_output=True, text=True).stdout.strip()}), "
             f"bdr release build. Repetitions: {REPS}, interleaved bdr / native. "
             "Both systems: the same postgresql.conf (see bench/bench.py), fsync and synchronous_commit on, "
             "native subscription with binary = true, streaming = on. Ratios are bdr / native "
             "(above 1: bdr is faster for throughput, slower for times and lag).")
    L.append("")
    c = results.get("catchup")
    if c:
        L += ["## 1. Catch-up apply throughput (pgbench tpcb-like, scale "
              f"{SCALE}, {c['bdr'][0]['txns']} transactions)", "",
              "| system | applied txn/s (median) | min..max | rows/s | ratio to provider TPS | walsender CPU s | apply CPU s |",
              "|---|---|---|---|---|---|---|"]
        for s in ("bdr", "native"):
            xs = [r["apply_tps"] for r in c[s]]
            lo, hi = spread(xs)
            L.append(f"| {s} | {fmt(med(xs))} | {fmt(lo)}..{fmt(hi)} | {fmt(med([r['rows_per_s'] for r in c[s]]))} "
                     f"| {fmt(med([r['ratio_to_provider'] for r in c[s]]), 2)} "
                     f"| {fmt(med([r['cpu_walsender_s'] for r in c[s]]), 1)} | {fmt(med([r['cpu_apply_s'] for r in c[s]]), 1)} |")
        L.append(f"\n**Ratio bdr/native (applied txn/s): {fmt(ratio(med([r['apply_tps'] for r in c['bdr']]), med([r['apply_tps'] for r in c['native']])), 2)}**\n")
    b = results.get("bulk")
    if b:
        L += [f"## 2. Bulk ({BULK_ROWS:,} narrow rows, one transaction each)", "",
              "| operation | bdr s, median (min..max) | native s, median (min..max) | bdr rows/s | native rows/s | ratio bdr/native rows/s | bdr apply CPU s | native apply CPU s |",
              "|---|---|---|---|---|---|---|---|"]
        for op in b["bdr"]:
            bs, ns = [r["seconds"] for r in b["bdr"][op]], [r["seconds"] for r in b["native"][op]]
            br, nr = [r["rows_per_s"] for r in b["bdr"][op]], [r["rows_per_s"] for r in b["native"][op]]
            L.append(f"| {op} | {span(bs, 1)} | {span(ns, 1)} | {fmt(med(br))} | {fmt(med(nr))} "
                     f"| {fmt(ratio(med(br), med(nr)), 2)} | {fmt(med([r['cpu_apply_s'] for r in b['bdr'][op]]), 1)} "
                     f"| {fmt(med([r['cpu_apply_s'] for r in b['native'][op]]), 1)} |")
        L.append("")
    st = results.get("steady")
    if st:
        L += [f"## 3. Steady state ({STEADY_SECONDS} s per rate; rates are fractions of the native provider's "
              f"measured maximum of {fmt(results['max_tps'])} tps)", "",
              "| rate | system | achieved tps | lag p50 s | lag p99 s, median (min..max) | lag p99 bytes | lag grows | apply CPU s |",
              "|---|---|---|---|---|---|---|---|"]
        for frac in ("25", "50", "75"):
            for s in ("bdr", "native"):
                rs = st[s][frac] if frac in st[s] else st[s][int(frac)]
                L.append(f"| {frac}% ({rs[0]['rate']}) | {s} | {fmt(med([r['achieved_tps'] for r in rs]))} "
                         f"| {fmt(med([r['lag_s_p50'] for r in rs]), 3)} | {span([r['lag_s_p99'] for r in rs], 3)} "
                         f"| {fmt(med([r['lag_bytes_p99'] for r in rs]))} | {sum(r['lag_grows'] for r in rs)}/{len(rs)} "
                         f"| {fmt(med([r['cpu_apply_s'] for r in rs]), 1)} |")
        L.append("\nTime lag is the age of a heartbeat row the provider updates every 100 ms, read on the subscriber "
                 "(so it includes up to 0.1 s of heartbeat interval).\n")
    o = results.get("overhead")
    if o:
        base = med(o["no bdr"])
        L += [f"## 4. Origin overhead (pgbench tpcb-like, {CLIENTS} clients, {TPS_SECONDS} s)", "",
              "| node | tps (median) | min..max | ratio to no bdr |", "|---|---|---|---|"]
        for v, xs in o.items():
            lo, hi = spread(xs)
            L.append(f"| {v} | {fmt(med(xs))} | {fmt(lo)}..{fmt(hi)} | {fmt(ratio(med(xs), base), 2)} |")
        L.append("\nWith two peers the peers' apply runs on the same two cores as the measured node.\n")
    m = results.get("multimaster")
    if m:
        L += [f"## 5. Multi-master (3 bdr nodes, each 2 clients, {MM_SECONDS} s; PostgreSQL 15 has no native equivalent)", "",
              "| keys | total tps (median) | convergence s (median) | converged |", "|---|---|---|---|"]
        for kind, rs in m.items():
            L.append(f"| {kind} | {fmt(med([sum(r['tps_per_node']) for r in rs]))} | {fmt(med([r['convergence_s'] for r in rs]), 1)} "
                     f"| {sum(r['converged'] for r in rs)}/{len(rs)} |")
        L.append("")
    with open(path_md, "w") as f:
        f.write("\n".join(L) + "\n")
    with open(path_json, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print("\n".join(L))


def main():
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    root = tempfile.mkdtemp(prefix="bdr-bench-")
    os.chmod(root, 0o777)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    nodes = []
    results = {"started": started, "params": {"reps": REPS, "scale": SCALE, "catchup_txns": CATCHUP_TXNS, "bulk_rows": BULK_ROWS,
                          "steady_seconds": STEADY_SECONDS, "tps_seconds": TPS_SECONDS, "mm_seconds": MM_SECONDS}}
    try:
        log("setting up the bdr pair and the native pair")
        bdr = Bdr(root)
        native = Native(root)
        nodes += bdr.nodes + [native.provider, native.subscriber]
        systems = [bdr, native]
        if "1" in ONLY:
            results["catchup"] = bench_catchup(systems)
        if "2" in ONLY:
            results["bulk"] = bench_bulk(systems)
        if "3" in ONLY:
            results["max_tps"] = tps_of(native.provider.pgbench(
                ["-n", "-c", str(CLIENTS), "-j", "2", "-T", str(min(TPS_SECONDS, 20))]))
            native.sync()
            log(f"native provider maximum: {results['max_tps']:.0f} tps")
            results["steady"] = bench_steady(systems, results["max_tps"])
        if "4" in ONLY or "5" in ONLY:
            for n in (native.provider, native.subscriber):
                n.stop()
            log("setting up a three-node bdr group")
            for n in bdr.nodes:
                n.stop()
            os.makedirs(root + "/g3", exist_ok=True)
            os.chmod(root + "/g3", 0o777)
            if os.geteuid() == 0:
                shutil.chown(root + "/g3", "postgres", "postgres")
            bdr3 = Bdr(root + "/g3", nodes=3)
            nodes += bdr3.nodes
            if "4" in ONLY:
                results["overhead"] = bench_overhead(root, bdr3)
            if "5" in ONLY:
                results["multimaster"] = bench_multimaster(bdr3)
    finally:
        for n in nodes:
            n.stop()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(root, ignore_errors=True)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
    report(results, started, os.path.join(HERE, "results", f"{stamp}.md"),
           os.path.join(HERE, "results", f"{stamp}.json"))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":
        # Re-renders the tables of an earlier run from its JSON.
        with open(sys.argv[2]) as f:
            res = json.load(f)
        for k, v in res.get("params", {}).items():
            globals()[{"reps": "REPS", "scale": "SCALE", "catchup_txns": "CATCHUP_TXNS", "bulk_rows": "BULK_ROWS",
                       "steady_seconds": "STEADY_SECONDS", "tps_seconds": "TPS_SECONDS",
                       "mm_seconds": "MM_SECONDS"}[k]] = v
        base = sys.argv[2][:-len(".json")]
        report(res, res.get("started", os.path.basename(base)), base + ".md", sys.argv[2])
        sys.exit(0)
    sys.exit(main())
