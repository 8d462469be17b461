//! The rule that makes concurrent writes converge: last update wins on the
//! commit timestamp, and on equal timestamps the higher node id wins. Every
//! node evaluates the same comparison on the same numbers (applied rows keep
//! their origin's commit timestamp), so every node picks the same winner.

/// Who last wrote a row: commit timestamp (microseconds since 2000-01-01, as
/// PostgreSQL counts) and the id of the node where that write was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Writer {
    pub commit_ts: i64,
    pub node_id: u32,
}

/// Whether an incoming change from `remote` replaces the local row last
/// written by `local`. `None` means the local row's writer is unknown (a row
/// older than `track_commit_timestamp`, or frozen): any remote write is newer.
pub fn remote_wins(remote: Writer, local: Option<Writer>) -> bool {
    match local {
        None => true,
        Some(l) => remote > l,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn w(ts: i64, node: u32) -> Writer {
        Writer {
            commit_ts: ts,
            node_id: node,
        }
    }

    #[test]
    fn later_timestamp_wins() {
        assert!(remote_wins(w(10, 1), Some(w(9, 2))));
        assert!(!remote_wins(w(9, 2), Some(w(10, 1))));
    }

    #[test]
    fn ties_go_to_the_higher_node_id_on_both_sides() {
        // Node 1 sees node 2's change against its own: node 2 wins.
        assert!(remote_wins(w(10, 2), Some(w(10, 1))));
        // Node 2 sees node 1's change against its own: node 2 keeps its row.
        assert!(!remote_wins(w(10, 1), Some(w(10, 2))));
    }

    #[test]
    fn the_same_write_twice_is_not_newer() {
        assert!(!remote_wins(w(10, 2), Some(w(10, 2))));
    }

    #[test]
    fn unknown_local_writer_loses() {
        assert!(remote_wins(w(i64::MIN, 0), None));
    }

    #[test]
    fn every_order_of_arrival_picks_one_winner() {
        // Three writers of one row; whatever order they arrive in, applying
        // only winners ends with the maximum.
        let writes = [w(5, 3), w(7, 1), w(7, 2)];
        let orders = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        for o in orders {
            let mut cur: Option<Writer> = None;
            for i in o {
                if remote_wins(writes[i], cur) {
                    cur = Some(writes[i]);
                }
            }
            assert_eq!(cur, Some(w(7, 2)));
        }
    }
}

/// The conflict types BDR 4 names, in its order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConflictType {
    InsertExists,
    UpdateDiffering,
    UpdateOriginChange,
    UpdateMissing,
    UpdateRecentlyDeleted,
    UpdatePkeyExists,
    MultipleUniqueConflicts,
    DeleteRecentlyUpdated,
    DeleteMissing,
    TargetColumnMissing,
    SourceColumnMissing,
    TargetTableMissing,
    ApplyErrorDdl,
}

/// The resolvers BDR 4 offers (the conflict trigger aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolver {
    Error,
    Skip,
    SkipIfRecentlyDropped,
    SkipTransaction,
    UpdateIfNewer,
    Update,
    InsertOrSkip,
    InsertOrError,
    Ignore,
    IgnoreIfNull,
    UseDefaultValue,
}

impl ConflictType {
    pub const ALL: [ConflictType; 13] = [
        ConflictType::InsertExists,
        ConflictType::UpdateDiffering,
        ConflictType::UpdateOriginChange,
        ConflictType::UpdateMissing,
        ConflictType::UpdateRecentlyDeleted,
        ConflictType::UpdatePkeyExists,
        ConflictType::MultipleUniqueConflicts,
        ConflictType::DeleteRecentlyUpdated,
        ConflictType::DeleteMissing,
        ConflictType::TargetColumnMissing,
        ConflictType::SourceColumnMissing,
        ConflictType::TargetTableMissing,
        ConflictType::ApplyErrorDdl,
    ];

