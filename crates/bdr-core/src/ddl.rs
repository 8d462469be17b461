//! DDL replication's rules: which statements replicate (by their command
//! tag, as PostgreSQL names them), which stay local, which are refused,
//! and the command a node queues for its peers.

use serde::{Deserialize, Serialize};

/// The prefix of the logical messages that carry DDL.
pub const DDL_PREFIX: &str = "bdr_ddl";

/// A statement to run on every other node, as the origin ran it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DdlCommand {
    /// The statement's own text (one statement).
    pub sql: String,
    /// The origin's `search_path` when it ran.
    pub search_path: String,
    /// The role it ran as.
    pub role: String,
}

impl DdlCommand {
    pub fn encode(&self) -> Vec<u8> {
        bincode::serialize(self).unwrap_or_default()
    }

    pub fn decode(b: &[u8]) -> Option<DdlCommand> {
        bincode::deserialize(b).ok()
    }
}

/// What happens with a utility statement run in a BDR group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Queued for every other node.
    Replicate,
    /// Run here only: maintenance, session and transaction commands, and
    /// what is global to the instance.
    Local,
    /// Refused: replicating it would make the nodes diverge.
    Refuse {
        reason: &'static str,
        hint: &'static str,
    },
}

/// Statements BDR 4 keeps local, and those that are not DDL at all.
const LOCAL: &[&str] = &[
    "VACUUM",
    "ANALYZE",
    "CLUSTER",
    "REINDEX",
    "CHECKPOINT",
    "ALTER SYSTEM",
    "CREATE DATABASE",
    "ALTER DATABASE",
    "DROP DATABASE",
    "CREATE TABLESPACE",
    "ALTER TABLESPACE",
    "DROP TABLESPACE",
    "REFRESH MATERIALIZED VIEW",
    "LOCK TABLE",
    "LISTEN",
    "NOTIFY",
    "UNLISTEN",
    "LOAD",
    "DO",
    "CALL",
    "COPY",
    "EXPLAIN",
    "SET",
    "RESET",
    "SHOW",
    "DISCARD ALL",
    "DISCARD PLANS",
    "DISCARD SEQUENCES",
    "DISCARD TEMP",
    "PREPARE",
    "EXECUTE",
    "DEALLOCATE",
    "DEALLOCATE ALL",
    "DECLARE CURSOR",
    "CLOSE CURSOR",
    "CLOSE CURSOR ALL",
    "FETCH",
    "MOVE",
    "BEGIN",
    "START TRANSACTION",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT",
    "RELEASE",
    "PREPARE TRANSACTION",
    "COMMIT PREPARED",
    "ROLLBACK PREPARED",
    "TRUNCATE TABLE",
    "CREATE SUBSCRIPTION",
    "ALTER SUBSCRIPTION",
    "DROP SUBSCRIPTION",
    "CREATE PUBLICATION",
    "ALTER PUBLICATION",
    "DROP PUBLICATION",
];

/// Role commands: they replicate only with `bdr.role_replication`.
const ROLE: &[&str] = &[
    "CREATE ROLE",
    "ALTER ROLE",
    "DROP ROLE",
    "GRANT ROLE",
    "REVOKE ROLE",
];

/// What to do with a statement of command tag `tag` (PostgreSQL's, e.g.
/// "CREATE TABLE"). TRUNCATE replicates as a change, not as DDL.
pub fn classify(tag: &str, role_replication: bool) -> Kind {
    if LOCAL.contains(&tag) {
        return Kind::Local;
    }
    if ROLE.contains(&tag) {
        return if role_replication {
            Kind::Replicate
        } else {
            Kind::Local
        };
    }
    if tag == "CREATE TABLE AS" || tag == "SELECT INTO" {
        return Kind::Refuse {
            reason: "CREATE TABLE AS and SELECT INTO are not replicated",
            hint: "Create the table with CREATE TABLE, then fill it with INSERT ... SELECT: both replicate.",
        };
    }
    let ddl = [
        "CREATE ",
        "ALTER ",
        "DROP ",
        "COMMENT",
        "GRANT",
        "REVOKE",
        "SECURITY LABEL",
        "IMPORT FOREIGN SCHEMA",
        "REASSIGN OWNED",
        "DROP OWNED",
    ];
    if ddl.iter().any(|p| tag.starts_with(p)) {
        Kind::Replicate
    } else {
        Kind::Local
    }
}

