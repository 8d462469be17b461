//! Forgetting what no longer matters: old tombstones and copied-row
//! writers, old conflict history and dropped-table notes. Each purge looks
//! first, so that a polling manager writes (and uses a transaction id) only
//! when there is something to delete.

use super::*;

/// How long deleted keys (and the writers of copied rows) are kept, at the
/// least.
pub const TOMBSTONE_RETENTION: &str = "1 hour";

fn purge(table: &str, condition: &str) -> BdrResult<()> {
    let any = select_first(
        &format!("SELECT EXISTS (SELECT 1 FROM {table} WHERE {condition})"),
        &[],
        |row| Ok(row.get::<bool>(1)?.unwrap_or(false)),
    )?;
    if any == Some(true) {
        Spi::run(&format!("DELETE FROM {table} WHERE {condition}"))?;
    }
    Ok(())
}

/// Deleted keys older than the retention, and what a join copied (settled
/// by the same time).
pub fn purge_tombstones() -> BdrResult<()> {
    let old = format!("now() - interval '{TOMBSTONE_RETENTION}'");
    purge(
        "bdr.tombstone",
        &format!("COALESCE(pg_catalog.pg_xact_commit_timestamp(xmin), '-infinity') < {old}"),
    )?;
    purge("bdr.copied_row", &format!("copied_at < {old}"))
}

/// Conflicts older than 30 days (BDR 4 keeps a month of history) and
/// dropped tables older than a day (skip_if_recently_dropped).
pub fn purge_history() -> BdrResult<()> {
    purge(
        "bdr.conflict_history",
        "local_time < now() - interval '30 days'",
    )?;
    purge(
        "bdr.dropped_relation",
        "dropped_at < now() - interval '1 day'",
    )
}

/// The newest real commit time of the rows a join copied here, if any.
pub fn newest_copied_commit() -> BdrResult<Option<i64>> {
    Ok(
        select_first("SELECT max(commit_us) FROM bdr.copied_row", &[], |row| {
            Ok(row.get::<i64>(1)?)
        })?
        .flatten(),
    )
}