    pub fn name(self) -> &'static str {
        use ConflictType::*;
        match self {
            InsertExists => "insert_exists",
            UpdateDiffering => "update_differing",
            UpdateOriginChange => "update_origin_change",
            UpdateMissing => "update_missing",
            UpdateRecentlyDeleted => "update_recently_deleted",
            UpdatePkeyExists => "update_pkey_exists",
            MultipleUniqueConflicts => "multiple_unique_conflicts",
            DeleteRecentlyUpdated => "delete_recently_updated",
            DeleteMissing => "delete_missing",
            TargetColumnMissing => "target_column_missing",
            SourceColumnMissing => "source_column_missing",
            TargetTableMissing => "target_table_missing",
            ApplyErrorDdl => "apply_error_ddl",
        }
    }

    pub fn parse(s: &str) -> Option<ConflictType> {
        ConflictType::ALL.into_iter().find(|t| t.name() == s)
    }

    /// BDR 4's default resolver for this type.
    pub fn default_resolver(self) -> Resolver {
        use ConflictType::*;
        match self {
            InsertExists | UpdateDiffering | UpdateOriginChange | UpdatePkeyExists => {
                Resolver::UpdateIfNewer
            }
            UpdateMissing => Resolver::InsertOrSkip,
            UpdateRecentlyDeleted | DeleteRecentlyUpdated | DeleteMissing => Resolver::Skip,
            MultipleUniqueConflicts | ApplyErrorDdl => Resolver::Error,
            TargetColumnMissing => Resolver::IgnoreIfNull,
            SourceColumnMissing => Resolver::UseDefaultValue,
            TargetTableMissing => Resolver::SkipIfRecentlyDropped,
        }
    }

    /// The resolvers BDR 4 allows for this type.
    pub fn allowed_resolvers(self) -> Vec<Resolver> {
        use ConflictType::*;
        let mut v = vec![Resolver::Error, Resolver::Skip];
        match self {
            InsertExists | UpdateDiffering | UpdateOriginChange | UpdatePkeyExists => {
                v.extend([Resolver::UpdateIfNewer, Resolver::Update])
            }
            DeleteRecentlyUpdated | MultipleUniqueConflicts => v.push(Resolver::Update),
            UpdateMissing | UpdateRecentlyDeleted => {
                v.extend([Resolver::InsertOrSkip, Resolver::InsertOrError])
            }
            TargetColumnMissing => v.extend([Resolver::Ignore, Resolver::IgnoreIfNull]),
            SourceColumnMissing => v.push(Resolver::UseDefaultValue),
            TargetTableMissing => v.push(Resolver::SkipIfRecentlyDropped),
            ApplyErrorDdl => v.push(Resolver::SkipTransaction),
            DeleteMissing => {}
        }
        v
    }
}

impl Resolver {
    pub const ALL: [Resolver; 11] = [
        Resolver::Error,
        Resolver::Skip,
        Resolver::SkipIfRecentlyDropped,
        Resolver::SkipTransaction,
        Resolver::UpdateIfNewer,
        Resolver::Update,
        Resolver::InsertOrSkip,
        Resolver::InsertOrError,
        Resolver::Ignore,
        Resolver::IgnoreIfNull,
        Resolver::UseDefaultValue,
    ];

    pub fn name(self) -> &'static str {
        use Resolver::*;
        match self {
            Error => "error",
            Skip => "skip",
            SkipIfRecentlyDropped => "skip_if_recently_dropped",
            SkipTransaction => "skip_transaction",
            UpdateIfNewer => "update_if_newer",
            Update => "update",
            InsertOrSkip => "insert_or_skip",
            InsertOrError => "insert_or_error",
            Ignore => "ignore",
            IgnoreIfNull => "ignore_if_null",
            UseDefaultValue => "use_default_value",
        }
    }

    pub fn parse(s: &str) -> Option<Resolver> {
        Resolver::ALL.into_iter().find(|r| r.name() == s)
    }
}

