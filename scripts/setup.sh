#!/usr/bin/env bash
# Installs everything bdr needs to build and test on a fresh Debian machine.
# Every step checks first, so running it again is cheap.
set -euo pipefail

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION=0.18.1

log() { printf '==> %s\n' "$*"; }

missing=()
for pkg in postgresql-15 postgresql-server-dev-15 libclang-dev sudo faketime; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Debian's package starts a default cluster; bdr's own instances use their own
# ports and data directories, so the stock cluster is not needed.
if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q online; then
    log "stopping Debian's default cluster (not used by bdr)"
    pg_lsclusters -h | awk '$4=="online"{print $1, $2}' | while read -r v c; do pg_ctlcluster "$v" "$c" stop || true; done
fi

if ! cargo pgrx --version 2>/dev/null | grep -q "$PGRX_VERSION"; then
    log "installing cargo-pgrx $PGRX_VERSION (takes several minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

if ! grep -qs "pg15" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    log "cargo pgrx init (uses the system PostgreSQL 15)"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi
log "setup complete"
