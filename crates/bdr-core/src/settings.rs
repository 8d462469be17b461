//! The contract for every `bdr.*` setting: name, type, default, range, unit,
//! context and whether bdr honours it yet.
//!
//! The extension registers exactly this table with PostgreSQL (`src/guc.rs`),
//! and `docs/settings.md` is rendered from it, so the three cannot drift apart.

/// When a setting may be changed, as PostgreSQL's `GucContext`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// Only at server start.
    Postmaster,
    /// postgresql.conf and reload.
    Sighup,
    /// Superusers (and the config file) only.
    Suset,
    /// Any user, any time.
    Userset,
}

impl Context {
    pub fn pg_name(self) -> &'static str {
        match self {
            Context::Postmaster => "postmaster",
            Context::Sighup => "sighup",
            Context::Suset => "superuser",
            Context::Userset => "user",
        }
    }
}

/// Unit of an integer or real setting, as PostgreSQL shows it in `pg_settings.unit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    None,
    Ms,
    S,
    Kb,
}

impl Unit {
    pub fn pg_name(self) -> Option<&'static str> {
        match self {
            Unit::None => None,
            Unit::Ms => Some("ms"),
            Unit::S => Some("s"),
            Unit::Kb => Some("kB"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Bool {
        default: bool,
    },
    Int {
        default: i32,
        min: i32,
        max: i32,
        unit: Unit,
    },
    Real {
        default: f64,
        min: f64,
        max: f64,
    },
    /// `values` are shown; `aliases` are accepted on input and map to a value.
    Enum {
        default: &'static str,
        values: &'static [&'static str],
        aliases: &'static [(&'static str, &'static str)],
    },
    Str {
        default: &'static str,
    },
}

/// How far bdr honours a setting today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Registered, validated and acted on.
    Honoured,
    /// Registered and validated; the feature behind it does not work yet.
    /// Setting a non-default value logs a WARNING that names the setting.
    NotYet,
    /// The default value is honoured; other values are not implemented yet
    /// and warn like `NotYet`.
    DefaultOnly,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Honoured => "honoured",
            Status::NotYet => "not yet implemented",
            Status::DefaultOnly => "only the default value is implemented",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    pub name: &'static str,
    pub kind: Kind,
    pub context: Context,
    pub status: Status,
    pub description: &'static str,
}

const fn b(
    name: &'static str,
    default: bool,
    context: Context,
    status: Status,
    description: &'static str,
) -> Setting {
    Setting {
        name,
        kind: Kind::Bool { default },
        context,
        status,
        description,
    }
}

#[allow(clippy::too_many_arguments)]
const fn i(
    name: &'static str,
    default: i32,
    min: i32,
    max: i32,
    unit: Unit,
    context: Context,
    status: Status,
    description: &'static str,
) -> Setting {
    Setting {
        name,
        kind: Kind::Int {
            default,
            min,
            max,
            unit,
        },
        context,
        status,
        description,
    }
}

const fn r(
    name: &'static str,
    default: f64,
    min: f64,
    max: f64,
    context: Context,
    status: Status,
    description: &'static str,
) -> Setting {
    Setting {
        name,
        kind: Kind::Real { default, min, max },
        context,
        status,
        description,
    }
}

const fn e(
    name: &'static str,
    default: &'static str,
    values: &'static [&'static str],
    aliases: &'static [(&'static str, &'static str)],
    context: Context,
    status: Status,
    description: &'static str,
) -> Setting {
    Setting {
        name,
        kind: Kind::Enum {
            default,
            values,
            aliases,
        },
        context,
        status,
        description,
    }
}

const fn s(
    name: &'static str,
    default: &'static str,
    context: Context,
    status: Status,
    description: &'static str,
) -> Setting {
    Setting {
        name,
        kind: Kind::Str { default },
        context,
        status,
        description,
    }
}

use Context::*;
use Status::*;
use Unit::{Kb, Ms};

const MAX_INT: i32 = i32::MAX;
/// Log levels of `bdr.debug_level` and `bdr.trace_level`, lowest first.
pub const LOG_LEVELS: &[&str] = &[
    "debug5", "debug4", "debug3", "debug2", "debug1", "log", "notice", "warning",
];

/// The version number `bdr.bdr_version_num()` returns and `bdr.backwards_compatibility` defaults to.
pub const VERSION_NUM: i32 = crate::version::VERSION_NUM;

