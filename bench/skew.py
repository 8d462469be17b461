#!/usr/bin/env python3
"""Benchmark 6: what the clock rule costs as a function of clock skew.

A local commit on a node must be stamped later than every version that node
has applied from a peer (docs/conflicts.md, "Clocks"). When a peer's clock
runs ahead, local commits after its changes borrow a `bdr_local_<n>` origin
and commit at the newest applied timestamp + 1 µs instead of waiting.

For each skew S in BENCH_SKEWS (seconds, default 0,0.4,2): two bdr nodes,
node2's clock S ahead (libfaketime, Debian package faketime); both nodes run
pgbench updates of one hot set of 100 rows at once for BENCH_SKEW_SECONDS
(default 20), 2 clients each, every transaction also inserting a history row.
Reported: TPS per node; the share of node1's transactions that were stamped
by the clock rule (committed under a pool origin); time from the end of the
load until both nodes have confirmed each other's WAL; whether
pgbench_accounts has the same md5 on both.

Run through bench/run.sh (BENCH_ONLY=6) or directly against the installed build.
Results: bench/results/<date>-<HHMM>-skew.md and .json.
"""

import datetime
import json
import os
import shutil
import subprocess
import tempfile
import time

import bench

SKEWS = [float(s) for s in os.environ.get("BENCH_SKEWS", "0,0.4,2").split(",")]
SECONDS = int(os.environ.get("BENCH_SKEW_SECONDS", "20"))
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"

SCRIPT = """\\set aid random(1, 100)
\\set delta random(-5000, 5000)
BEGIN;
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid;
INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES (0, 0, :aid, :delta, now());
END;
"""


def pair(root, skew):
    env = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME": f"{skew:+}", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
           "FAKETIME_NO_CACHE": "1"} if skew else None
    nodes = [bench.Node(root, "n1"), bench.Node(root, "n2", env=env)]
    for i, n in enumerate(nodes):
        n.pgbench(["-i", "-q", "-s", "1"])
        if i > 0:
            n.sql("TRUNCATE pgbench_accounts, pgbench_branches, pgbench_tellers, pgbench_history")
        n.sql("CREATE EXTENSION bdr")
        n.sql(f"SELECT bdr.create_node('node{i + 1}', '{n.dsn()}')")
    nodes[0].sql("SELECT bdr.create_node_group('skewgroup')")
    nodes[1].sql(f"SELECT bdr.join_node_group('{nodes[0].dsn()}', 'skewgroup', synchronize_structure => 'none')")
    for n in nodes:
        n.sql("SET statement_timeout = '300s'; SELECT bdr.wait_for_join_completion()")
    return nodes


def run_one(root, skew):
    nodes = pair(root, skew)
    try:
        script = os.path.join(tempfile.gettempdir(), "bdr_bench_skew.sql")
        with open(script, "w") as f:
            f.write(SCRIPT)
        procs = [subprocess.Popen(
            [f"{bench.BIN}/pgbench", "-n", "-h", "127.0.0.1", "-p", str(n.port), "-U", "postgres",
             "-c", "2", "-j", "1", "-T", str(SECONDS), "-f", script, bench.DB],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in nodes]
        tps = [bench.tps_of(p.communicate()[0]) for p in procs]
        t0 = time.time()
        for n in nodes:
            n.sql("SET statement_timeout = '3600s'; SELECT bdr.wait_slot_confirm_lsn(NULL, NULL)")
        secs = time.time() - t0
        digests = [n.sql("SELECT md5(string_agg(a::text, ',' ORDER BY aid)) FROM pgbench_accounts a") for n in nodes]
        # node1's own history rows, by the origin they committed under.
        stamped, plain = map(int, nodes[0].sql(
            "SELECT count(*) FILTER (WHERE o.roname ~ '^bdr_local_'), count(*) FILTER (WHERE x.roident = 0)"
            "  FROM pgbench_history h, pg_xact_commit_timestamp_origin(h.xmin) x"
            "  LEFT JOIN pg_replication_origin o ON o.roident = x.roident"
            " WHERE x.roident = 0 OR o.roname ~ '^bdr_local_'").split("|"))
        r = {"skew_s": skew, "tps_node1": tps[0], "tps_node2": tps[1],
             "node1_stamped_share": stamped / max(1, stamped + plain), "convergence_s": secs,
             "converged": len(set(digests)) == 1}
        bench.log(f"skew {skew:+} s: {tps[0]:.0f} / {tps[1]:.0f} tps, node1 stamped "
                  f"{100 * r['node1_stamped_share']:.0f} %, converged in {secs:.1f}s: {r['converged']}")
        return r
    finally:
        for n in nodes:
            n.stop()


def main():
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results = {"started": started, "seconds": SECONDS, "runs": []}
    for skew in SKEWS:
        root = tempfile.mkdtemp(prefix="bdr-bench-skew-")
        os.chmod(root, 0o777)
        if os.geteuid() == 0:
            shutil.chown(root, "postgres", "postgres")
        try:
            results["runs"].append(run_one(root, skew))
        finally:
            if not os.environ.get("BENCH_KEEP"):
                shutil.rmtree(root, ignore_errors=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
    base = os.path.join(bench.HERE, "results", f"{stamp}-skew")
    with open(base + ".json", "w") as f:
        json.dump(results, f, indent=2)
    with open(base + ".md", "w") as f:
        f.write(f"# Benchmark 6: clock skew ({started})\n\n")
        f.write(f"Two bdr nodes, node2's clock ahead by the skew; both update one hot set of 100 rows "
                f"for {SECONDS} s (2 pgbench clients each). See bench/skew.py.\n\n")
        f.write("| skew (s) | node1 tps | node2 tps | node1 commits stamped by the clock rule | convergence (s) | identical |\n")
        f.write("|---|---|---|---|---|---|\n")
        for r in results["runs"]:
            f.write(f"| {r['skew_s']:+} | {r['tps_node1']:.0f} | {r['tps_node2']:.0f} | "
                    f"{100 * r['node1_stamped_share']:.0f} % | {r['convergence_s']:.1f} | {r['converged']} |\n")
    bench.log(f"results: {base}.md")


if __name__ == "__main__":
    main()
