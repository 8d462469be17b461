//! Which tables replicate: the one rule the output plugin (what it sends),
//! join (what it copies), part (what it catches up) and the SQL functions
//! (`bdr._replicated_table`) all follow.

/// `pg_class.relkind` of an ordinary table (partitions included).
pub const RELKIND_TABLE: u8 = b'r';
/// `pg_class.relkind` of a partitioned table (its rows are in partitions).
pub const RELKIND_PARTITIONED: u8 = b'p';
/// `pg_class.relpersistence` of a WAL-logged table.
pub const PERSISTENT: u8 = b'p';

/// Whether a schema is PostgreSQL's or bdr's own: their tables never
/// replicate (bdr's catalogs are kept in step by the join protocol).
pub fn system_schema(schema: &str) -> bool {
    matches!(schema, "pg_catalog" | "information_schema" | "bdr") || schema.starts_with("pg_")
}

/// Whether the rows of a relation replicate: ordinary WAL-logged tables
/// (partitions included: changes are decoded per partition) outside the
/// system schemas. Views, materialized views (refreshed on each node),
/// temporary and unlogged tables do not.
pub fn replicates(relkind: u8, relpersistence: u8, schema: &str) -> bool {
    relkind == RELKIND_TABLE && relpersistence == PERSISTENT && !system_schema(schema)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        assert!(replicates(b'r', b'p', "public"));
        assert!(replicates(b'r', b'p', "app"));
        assert!(!replicates(b'p', b'p', "public"), "rows live in partitions");
        assert!(!replicates(b'm', b'p', "public"));
        assert!(!replicates(b'v', b'p', "public"));
        assert!(!replicates(b'r', b'u', "public"));
        assert!(!replicates(b'r', b't', "public"));
        for s in [
            "bdr",
            "pg_catalog",
            "information_schema",
            "pg_toast",
            "pg_temp_3",
        ] {
            assert!(!replicates(b'r', b'p', s), "{s}");
        }
        assert!(
            replicates(b'r', b'p', "pgx"),
            "only pg_ prefixes are PostgreSQL's"
        );
    }
}