/// Every `bdr.*` setting, in the order of the BDR 4 configuration reference.
pub const SETTINGS: &[Setting] = &[
    // Conflict handling
    e("bdr.default_conflict_detection", "row_origin",
        &["row_origin", "row_version", "column_commit_timestamp", "column_modify_timestamp"], &[],
        Suset, DefaultOnly, "Conflict detection method for tables that do not set their own."),
    // Global sequences
    e("bdr.default_sequence_kind", "distributed",
        &["distributed", "local", "timeshard", "galloc", "snowflakeid"], &[],
        Userset, Honoured, "Kind of sequence created for serial and identity columns."),
    // DDL handling
    e("bdr.default_replica_identity", "default", &["default", "full", "nothing"], &[],
        Userset, Honoured, "REPLICA IDENTITY given to newly created tables."),
    b("bdr.ddl_replication", true, Suset, Honoured, "Replicate DDL to the other nodes of the group."),
    b("bdr.role_replication", true, Suset, Honoured, "Replicate role commands to the other nodes (needs bdr.ddl_replication)."),
    e("bdr.ddl_locking", "on", &["off", "on", "dml"],
        &[("all", "on"), ("true", "on"), ("yes", "on"), ("1", "on"), ("false", "off"), ("no", "off"), ("0", "off")],
        Suset, Honoured, "Global locking mode for DDL: off, on (all DDL) or dml (only DDL that must block writes)."),
    b("bdr.truncate_locking", false, Userset, Honoured, "Make TRUNCATE obey bdr.ddl_locking."),
    // Global locking
    i("bdr.global_lock_max_locks", 1000, 100, 10_000, Unit::None, Postmaster, Honoured,
        "Maximum number of global locks that can be held on a node."),
    i("bdr.global_lock_timeout", 600_000, 0, MAX_INT, Ms, Userset, Honoured,
        "Maximum wait for a global lock; 0 disables the timeout."),
    i("bdr.global_lock_statement_timeout", 3_600_000, 0, MAX_INT, Ms, Userset, Honoured,
        "Maximum duration of a statement that holds a global lock; 0 disables the timeout."),
    i("bdr.global_lock_idle_timeout", 600_000, 0, MAX_INT, Ms, Userset, Honoured,
        "Maximum idle time in a transaction that holds a global lock; 0 disables the timeout."),
    e("bdr.predictive_checks", "warning", &["debug", "log", "warning", "error"], &[],
        Userset, Honoured, "Log level of the early checks made before taking a global lock."),
    // Node management
    i("bdr.replay_progress_frequency", 60_000, 100, MAX_INT, Ms, Sighup, NotYet,
        "Interval between broadcasts of this node's replay position to the group."),
    s("bdr.standby_slot_names", "", Sighup, NotYet,
        "Slots that must confirm changes before they are sent to other BDR nodes."),
    i("bdr.standby_slots_min_confirmed", -1, -1, 1000, Unit::None, Sighup, NotYet,
        "How many of bdr.standby_slot_names must confirm first; -1 means all of them."),
    // Generic replication
    i("bdr.writers_per_subscription", 1, 1, 64, Unit::None, Sighup, NotYet,
        "Default number of writer processes per subscription."),
    i("bdr.max_writers_per_subscription", 8, 1, 64, Unit::None, Sighup, NotYet,
        "Upper limit for the number of writers of one subscription."),
    b("bdr.xact_replication", true, Suset, Honoured,
        "Replicate the current transaction; may only be turned off with SET LOCAL unless bdr.permit_unsafe_commands is on."),
    b("bdr.permit_unsafe_commands", false, Suset, Honoured, "Override the safety checks on commands deemed unsafe."),
    i("bdr.batch_inserts", 1, 1, 1_000_000, Unit::None, Userset, NotYet,
        "Number of consecutive inserts to one table in one transaction after which they are applied as a batch."),
    i("bdr.maximum_clock_skew", -1, -1, MAX_INT, Ms, Userset, Honoured,
        "Largest difference allowed between a remote commit timestamp and the local clock; -1 disables the check."),
    e("bdr.maximum_clock_skew_action", "warn", &["warn", "wait"], &[],
        Userset, Honoured, "What to do when bdr.maximum_clock_skew is exceeded."),
    b("bdr.accept_connections", true, Suset, NotYet, "Accept replication connections from other BDR nodes."),
    i("bdr.writer_input_queue_size", 1024, 32, 1_048_576, Kb, Sighup, Honoured,
        "Size of the shared memory queue from a receiver to its writer."),
    i("bdr.writer_output_queue_size", 32, 1, 1024, Kb, Sighup, Honoured,
        "Size of the shared memory queue from a writer back to its receiver."),
    i("bdr.min_worker_backoff_delay", 1000, 0, MAX_INT, Ms, Sighup, Honoured,
        "Shortest delay before a failed BDR worker is launched again."),
    i("bdr.max_worker_backoff_delay", 60_000, 0, MAX_INT, Ms, Sighup, Honoured,
        "Longest delay before a repeatedly failing BDR worker is launched again."),
    // CRDTs
    b("bdr.crdt_raw_value", false, Userset, NotYet, "Show the full internal state of CRDT values."),
    // Eager replication
    e("bdr.commit_scope", "local", &["local", "global"], &[], Userset, NotYet,
        "Commit scope of transactions: local, or global for eager all-node replication."),
    i("bdr.global_commit_timeout", 60_000, 0, MAX_INT, Ms, Userset, NotYet,
        "Timeout for both stages of a global commit and for the CAMO partner's confirmation."),
    // CAMO
    e("bdr.enable_camo", "off", &["off", "remote_write", "remote_commit_async", "remote_commit_flush"],
        &[("on", "remote_commit_flush"), ("true", "remote_commit_flush"), ("1", "remote_commit_flush"),
          ("false", "off"), ("0", "off")],
        Userset, NotYet, "Commit At Most Once protection of transactions."),
    s("bdr.standby_dsn", "", Postmaster, NotYet, "Connection string of the CAMO partner, overriding the catalog."),
    i("bdr.camo_local_mode_delay", 5, 0, MAX_INT, Ms, Userset, NotYet,
        "Commit delay applied in CAMO local mode."),
    b("bdr.camo_enable_client_warnings", true, Userset, NotYet,
        "Warn when an action cannot be given CAMO guarantees."),
    // Transaction streaming
    e("bdr.default_streaming_mode", "auto", &["off", "writer", "file", "auto"], &[],
        Userset, NotYet, "Whether subscriptions ask for transaction streaming, and how."),
    // Lag control
    r("bdr.lag_control_max_commit_delay", 0.0, 0.0, f64::MAX, Userset, NotYet,
        "Largest commit delay (ms, fractional) lag control may impose; 0 disables lag control."),
    i("bdr.lag_control_max_lag_size", 0, 0, MAX_INT, Kb, Userset, NotYet,
        "Largest acceptable replication lag in size."),
    i("bdr.lag_control_max_lag_time", 0, 0, MAX_INT, Ms, Userset, NotYet,
        "Largest acceptable replication lag in time."),
    i("bdr.lag_control_min_conforming_nodes", 1, 1, 1000, Unit::None, Userset, NotYet,
        "Number of nodes that must stay within the acceptable lag."),
    r("bdr.lag_control_commit_delay_adjust", 0.01, 0.0, 1.0, Userset, NotYet,
        "Step of commit delay adjustment, as a fraction of the maximum commit delay."),
    i("bdr.lag_control_sample_interval", 10, 1, MAX_INT, Ms, Userset, NotYet,
        "Minimum time between lag samples and commit delay adjustments."),
    r("bdr.lag_control_commit_delay_start", 1.0, 0.0, 1.0, Userset, NotYet,
        "Lag, as a fraction of the acceptable lag, at which commit delay starts."),
    // Timestamp-based snapshots
    i("bdr.timestamp_snapshot_keep", 0, 0, MAX_INT, Ms, Userset, NotYet,
        "How long past snapshots are kept for timestamp-based snapshots."),
    // Monitoring and logging
    e("bdr.debug_level", "debug2", LOG_LEVELS, &[], Suset, Honoured,
        "Log level at which BDR writes its debug messages."),
    e("bdr.trace_level", "debug2", LOG_LEVELS, &[], Postmaster, Honoured,
        "Log level at which BDR writes its trace messages."),
    b("bdr.track_subscription_apply", true, Userset, Honoured, "Track apply statistics per subscription."),
    b("bdr.track_relation_apply", false, Userset, NotYet, "Track apply statistics per relation."),
    b("bdr.track_apply_lock_timing", false, Userset, NotYet, "Track lock timing in the relation apply statistics."),
    // Raft
    i("bdr.raft_keep_min_entries", 100, 0, MAX_INT, Unit::None, Postmaster, Honoured,
        "Minimum number of entries kept in the Raft log at compaction; 0 disables compaction."),
    i("bdr.raft_response_timeout", 30_000, 0, MAX_INT, Ms, Sighup, Honoured,
        "Time after which a Raft request times out."),
    i("bdr.raft_log_min_apply_duration", 3000, 0, MAX_INT, Ms, Sighup, Honoured,
        "Raft log appends slower than this are logged."),
    i("bdr.raft_log_min_message_duration", 5000, 0, MAX_INT, Ms, Sighup, Honoured,
        "Consensus requests slower than this round trip are logged."),
    i("bdr.raft_group_max_connections", 100, 1, 10_000, Unit::None, Postmaster, Honoured,
        "Maximum number of consensus connections across all BDR groups of the instance."),
    i("bdr.raft_election_timeout", 6000, 1, MAX_INT, Ms, Sighup, Honoured,
        "Raft election timeout."),
    i("bdr.backwards_compatibility", VERSION_NUM, 30_000, VERSION_NUM, Unit::None, Suset, NotYet,
        "Behave as the given earlier BDR version (same format as bdr.bdr_version_num())."),
    b("bdr.track_replication_estimates", true, Userset, NotYet,
        "Track apply rates and catch-up estimates for peer nodes."),
    r("bdr.lag_tracker_apply_rate_weight", 0.1, 0.0, 1.0, Userset, NotYet,
        "Weight of the newest sample in the moving average of apply rates."),
    // Decoding worker
    b("bdr.enable_wal_decoder", false, Sighup, NotYet,
        "Decode WAL once per group in a decoding worker instead of in every walsender."),
    b("bdr.receive_lcr", false, Sighup, NotYet, "Ask peers to send changes from their decoding worker's LCR files."),
    i("bdr.lcr_cleanup_interval", 180_000, 0, MAX_INT, Ms, Sighup, NotYet,
        "Interval between cleanups of LCR files; 0 disables the cleanup."),
    i("bdr.max_lcr_segment_file_size", 1_048_576, 1024, MAX_INT, Kb, Sighup, NotYet,
        "Maximum size of one LCR segment file."),
];

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Position of a setting in [`SETTINGS`]. Meant for constants: a name that is
/// not in the table then fails the build instead of a lookup at run time.
pub const fn index_of(name: &str) -> usize {
    let mut i = 0;
    while i < SETTINGS.len() {
        if str_eq(SETTINGS[i].name, name) {
            return i;
        }
        i += 1;
    }
    panic!("not a bdr setting")
}

