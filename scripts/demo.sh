#!/usr/bin/env bash
# The main job: sets everything up, then starts a local group of three
# PostgreSQL instances with bdr and shows what bdr does.
#   scripts/demo.sh          set up, build, install, start and demonstrate
#   scripts/demo.sh stop     stop the instances and remove their data
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
dir="${BDR_DEMO_DIR:-$root/.demo}"
bin=/usr/lib/postgresql/15/bin
PG_CONFIG=$bin/pg_config
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

stop() {
    for d in "$dir"/node*/; do
        [ -f "$d/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$d" -m fast -w stop >/dev/null && echo "stopped ${d%/}"
    done
    rm -rf "$dir"
    echo "demo removed"
}

if [ "${1:-}" = "stop" ]; then stop; exit 0; fi
if [ -d "$dir" ]; then echo "an earlier demo exists in $dir; stopping it first"; stop; fi

bash scripts/setup.sh
echo "==> building and installing bdr"
cargo pgrx install --pg-config "$PG_CONFIG"

mkdir -p "$dir"
chmod 755 "$dir"
chown postgres:postgres "$dir" 2>/dev/null || true
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ports=()
for i in 1 2 3; do
    port=$(free_port)
    ports+=("$port")
    as_pg "$bin/initdb" -D "$dir/node$i" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
    cat scripts/bdr-node.conf >> "$dir/node$i/postgresql.conf"
    echo "port = $port" >> "$dir/node$i/postgresql.conf"
    as_pg "$bin/pg_ctl" -D "$dir/node$i" -l "$dir/node$i.log" -w start >/dev/null
    echo "==> node$i running on port $port"
done

psql_on() { local port=$1; shift; "$bin/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -v ON_ERROR_STOP=1 "$@"; }

for i in 1 2 3; do
    port=${ports[$((i-1))]}
    psql_on "$port" -d postgres -c "CREATE DATABASE bdrdemo"
    psql_on "$port" -d bdrdemo -c "CREATE EXTENSION bdr" \
        -c "SELECT bdr.create_node('node$i', 'host=127.0.0.1 port=$port dbname=bdrdemo')" >/dev/null
done
psql_on "${ports[0]}" -d bdrdemo -c "SELECT bdr.create_node_group('demo_group')" >/dev/null

echo
echo "==> bdr $(psql_on "${ports[0]}" -d bdrdemo -tAc 'SELECT bdr.bdr_version()') on every node; node1 created group demo_group"
for i in 1 2 3; do
    port=${ports[$((i-1))]}
    echo "--- node$i: bdr.node_summary"
    psql_on "$port" -d bdrdemo -c "SELECT node_name, node_group_name, peer_state_name, node_seq_id, interface_connstr FROM bdr.node_summary"
done
echo "--- node1: workers (bdr.worker_tasks)"
# The manager starts within a second of create_node.
for _ in $(seq 1 100); do
    n=$(psql_on "${ports[0]}" -d bdrdemo -tAc "SELECT count(*) FROM bdr.worker_tasks WHERE task_key_worker_role_name='manager' AND datname='bdrdemo' AND task_pid IS NOT NULL")
    [ "$n" = 1 ] && break
    sleep 0.1
done
psql_on "${ports[0]}" -d bdrdemo -c "SELECT task_key_worker_role_name AS role, datname, task_pid, task_nregistrations FROM bdr.worker_tasks ORDER BY 1, 2"
echo "--- node1: $(psql_on "${ports[0]}" -d bdrdemo -tAc "SELECT count(*) FROM pg_settings WHERE name LIKE 'bdr.%'") bdr settings registered (docs/settings.md)"
echo "--- joining node2 and node3 to the group is the next step (bdr.join_node_group); this version says so:"
psql_on "${ports[1]}" -d bdrdemo -c "SELECT bdr.join_node_group('host=127.0.0.1 port=${ports[0]} dbname=bdrdemo', 'demo_group')" 2>&1 || true

echo
echo "The three instances keep running. Connect with:"
for i in 1 2 3; do echo "  psql -h 127.0.0.1 -p ${ports[$((i-1))]} -U postgres bdrdemo     # node$i"; done
echo "Server logs: $dir/node*.log"
echo "Stop them with: scripts/demo.sh stop"