/// A refusal for an exclusion constraint on a replicated table: rows that
/// each node accepts alone may together violate it, and no conflict
/// resolution can pick a winner.
pub const EXCLUSION_REFUSAL: Kind = Kind::Refuse {
    reason: "exclusion constraints on replicated tables are not supported",
    hint: "Use a unique constraint, or set bdr.permit_unsafe_commands if every row is written on one node only.",
};

/// A refusal for DDL that mixes temporary and replicated objects.
pub const TEMP_MIX_REFUSAL: Kind = Kind::Refuse {
    reason: "a statement on both temporary and replicated objects cannot be replicated",
    hint: "Run it as two statements: one on the temporary objects, one on the others.",
};

/// The statement a peer runs: `SET LOCAL`s for the search path, then the
/// statement.
pub fn search_path_sql(search_path: &str) -> String {
    format!(
        "SELECT pg_catalog.set_config('search_path', {}, true)",
        crate::quote::literal(search_path)
    )
}

/// Whether a statement creates, changes or drops a role (roles are the
/// instance's, not the database's).
pub fn is_role_command(sql: &str) -> bool {
    let words: Vec<String> = sql
        .split_whitespace()
        .take(2)
        .map(|w| w.to_ascii_uppercase())
        .collect();
    matches!(
        (
            words.first().map(String::as_str),
            words.get(1).map(String::as_str)
        ),
        (
            Some("CREATE" | "ALTER" | "DROP"),
            Some("ROLE" | "USER" | "GROUP")
        )
    )
}

/// Whether a role command's failure (its SQLSTATE's name, as pgrx spells
/// it) only says the role already is as the command wants it: created
/// (duplicate_object) or dropped (undefined_object) by another database
/// of the same instance.
pub fn role_state_matches(code: &str) -> bool {
    code == "ERRCODE_DUPLICATE_OBJECT" || code == "ERRCODE_UNDEFINED_OBJECT"
}