/// Like [`index_of`], for an enum setting (a build error otherwise).
pub const fn enum_index_of(name: &str) -> usize {
    let i = index_of(name);
    match SETTINGS[i].kind {
        Kind::Enum { .. } => i,
        _ => panic!("not an enum setting"),
    }
}

impl Setting {
    /// The default as PostgreSQL shows it in `pg_settings.boot_val`.
    pub fn default_text(&self) -> String {
        match self.kind {
            Kind::Bool { default } => if default { "on" } else { "off" }.to_string(),
            Kind::Int { default, .. } => default.to_string(),
            Kind::Real { default, .. } => format_real(default),
            Kind::Enum { default, .. } => default.to_string(),
            Kind::Str { default } => default.to_string(),
        }
    }

    /// The default as a person writes it, with its unit.
    pub fn default_human(&self) -> String {
        match self.kind {
            Kind::Int { default, unit, .. } => human_int(default, unit),
            Kind::Str { default: "" } => "''".into(),
            _ => self.default_text(),
        }
    }

    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::Bool { .. } => "bool",
            Kind::Int { .. } => "integer",
            Kind::Real { .. } => "real",
            Kind::Enum { .. } => "enum",
            Kind::Str { .. } => "string",
        }
    }

    /// Ordinal of an enum value or alias, as PostgreSQL stores it.
    pub fn enum_ordinal(&self, value: &str) -> Option<i32> {
        match self.kind {
            Kind::Enum {
                values, aliases, ..
            } => {
                let target = aliases
                    .iter()
                    .find(|(a, _)| a.eq_ignore_ascii_case(value))
                    .map(|(_, t)| *t)
                    .unwrap_or(value);
                values
                    .iter()
                    .position(|v| v.eq_ignore_ascii_case(target))
                    .map(|p| p as i32)
            }
            _ => None,
        }
    }
}

