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
mod tests {
    use super::*;

    fn w(ts: i64, node: u32) -> Writer {
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
