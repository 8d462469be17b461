#!/usr/bin/env bash
# Runs the SQL regression tests in pg_regress/ against a throw-away instance
# started as the postgres user. Usage: pg_regress/run.sh [--bless]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
bin=/usr/lib/postgresql/15/bin
regress=/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress
tmp="$(mktemp -d /tmp/bdr-regress.XXXXXX)"
chmod 777 "$tmp"
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() {
    as_pg "$bin/pg_ctl" -D "$tmp/data" -m immediate stop >/dev/null 2>&1 || true
    if [ "${status:-1}" != 0 ]; then echo "--- server log ---"; cat "$tmp/server.log" 2>/dev/null || true; fi
    if [ -n "${BDR_REGRESS_LOG:-}" ]; then cp "$tmp/server.log" "$BDR_REGRESS_LOG"; fi
    rm -rf "$tmp"
}
trap cleanup EXIT
as_pg "$bin/initdb" -D "$tmp/data" -U postgres --auth=trust --no-sync -E UTF8 --locale=C >/dev/null
cat "$here/../scripts/bdr-node.conf" >> "$tmp/data/postgresql.conf"
printf 'port = %s\nfsync = off\n' "$port" >> "$tmp/data/postgresql.conf"
as_pg "$bin/pg_ctl" -D "$tmp/data" -l "$tmp/server.log" -w start >/dev/null
# Tests include helpers/*.sql with \i, relative to this directory.
cd "$here"
tests=$(cd "$here/sql" && ls *.sql | sed 's/\.sql$//' | sort)
set +e
"$regress" --inputdir="$here" --outputdir="$tmp/out" --bindir="$bin" \
    --host=127.0.0.1 --port="$port" --user=postgres --dbname=regression \
    --load-extension=bdr $tests
status=$?
set -e
if [ $status != 0 ]; then
    cat "$tmp/out/regression.diffs" 2>/dev/null || true
    if [ "${1:-}" = "--bless" ]; then
        cp "$tmp/out/results/"*.out "$here/expected/"
        echo "expected output updated; review it with git diff"
        status=0
    fi
fi
exit $status
