#!/usr/bin/env bash
# Runs the whole bdr test suite: pure unit tests, #[pg_test]s, pg_regress and
# the multi-node tests. Installs whatever is missing first. Exits non-zero on
# any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
export RUST_BACKTRACE=${RUST_BACKTRACE:-0}

bash scripts/setup.sh

step() { printf '\n==== %s\n' "$*"; }

step "formatting and lints (cargo fmt --check, cargo clippy -D warnings)"
cargo fmt --all -- --check
cargo clippy --all-targets --workspace -- -D warnings

step "unit tests (pure logic, no PostgreSQL)"
cargo test -p bdr-core

step "#[pg_test] tests inside PostgreSQL"
pgtest_dir=$(mktemp -d /tmp/bdr-pgtest.XXXXXX)
chown postgres:postgres "$pgtest_dir" 2>/dev/null || true
cargo pgrx test pg15 --runas postgres --pgdata "$pgtest_dir/data"
rm -rf "$pgtest_dir"

# cargo pgrx test installed its test build; install the real one.
step "install the extension"
cargo pgrx install --pg-config "$PG_CONFIG"

step "pg_regress"
bash pg_regress/run.sh

step "multi-node tests"
cargo test -p bdr-tests -- --test-threads=2

echo
echo "all test suites passed"