/// A peer runs `CREATE INDEX CONCURRENTLY` and `DROP INDEX CONCURRENTLY`
/// in its apply transaction, where CONCURRENTLY cannot run: the statement
/// without the word (it takes its lock there for the time of the build).
pub fn without_concurrently(sql: &str) -> String {
    let lower = sql.to_ascii_lowercase();
    let head = lower.trim_start();
    if !(head.starts_with("create") || head.starts_with("drop") || head.starts_with("alter")) {
        return sql.to_string();
    }
    let bytes = lower.as_bytes();
    let word = "concurrently";
    let mut from = 0;
    while let Some(i) = lower[from..].find(word).map(|i| i + from) {
        let before = i == 0
            || !(bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b'"');
        let end = i + word.len();
        let after = end == bytes.len()
            || !(bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_' || bytes[end] == b'"');
        // Only the keyword between INDEX and the index name, or after
        // DETACH PARTITION's partition.
        if before
            && after
            && (lower[..i].trim_end().ends_with("index") || lower[..i].contains("detach partition"))
        {
            return format!("{}{}", &sql[..i], sql[end..].trim_start());
        }
        from = end;
    }
    sql.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families() {
        for t in [
            "CREATE TABLE",
            "ALTER TABLE",
            "DROP TABLE",
            "CREATE INDEX",
            "DROP INDEX",
            "CREATE VIEW",
            "CREATE MATERIALIZED VIEW",
            "CREATE SEQUENCE",
            "ALTER SEQUENCE",
            "CREATE FUNCTION",
            "CREATE PROCEDURE",
            "CREATE TYPE",
            "CREATE DOMAIN",
            "CREATE TRIGGER",
            "CREATE RULE",
            "CREATE POLICY",
            "COMMENT",
            "GRANT",
            "REVOKE",
            "CREATE EXTENSION",
            "SECURITY LABEL",
            "CREATE SCHEMA",
            "ALTER DEFAULT PRIVILEGES",
        ] {
            assert_eq!(classify(t, false), Kind::Replicate, "{t}");
        }
        // Maintenance, instance-wide objects, session commands, and what
        // replicates as a change.
        for t in [
            "SELECT",
            "DO",
            "SET",
            "TRUNCATE TABLE",
            "LOCK TABLE",
            "REFRESH MATERIALIZED VIEW",
            "DROP TABLESPACE",
            "CREATE DATABASE",
            "ALTER SYSTEM",
            "CHECKPOINT",
            "REINDEX",
            "CLUSTER",
            "ANALYZE",
            "VACUUM",
        ] {
            assert_eq!(classify(t, false), Kind::Local, "{t}");
        }
        assert_eq!(classify("CREATE ROLE", false), Kind::Local);
        assert_eq!(classify("CREATE ROLE", true), Kind::Replicate);
        assert_eq!(classify("GRANT ROLE", true), Kind::Replicate);
        assert!(matches!(
            classify("CREATE TABLE AS", true),
            Kind::Refuse { .. }
        ));
        assert!(matches!(
            classify("SELECT INTO", false),
            Kind::Refuse { .. }
        ));
    }

    #[test]
    fn concurrently_is_left_out_on_replay() {
        assert_eq!(
            without_concurrently("CREATE INDEX CONCURRENTLY i ON t (a)"),
            "CREATE INDEX i ON t (a)"
        );
        assert_eq!(
            without_concurrently("create unique index concurrently if not exists i on t (a)"),
            "create unique index if not exists i on t (a)"
        );
        assert_eq!(
            without_concurrently("DROP INDEX CONCURRENTLY i"),
            "DROP INDEX i"
        );
        assert_eq!(
            without_concurrently("ALTER TABLE p DETACH PARTITION p1 CONCURRENTLY"),
            "ALTER TABLE p DETACH PARTITION p1 "
        );
        assert_eq!(
            without_concurrently("ALTER TABLE concurrently ADD COLUMN a int"),
            "ALTER TABLE concurrently ADD COLUMN a int"
        );
        assert_eq!(
            without_concurrently("CREATE INDEX concurrently_i ON t (a)"),
            "CREATE INDEX concurrently_i ON t (a)"
        );
        assert_eq!(
            without_concurrently("CREATE TABLE concurrently (a int)"),
            "CREATE TABLE concurrently (a int)"
        );
    }

    #[test]
    fn role_commands() {
        assert!(is_role_command("CREATE ROLE app LOGIN"));
        assert!(is_role_command("drop user x"));
        assert!(!is_role_command("CREATE TABLE role (a int)"));
        assert!(!is_role_command("GRANT SELECT ON t TO app"));
        assert!(role_state_matches("ERRCODE_DUPLICATE_OBJECT"));
        assert!(!role_state_matches("ERRCODE_SYNTAX_ERROR"));
    }

    #[test]
    fn commands_round_trip() {
        let c = DdlCommand {
            sql: "CREATE TABLE t (id int)".into(),
            search_path: "\"$user\", public".into(),
            role: "app".into(),
        };
        assert_eq!(DdlCommand::decode(&c.encode()), Some(c));
        assert_eq!(DdlCommand::decode(b""), None);
        assert_eq!(
            search_path_sql("a, 'b'"),
            "SELECT pg_catalog.set_config('search_path', 'a, ''b''', true)"
        );
    }
}
