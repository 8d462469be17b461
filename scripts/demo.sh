#!/usr/bin/env bash
# The main job: sets everything up, then starts a local group of three
# PostgreSQL instances with bdr and shows them replicating writes from every
# node, resolving a conflict, and a node catching up after being down.
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

schema="CREATE TABLE accounts (id int PRIMARY KEY, owner text NOT NULL, balance numeric NOT NULL DEFAULT 0, note text);"
for i in 1 2 3; do
    port=${ports[$((i-1))]}
    psql_on "$port" -d postgres -c "CREATE DATABASE bdrdemo"
    # Only node1 creates the table: the others get the schema when they join.
    if [ "$i" = 1 ]; then psql_on "$port" -d bdrdemo -c "$schema"; fi
    psql_on "$port" -d bdrdemo -c "CREATE EXTENSION bdr" \
        -c "SELECT bdr.create_node('node$i', 'host=127.0.0.1 port=$port dbname=bdrdemo')" >/dev/null
done
dsn1="host=127.0.0.1 port=${ports[0]} dbname=bdrdemo"
psql_on "${ports[0]}" -d bdrdemo -c "SELECT bdr.create_node_group('demo_group')" >/dev/null
psql_on "${ports[0]}" -d bdrdemo -c "INSERT INTO accounts VALUES (1, 'alice', 100), (2, 'bob', 50)"
echo
echo "==> node1 created group demo_group with two accounts; node2 and node3 join through node1"
echo "    (their databases are empty: the join copies the schema and the rows)"
for i in 2 3; do
    psql_on "${ports[$((i-1))]}" -d bdrdemo -c "SET client_min_messages = warning" \
        -c "SELECT bdr.join_node_group('$dsn1', 'demo_group')" >/dev/null
done
for i in 1 2 3; do
    psql_on "${ports[$((i-1))]}" -d bdrdemo -c "SET statement_timeout = '60s'" -c "SELECT bdr.wait_for_join_completion()" >/dev/null
done
echo "--- node3: bdr.node_summary"
psql_on "${ports[2]}" -d bdrdemo -c "SELECT node_name, node_group_name, peer_state_name, interface_connstr FROM bdr.node_summary ORDER BY 1"
echo "--- node3: bdr.subscription_summary (one per peer: a full mesh)"
psql_on "${ports[2]}" -d bdrdemo -c "SELECT sub_name, origin_name, target_name, subscription_status FROM bdr.subscription_summary ORDER BY 1"

wait_all() {
    # Each node waits until its peers have applied everything it wrote.
    for i in 1 2 3; do
        psql_on "${ports[$((i-1))]}" -d bdrdemo -c "SET statement_timeout = '60s'" -c "SELECT bdr.wait_slot_confirm_lsn(NULL, NULL)" >/dev/null
    done
}
show_all() {
    for i in 1 2 3; do
        echo "--- node$i: $1"
        psql_on "${ports[$((i-1))]}" -d bdrdemo -c "$1"
    done
}

echo
echo "==> every node writes: node1 inserts, node2 updates, node3 deletes"
psql_on "${ports[0]}" -d bdrdemo -c "INSERT INTO accounts VALUES (3, 'carol', 75)"
psql_on "${ports[1]}" -d bdrdemo -c "UPDATE accounts SET balance = balance + 10, note = 'raised on node2' WHERE id = 1"
psql_on "${ports[2]}" -d bdrdemo -c "DELETE FROM accounts WHERE id = 2"
wait_all
show_all "SELECT * FROM accounts ORDER BY id"

echo
echo "==> a conflict: node1 and node3 update account 3 at the same time, before"
echo "    either sees the other's change. The later commit wins on every node."
psql_on "${ports[0]}" -d bdrdemo -c "UPDATE accounts SET note = 'written on node1' WHERE id = 3" &
psql_on "${ports[2]}" -d bdrdemo -c "UPDATE accounts SET note = 'written on node3' WHERE id = 3" &
wait
wait_all
show_all "SELECT id, owner, note, pg_xact_commit_timestamp(xmin) AS last_write FROM accounts WHERE id = 3"
echo "    Each node logged the conflicts it met, and how they were resolved:"
show_all "SELECT conflict_type, conflict_resolution, remote_tuple->>'note' AS incoming, local_tuple->>'note' AS local FROM bdr.conflict_history WHERE relname = 'accounts' ORDER BY local_time"

echo
echo "==> node2 goes down; node1 keeps writing; node2 comes back and catches up"
as_pg "$bin/pg_ctl" -D "$dir/node2" -m fast -w stop >/dev/null
psql_on "${ports[0]}" -d bdrdemo -c "INSERT INTO accounts SELECT g, 'user ' || g, g FROM generate_series(10, 1009) g"
psql_on "${ports[0]}" -d bdrdemo -c "SELECT origin_name, subscription_status FROM bdr.subscription_summary ORDER BY 1"
as_pg "$bin/pg_ctl" -D "$dir/node2" -l "$dir/node2.log" -w start >/dev/null
psql_on "${ports[1]}" -d bdrdemo -c "SET statement_timeout = '60s'" -c "SELECT bdr.wait_for_join_completion()" >/dev/null
wait_all
show_all "SELECT count(*) AS accounts, sum(balance) AS total FROM accounts"
echo
echo "The three instances keep running. Connect with:"
for i in 1 2 3; do echo "  psql -h 127.0.0.1 -p ${ports[$((i-1))]} -U postgres bdrdemo     # node$i"; done
echo "Server logs: $dir/node*.log"
echo "Stop them with: scripts/demo.sh stop"