/// What PostgreSQL needs to register an enum setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnumSpec {
    /// (name, ordinal, hidden): the values in order, then the aliases, hidden.
    pub entries: Vec<(&'static str, i32, bool)>,
    /// Ordinal of the default value.
    pub default: i32,
}

pub fn enum_spec(
    default: &str,
    values: &'static [&'static str],
    aliases: &'static [(&'static str, &'static str)],
) -> EnumSpec {
    // Defaults and alias targets are always among the values (test
    // defaults_lie_in_range), so the fallbacks to 0 are never taken.
    let ordinal = |v: &str| values.iter().position(|x| *x == v).unwrap_or(0) as i32;
    let mut entries: Vec<_> = values
        .iter()
        .enumerate()
        .map(|(i, v)| (*v, i as i32, false))
        .collect();
    entries.extend(
        aliases
            .iter()
            .map(|(a, target)| (*a, ordinal(target), true)),
    );
    EnumSpec {
        entries,
        default: ordinal(default),
    }
}

fn format_real(v: f64) -> String {
    if v == f64::MAX {
        "1.79769e+308".into()
    } else {
        format!("{v}")
    }
}

fn human_int(v: i32, unit: Unit) -> String {
    match unit {
        Unit::Ms if v > 0 && v % 60_000 == 0 => format!("{}min", v / 60_000),
        Unit::Ms if v > 0 && v % 1000 == 0 => format!("{}s", v / 1000),
        Unit::Ms => format!("{v}ms"),
        Unit::S => format!("{v}s"),
        Unit::Kb if v > 0 && v % 1_048_576 == 0 => format!("{}GB", v / 1_048_576),
        Unit::Kb if v > 0 && v % 1024 == 0 => format!("{}MB", v / 1024),
        Unit::Kb => format!("{v}kB"),
        Unit::None => v.to_string(),
    }
}

