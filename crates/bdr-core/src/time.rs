//! PostgreSQL's time units: timestamps are microseconds since 2000-01-01 UTC.

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

/// The commit timestamp rows a join copied commit with: earlier than any
/// real write, so that every later change to them wins; their real writers
/// are kept in `bdr.copied_row`.
pub const COPIED_COMMIT_TS: i64 = 1;

/// `COPIED_COMMIT_TS` as an SQL timestamptz literal.
pub const COPIED_COMMIT_TS_SQL: &str = "'2000-01-01 00:00:00.000001+00'";

/// SQL turning a `timestamptz` expression into PostgreSQL microseconds.
pub fn micros_sql(ts: &str) -> String {
    format!("((EXTRACT(epoch FROM {ts}) - {PG_EPOCH_UNIX_SECONDS}) * 1000000)::int8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_sql() {
        assert_eq!(PG_EPOCH_UNIX_SECONDS, 30 * 365 * 86_400 + 7 * 86_400);
        assert_eq!(
            micros_sql("x.ts"),
            "((EXTRACT(epoch FROM x.ts) - 946684800) * 1000000)::int8"
        );
        assert_eq!(COPIED_COMMIT_TS, 1);
        assert!(COPIED_COMMIT_TS_SQL.contains(".000001+00"));
    }
}
