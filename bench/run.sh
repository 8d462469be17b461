#!/usr/bin/env bash
# Builds and installs bdr in release mode, then runs every benchmark against
# bdr and, in the same run and with the same postgresql.conf, against
# PostgreSQL 15's own logical replication. Results: bench/results/<date>-<HHMM>.md
# and .json. Not part of CI. Usage: bench/run.sh  (parameters: see bench/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
command -v /usr/lib/postgresql/15/bin/pgbench >/dev/null || { echo "pgbench is missing (Debian package postgresql-15)"; exit 1; }
echo "==> building and installing the release build of bdr"
cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config
echo "==> running the benchmarks"
only=${BENCH_ONLY:-1,2,3,4,5,6}
if echo "$only" | grep -q '[1-5]'; then BENCH_ONLY=$only python3 bench/bench.py; fi
if echo ",$only," | grep -q ',6,'; then python3 bench/skew.py; fi
echo "(the installed bdr is now the release build; scripts/test.sh reinstalls the debug build)"