/// Checks a (type, resolver) pair as `bdr.alter_node_set_conflict_resolver`
/// must; the error lists what the type accepts.
pub fn check_resolver(
    conflict_type: &str,
    resolver: &str,
) -> Result<(ConflictType, Resolver), String> {
    let t = ConflictType::parse(conflict_type).ok_or_else(|| {
        format!(
            "\"{conflict_type}\" is not a conflict type; the types are: {}",
            ConflictType::ALL.map(|t| t.name()).join(", ")
        )
    })?;
    let allowed = t.allowed_resolvers();
    let names = || {
        allowed
            .iter()
            .map(|r| r.name())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let r = Resolver::parse(resolver).ok_or_else(|| {
        format!(
            "\"{resolver}\" is not a conflict resolver; for {} use one of: {}",
            t.name(),
            names()
        )
    })?;
    if !allowed.contains(&r) {
        return Err(format!(
            "resolver {} does not apply to conflict type {}; use one of: {}",
            r.name(),
            t.name(),
            names()
        ));
    }
    Ok((t, r))
}

#[cfg(test)]
mod model_tests {
    use super::*;

    #[test]
    fn every_type_has_a_default_it_allows_and_a_name_that_parses() {
        for t in ConflictType::ALL {
            assert!(
                t.allowed_resolvers().contains(&t.default_resolver()),
                "{t:?}"
            );
            assert_eq!(ConflictType::parse(t.name()), Some(t));
        }
        for r in Resolver::ALL {
            assert_eq!(Resolver::parse(r.name()), Some(r));
        }
    }

    #[test]
    fn bdr4_defaults() {
        assert_eq!(
            ConflictType::UpdateMissing.default_resolver(),
            Resolver::InsertOrSkip
        );
        assert_eq!(
            ConflictType::DeleteMissing.default_resolver(),
            Resolver::Skip
        );
        assert_eq!(
            ConflictType::MultipleUniqueConflicts.default_resolver(),
            Resolver::Error
        );
        assert_eq!(
            ConflictType::TargetTableMissing.default_resolver(),
            Resolver::SkipIfRecentlyDropped
        );
    }

    #[test]
    fn resolvers_are_checked_against_their_type() {
        assert!(check_resolver("insert_exists", "update").is_ok());
        let e = check_resolver("delete_missing", "update_if_newer").unwrap_err();
        assert!(e.contains("error, skip"), "{e}");
        assert!(check_resolver("nonsense", "skip")
            .unwrap_err()
            .contains("insert_exists"));
        assert!(check_resolver("update_missing", "bogus")
            .unwrap_err()
            .contains("insert_or_skip"));
    }
}

/// What the writer does with the incoming change after a conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Apply the remote change (for update_missing: insert the row; for a
    /// missing column: leave that column out).
    ApplyRemote,
    /// Keep the local data and drop the remote change.
    Skip,
    /// Stop applying: the writer rolls back and retries from the same
    /// transaction until the local data or the resolver changes.
    Error,
}

impl Outcome {
    /// The `conflict_resolution` recorded in `bdr.conflict_history`.
    pub fn resolution(self) -> &'static str {
        match self {
            Outcome::ApplyRemote => "apply_remote",
            Outcome::Skip => "skip",
            Outcome::Error => "error",
        }
    }
}

/// What the writer knows about a conflict when it resolves it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Facts {
    /// The remote change is newer than the local row's last write (commit
    /// timestamp, ties to the higher node id).
    pub remote_newer: bool,
    /// The change carries the whole new row (no unchanged TOAST values), so
    /// it can be inserted.
    pub full_row: bool,
    /// target_column_missing: the value the local table has no column for is NULL.
    pub value_is_null: bool,
    /// target_table_missing: a table of that name was dropped here within
    /// the last day (`RECENTLY_DROPPED_US`).
    pub recently_dropped: bool,
}