/// The table of `docs/settings.md`, between its markers.
pub fn render_doc_table() -> String {
    let mut out = String::from(
        "| setting | type | default | allowed | context | status | meaning |\n|---|---|---|---|---|---|---|\n",
    );
    for s in SETTINGS {
        let allowed = match s.kind {
            Kind::Bool { .. } => "on, off".to_string(),
            Kind::Int { min, max, unit, .. } => {
                let max = if max == MAX_INT {
                    "∞".to_string()
                } else {
                    human_int(max, unit)
                };
                format!("{} .. {}", human_int(min, unit), max)
            }
            Kind::Real { min, max, .. } => {
                let max = if max == f64::MAX {
                    "∞".to_string()
                } else {
                    format!("{max}")
                };
                format!("{min} .. {max}")
            }
            Kind::Enum { values, .. } => values.join(", "),
            Kind::Str { .. } => "text".to_string(),
        };
        let context = match s.context {
            Context::Postmaster => "server start",
            Context::Sighup => "reload",
            Context::Suset => "superuser",
            Context::Userset => "any user",
        };
        out.push_str(&format!(
            "| `{}` | {} | `{}` | {} | {} | {} | {} |\n",
            s.name,
            s.type_name(),
            s.default_human(),
            allowed,
            context,
            s.status.label(),
            s.description
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn names_are_unique_and_prefixed() {
        let mut seen = HashSet::new();
        for s in SETTINGS {
            assert!(s.name.starts_with("bdr."), "{}", s.name);
            assert!(s.name.len() < 64, "{}", s.name);
            assert!(seen.insert(s.name), "duplicate {}", s.name);
        }
    }

    #[test]
    fn defaults_lie_in_range() {
        for s in SETTINGS {
            match s.kind {
                Kind::Int {
                    default, min, max, ..
                } => assert!(min <= default && default <= max, "{}", s.name),
                Kind::Real { default, min, max } => {
                    assert!(min <= default && default <= max, "{}", s.name)
                }
                Kind::Enum {
                    default,
                    values,
                    aliases,
                } => {
                    assert!(values.contains(&default), "{}", s.name);
                    for (_, target) in aliases {
                        assert!(values.contains(target), "{} alias -> {}", s.name, target);
                    }
                }
                _ => {}
            }
        }
    }

    #[test]
    fn seed_defaults() {
        // The defaults the BDR 4 configuration reference states.
        let expect = [
            ("bdr.default_sequence_kind", "distributed"),
            ("bdr.ddl_replication", "on"),
            ("bdr.role_replication", "on"),
            ("bdr.truncate_locking", "off"),
            ("bdr.global_lock_max_locks", "1000"),
            ("bdr.global_lock_timeout", "600000"),
            ("bdr.global_lock_statement_timeout", "3600000"),
            ("bdr.global_lock_idle_timeout", "600000"),
            ("bdr.predictive_checks", "warning"),
            ("bdr.replay_progress_frequency", "60000"),
            ("bdr.xact_replication", "on"),
            ("bdr.maximum_clock_skew", "-1"),
            ("bdr.accept_connections", "on"),
            ("bdr.writer_input_queue_size", "1024"),
            ("bdr.writer_output_queue_size", "32"),
            ("bdr.min_worker_backoff_delay", "1000"),
            ("bdr.max_worker_backoff_delay", "60000"),
            ("bdr.crdt_raw_value", "off"),
            ("bdr.commit_scope", "local"),
            ("bdr.global_commit_timeout", "60000"),
            ("bdr.enable_camo", "off"),
            ("bdr.camo_local_mode_delay", "5"),
            ("bdr.camo_enable_client_warnings", "on"),
            ("bdr.default_streaming_mode", "auto"),
            ("bdr.timestamp_snapshot_keep", "0"),
            ("bdr.debug_level", "debug2"),
            ("bdr.raft_keep_min_entries", "100"),
            ("bdr.raft_response_timeout", "30000"),
            ("bdr.raft_log_min_apply_duration", "3000"),
            ("bdr.raft_log_min_message_duration", "5000"),
            ("bdr.raft_group_max_connections", "100"),
            ("bdr.track_replication_estimates", "on"),
            ("bdr.lag_tracker_apply_rate_weight", "0.1"),
            ("bdr.default_conflict_detection", "row_origin"),
            ("bdr.enable_wal_decoder", "off"),
        ];
        for (name, default) in expect {
            let s = &SETTINGS[index_of(name)];
            assert_eq!(s.default_text(), default, "{name}");
        }
    }

    #[test]
    fn enum_spec_lists_values_then_hidden_aliases() {
        let Kind::Enum {
            default,
            values,
            aliases,
        } = SETTINGS[enum_index_of("bdr.ddl_locking")].kind
        else {
            unreachable!()
        };
        let spec = enum_spec(default, values, aliases);
        assert_eq!(spec.default, 1);
        assert_eq!(
            &spec.entries[..3],
            &[("off", 0, false), ("on", 1, false), ("dml", 2, false)]
        );
        assert!(spec.entries.contains(&("all", 1, true)));
        assert!(spec.entries[3..].iter().all(|e| e.2));
    }

    #[test]
    fn texts_hold_no_nul() {
        // guc.rs hands these to PostgreSQL as C strings.
        for s in SETTINGS {
            assert!(
                !s.name.contains('\0') && !s.description.contains('\0'),
                "{}",
                s.name
            );
            if let Kind::Enum {
                values, aliases, ..
            } = s.kind
            {
                assert!(values
                    .iter()
                    .chain(aliases.iter().map(|(a, _)| a))
                    .all(|v| !v.contains('\0')));
            }
            if let Kind::Str { default } = s.kind {
                assert!(!default.contains('\0'));
            }
        }
    }

    #[test]
    fn enum_aliases_resolve() {
        let camo = &SETTINGS[enum_index_of("bdr.enable_camo")];
        assert_eq!(camo.enum_ordinal("on"), Some(3));
        assert_eq!(camo.enum_ordinal("REMOTE_WRITE"), Some(1));
        assert_eq!(camo.enum_ordinal("0"), Some(0));
        assert_eq!(camo.enum_ordinal("bogus"), None);
    }

    /// `docs/settings.md` holds the rendered table; regenerate with
    /// `BDR_BLESS=1 cargo test -p bdr-core settings_doc`.
    #[test]
    fn settings_doc_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/settings.md");
        let doc = std::fs::read_to_string(path).expect("docs/settings.md");
        let (start, end) = (
            "<!-- settings-table:start -->\n",
            "<!-- settings-table:end -->",
        );
        let a = doc.find(start).expect("start marker") + start.len();
        let z = doc.find(end).expect("end marker");
        let table = render_doc_table();
        if std::env::var_os("BDR_BLESS").is_some() {
            let new = format!("{}{}{}", &doc[..a], table, &doc[z..]);
            std::fs::write(path, new).unwrap();
            return;
        }
        assert_eq!(
            &doc[a..z],
            table,
            "docs/settings.md is stale: run BDR_BLESS=1 cargo test -p bdr-core settings_doc"
        );
    }
}
