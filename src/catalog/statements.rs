//! The statements on bdr's tables that the writers and the tombstone
//! triggers prepare once and keep (SPI plans), with their parameters noted.
//! Kept here with the rest of the catalog's SQL, so that a change of a
//! table is a change of this directory.

/// Whether a key is remembered as deleted; `$1` relid (oid), `$2` key text.
/// Returns the tombstone's xmin (its commit timestamp and origin say who
/// deleted it when).
pub const TOMBSTONE_FIND: &str =
    "SELECT xmin FROM bdr.tombstone WHERE relid = $1 AND key_hash = pg_catalog.md5($2)";

/// Remembers a key as deleted, by this transaction; `$1` relid (oid), `$2`
/// key text.
pub const TOMBSTONE_PUT: &str =
    "INSERT INTO bdr.tombstone (relid, key_hash) VALUES ($1, pg_catalog.md5($2))
     ON CONFLICT (relid, key_hash) DO UPDATE SET relid = EXCLUDED.relid";

/// The real writer of a row a join copied, as `commit_us node_id`; `$1`
/// relid, `$2` key text, `$3` whether a delete (all as text).
pub const COPIED_ROW_WRITER: &str =
    "SELECT c.commit_us::text || ' ' || COALESCE(c.node_id, 0)::text FROM bdr.copied_row c
      WHERE c.relid = $1::oid AND c.key_hash = pg_catalog.md5($2) AND c.deleted = $3::bool
      LIMIT 1";

/// Whether a table was dropped here recently; `$1` schema, `$2` name, `$3`
/// the window as interval text.
pub const RECENTLY_DROPPED: &str =
    "SELECT 1 FROM bdr.dropped_relation WHERE nspname = $1 AND relname = $2
        AND dropped_at > pg_catalog.now() - $3::text::interval";

/// Columns of `bdr.conflict_history` a writer fills, all passed as text.
const HISTORY_COLUMNS: &str = "sub_id, local_xid, local_lsn, remote_xid, remote_commit_lsn,
    remote_commit_time, conflict_type, conflict_resolution, conflict_index, reloid, nspname,
    relname, key_tuple, remote_tuple, local_tuple, apply_tuple, local_tuple_xmin,
    local_tuple_node_id, local_tuple_commit_time";

const HISTORY_VALUES: &str = "$1::oid, $2::xid, $3::pg_lsn, $4::xid, $5::pg_lsn,
    bdr._ts($6::int8), $7, $8, $9::oid::regclass, $10::oid, $11, $12, $13::json, $14::json,
    $15::json, $16::json, $17::xid, $18::oid, bdr._ts($19::int8)";

/// How many parameters a conflict history row takes.
pub const HISTORY_PARAMS: usize = 19;

/// Records a conflict; parameters as `HISTORY_VALUES` lists them.
pub fn history_insert() -> String {
    format!("INSERT INTO bdr.conflict_history ({HISTORY_COLUMNS}) VALUES ({HISTORY_VALUES})")
}

/// Records a conflict that stopped the apply, once per remote transaction
/// however often its retry stops again.
pub fn history_insert_error_once() -> String {
    format!(
        "INSERT INTO bdr.conflict_history ({HISTORY_COLUMNS}) SELECT {HISTORY_VALUES}
          WHERE NOT EXISTS (SELECT 1 FROM bdr.conflict_history h
                 WHERE h.sub_id = $1::oid AND h.remote_commit_lsn = $5::pg_lsn
                   AND h.conflict_type = $7 AND h.conflict_resolution = 'error')"
    )
}