/// How long a dropped table counts as recently dropped for
/// `skip_if_recently_dropped` (BDR 4: one day).
pub const RECENTLY_DROPPED_US: i64 = 24 * 3600 * 1_000_000;

/// Applies `resolver` to a conflict of type `t`. A resolver that does not
/// fit the type (only possible if the catalog was edited by hand) falls back
/// to the type's default.
pub fn resolve(t: ConflictType, resolver: Resolver, f: Facts) -> Outcome {
    use Outcome::*;
    let resolver = if t.allowed_resolvers().contains(&resolver) {
        resolver
    } else {
        t.default_resolver()
    };
    match resolver {
        Resolver::Error => Error,
        Resolver::Skip | Resolver::SkipTransaction => Skip,
        Resolver::Update => ApplyRemote,
        Resolver::UpdateIfNewer => {
            if f.remote_newer {
                ApplyRemote
            } else {
                Skip
            }
        }
        Resolver::InsertOrSkip => {
            if f.full_row {
                ApplyRemote
            } else {
                Skip
            }
        }
        Resolver::InsertOrError => {
            if f.full_row {
                ApplyRemote
            } else {
                Error
            }
        }
        Resolver::Ignore | Resolver::UseDefaultValue => ApplyRemote,
        Resolver::IgnoreIfNull => {
            if f.value_is_null {
                ApplyRemote
            } else {
                Error
            }
        }
        Resolver::SkipIfRecentlyDropped => {
            if f.recently_dropped {
                Skip
            } else {
                Error
            }
        }
    }
}

/// A node's conflict settings: the resolver per type and what is logged
/// where (`bdr.alter_node_set_conflict_resolver`, `bdr.alter_node_set_log_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictConfig {
    pub resolvers: [Resolver; 13],
    pub log_to_file: bool,
    pub log_to_table: bool,
    /// Only these types are logged; `None` logs every type.
    pub log_types: Option<Vec<ConflictType>>,
    /// Only conflicts resolved these ways are logged; `None` logs all.
    pub log_resolutions: Option<Vec<String>>,
}

impl Default for ConflictConfig {
    fn default() -> Self {
        ConflictConfig {
            resolvers: ConflictType::ALL.map(|t| t.default_resolver()),
            log_to_file: true,
            log_to_table: true,
            log_types: None,
            log_resolutions: None,
        }
    }
}

impl ConflictConfig {
    pub fn resolver(&self, t: ConflictType) -> Resolver {
        self.resolvers[t as usize]
    }

    pub fn set_resolver(&mut self, t: ConflictType, r: Resolver) {
        self.resolvers[t as usize] = r;
    }

    /// Whether a conflict of type `t` resolved as `o` is logged at all.
    pub fn logs(&self, t: ConflictType, o: Outcome) -> bool {
        self.log_types.as_ref().is_none_or(|v| v.contains(&t))
            && self
                .log_resolutions
                .as_ref()
                .is_none_or(|v| v.iter().any(|r| r == o.resolution()))
    }
}

/// The resolutions `bdr.alter_node_set_log_config` accepts in its filter.
pub const RESOLUTIONS: [&str; 3] = ["apply_remote", "skip", "error"];

/// `bdr.maximum_clock_skew`: what to do with a remote commit at
/// `remote_ts` when the local clock reads `now` (both in microseconds).
/// Returns how far (microseconds) the remote commit is further in the future
/// than the skew allows, or `None` when it is within bounds or the check is
/// off (`max_skew_ms < 0`). With `WAIT`, the writer waits that long.
pub fn clock_skew_excess(remote_ts: i64, now: i64, max_skew_ms: i32) -> Option<i64> {
    if max_skew_ms < 0 {
        return None;
    }
    let allowed = now.saturating_add(max_skew_ms as i64 * 1000);
    (remote_ts > allowed).then(|| remote_ts - allowed)
}

#[cfg(test)]
mod resolve_tests {
    use super::*;

    fn facts() -> Facts {
        Facts::default()
    }

    #[test]
    fn update_if_newer_follows_the_timestamp_rule() {
        let t = ConflictType::InsertExists;
        let newer = Facts {
            remote_newer: true,
            ..facts()
        };
        assert_eq!(
            resolve(t, Resolver::UpdateIfNewer, newer),
            Outcome::ApplyRemote
        );
        assert_eq!(resolve(t, Resolver::UpdateIfNewer, facts()), Outcome::Skip);
        assert_eq!(resolve(t, Resolver::Update, facts()), Outcome::ApplyRemote);
        assert_eq!(resolve(t, Resolver::Skip, newer), Outcome::Skip);
        assert_eq!(resolve(t, Resolver::Error, newer), Outcome::Error);
    }

    #[test]
    fn update_missing_inserts_only_a_whole_row() {
        let t = ConflictType::UpdateMissing;
        let full = Facts {
            full_row: true,
            ..facts()
        };
        assert_eq!(
            resolve(t, Resolver::InsertOrSkip, full),
            Outcome::ApplyRemote
        );
        assert_eq!(resolve(t, Resolver::InsertOrSkip, facts()), Outcome::Skip);
        assert_eq!(resolve(t, Resolver::InsertOrError, facts()), Outcome::Error);
        assert_eq!(
            resolve(t, Resolver::InsertOrError, full),
            Outcome::ApplyRemote
        );
    }

    #[test]
    fn missing_columns_and_tables() {
        let null = Facts {
            value_is_null: true,
            ..facts()
        };
        let t = ConflictType::TargetColumnMissing;
        assert_eq!(
            resolve(t, Resolver::IgnoreIfNull, null),
            Outcome::ApplyRemote
        );
        assert_eq!(resolve(t, Resolver::IgnoreIfNull, facts()), Outcome::Error);
        assert_eq!(resolve(t, Resolver::Ignore, facts()), Outcome::ApplyRemote);
        let dropped = Facts {
            recently_dropped: true,
            ..facts()
        };
        let t = ConflictType::TargetTableMissing;
        assert_eq!(
            resolve(t, Resolver::SkipIfRecentlyDropped, dropped),
            Outcome::Skip
        );
        assert_eq!(
            resolve(t, Resolver::SkipIfRecentlyDropped, facts()),
            Outcome::Error
        );
    }

    #[test]
    fn a_resolver_that_does_not_fit_falls_back_to_the_default() {
        let t = ConflictType::DeleteMissing;
        assert_eq!(resolve(t, Resolver::Update, facts()), Outcome::Skip);
    }

    #[test]
    fn log_filters() {
        let mut c = ConflictConfig::default();
        assert!(c.logs(ConflictType::InsertExists, Outcome::Skip));
        c.log_types = Some(vec![ConflictType::DeleteMissing]);
        assert!(!c.logs(ConflictType::InsertExists, Outcome::Skip));
        assert!(c.logs(ConflictType::DeleteMissing, Outcome::Skip));
        c.log_resolutions = Some(vec!["apply_remote".into()]);
        assert!(!c.logs(ConflictType::DeleteMissing, Outcome::Skip));
        c.set_resolver(ConflictType::DeleteMissing, Resolver::Error);
        assert_eq!(c.resolver(ConflictType::DeleteMissing), Resolver::Error);
        assert_eq!(
            ConflictConfig::default().resolver(ConflictType::UpdateMissing),
            Resolver::InsertOrSkip
        );
    }

    #[test]
    fn clock_skew() {
        assert_eq!(clock_skew_excess(10_000_000, 0, -1), None);
        assert_eq!(clock_skew_excess(5_000, 10_000, 0), None);
        assert_eq!(clock_skew_excess(3_000_000, 0, 1000), Some(2_000_000));
        assert_eq!(clock_skew_excess(1_000_000, 0, 1000), None);
    }
}
