//! The apply decision flow for an incoming INSERT, UPDATE or DELETE: given
//! what the writer found (the local row and who last wrote it, a tombstone,
//! rows that hold the incoming values in unique indexes), which conflict to
//! report, and, given the outcome its resolver gave (`conflict::resolve`),
//! what to do with the rows. The writer (`src/apply/rows.rs`) only gathers
//! the facts and carries the actions out.

use crate::conflict::{remote_wins, ConflictType, Outcome, Resolver, Writer};

/// The local rows an incoming row collides with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Collisions {
    /// A local row holds the incoming row's key (for an INSERT).
    pub key_row: bool,
    /// How many other local rows hold values of the incoming row in unique
    /// indexes (other than the key's, or the key of a key-changing UPDATE).
    pub others: usize,
}

/// The conflict an incoming INSERT meets: none when nothing collides;
/// `kind` (insert_exists, or update_pkey_exists for the new key of a
/// key-changing UPDATE) against one local row; multiple_unique_conflicts
/// against more.
pub fn insert_conflict(c: Collisions, kind: ConflictType) -> Option<ConflictType> {
    match (c.key_row, c.others) {
        (false, 0) => None,
        (true, 0) | (false, 1) => Some(kind),
        _ => Some(ConflictType::MultipleUniqueConflicts),
    }
}

/// What to do with an incoming INSERT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertAction {
    /// Insert it (nothing collided); `inserted_row_stays` then asks after a
    /// newer delete of its key.
    Insert,
    /// Write it over the local row with its key.
    UpdateKeyRow,
    /// Delete the colliding rows with other keys (noting their keys as
    /// deleted), then write it: over the local row with its key if there is
    /// one, else as a new row. So the nodes agree whichever order they see
    /// the colliding rows in.
    ReplaceOthers,
    /// Keep the local rows.
    Keep,
    /// The resolver stopped the apply.
    Stop,
}

/// The action for an incoming INSERT: `outcome` is the resolver's for the
/// conflict `insert_conflict` returned (`None` when there was none).
pub fn insert_action(c: Collisions, outcome: Option<Outcome>) -> InsertAction {
    match outcome {
        None => InsertAction::Insert,
        Some(Outcome::Error) => InsertAction::Stop,
        Some(Outcome::Skip) => InsertAction::Keep,
        Some(Outcome::ApplyRemote) if c.others == 0 => InsertAction::UpdateKeyRow,
        Some(Outcome::ApplyRemote) => InsertAction::ReplaceOthers,
    }
}

/// Whether a row inserted without conflict stays: not when its key is
/// remembered as deleted by a newer write (`deleted_later`, looked up
/// after the insert, so that it sees the delete of a local transaction the
/// insert waited for), unless a resolver chose to insert over that delete
/// (`check_tombstone` false).
pub fn inserted_row_stays(check_tombstone: bool, deleted_later: impl FnOnce() -> bool) -> bool {
    !(check_tombstone && deleted_later())
}

/// The conflict an incoming UPDATE meets when it gives its row values that
/// `others` other local rows hold in unique indexes: update_pkey_exists
/// against one, multiple_unique_conflicts against more.
pub fn update_collision_conflict(others: usize) -> ConflictType {
    if others > 1 {
        ConflictType::MultipleUniqueConflicts
    } else {
        ConflictType::UpdatePkeyExists
    }
}

/// What to do with an UPDATE that collides with other local rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateCollision {
    /// Delete the other rows (noting their keys as deleted) and update.
    ReplaceOthers,
    /// The update lost to the row holding its new values under
    /// update_if_newer: the updated row goes, as it went on the node where
    /// the other row won.
    DeleteUpdated,
    /// Keep the local rows as they are.
    Keep,
    /// The resolver stopped the apply.
    Stop,
}

/// The action for `update_collision_conflict`'s conflict, whose resolver
/// is `resolver` and gave `outcome`.
pub fn update_collision_action(
    t: ConflictType,
    resolver: Resolver,
    outcome: Outcome,
) -> UpdateCollision {
    match outcome {
        Outcome::Error => UpdateCollision::Stop,
        Outcome::ApplyRemote => UpdateCollision::ReplaceOthers,
        Outcome::Skip
            if t == ConflictType::UpdatePkeyExists && resolver == Resolver::UpdateIfNewer =>
        {
            UpdateCollision::DeleteUpdated
        }
        Outcome::Skip => UpdateCollision::Keep,
    }
}

/// The conflict an incoming UPDATE of a local row meets: another node than
/// the updating one wrote the row last (concurrent changes met, or the row
/// came from elsewhere): update_origin_change. `None`: no conflict, and the
/// update applies if it is newer.
pub fn update_found_conflict(remote: Writer, local: Option<Writer>) -> Option<ConflictType> {
    local
        .is_some_and(|l| l.node_id != remote.node_id)
        .then_some(ConflictType::UpdateOriginChange)
}

/// What to do with a local row an incoming UPDATE found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateFound {
    /// The resolver stopped the apply.
    Stop,
    /// Change the row in place; `old_key_gone`: the key changed, so the old
    /// key is noted as deleted.
    InPlace { old_key_gone: bool },
    /// A key change with the whole new row: the old row goes (when the
    /// change applies) and the new row is inserted, resolved on its own
    /// against whatever holds the new key (update_pkey_exists), as on the
    /// origin the old row went in any case.
    DeleteAndInsert { delete_old: bool },
    /// The local row stays as it is.
    Keep,
}

/// The action for a found row: `outcome` is the resolver's for the conflict
/// `update_found_conflict` returned (`None` when there was none).
pub fn update_found_action(
    remote: Writer,
    local: Option<Writer>,
    outcome: Option<Outcome>,
    key_changed: bool,
    full_row: bool,
) -> UpdateFound {
    let apply = match outcome {
        Some(Outcome::Error) => return UpdateFound::Stop,
        Some(o) => o == Outcome::ApplyRemote,
        None => remote_wins(remote, local),
    };
    if key_changed && full_row {
        UpdateFound::DeleteAndInsert { delete_old: apply }
    } else if apply {
        UpdateFound::InPlace {
            old_key_gone: key_changed,
        }
    } else {
        UpdateFound::Keep
    }
}

/// The conflict an incoming UPDATE meets when its row is not here: deleted
/// here by a newer write (`deleted_later`: update_recently_deleted), or not
/// here (yet), update_missing.
pub fn update_missing_conflict(deleted_later: bool) -> ConflictType {
    if deleted_later {
        ConflictType::UpdateRecentlyDeleted
    } else {
        ConflictType::UpdateMissing
    }
}

/// What to do when an incoming UPDATE's row is not here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateMissing {
    /// Note the old key as deleted: the change moved the row away from it
    /// on its origin, so an older insert of that key still on its way from a
    /// third node must find the tombstone (not when a newer delete is
    /// already noted).
    pub old_key_gone: bool,
    /// Insert the incoming row, reporting this conflict type if its key is
    /// taken meanwhile, and whether to look for a newer tombstone of it.
    pub insert: Option<(ConflictType, bool)>,
}

pub fn update_missing_action(
    outcome: Outcome,
    deleted_later: bool,
    key_changed: bool,
) -> UpdateMissing {
    let kind = if key_changed {
        ConflictType::UpdatePkeyExists
    } else {
        ConflictType::InsertExists
    };
    UpdateMissing {
        old_key_gone: key_changed && !deleted_later,
        insert: (outcome == Outcome::ApplyRemote).then_some((kind, !deleted_later)),
    }
}

/// The conflict an incoming DELETE of a local row meets: the row was
/// written after the delete was made (delete_recently_updated).
pub fn delete_found_conflict(remote: Writer, local: Option<Writer>) -> Option<ConflictType> {
    (!remote_wins(remote, local)).then_some(ConflictType::DeleteRecentlyUpdated)
}

/// Whether the found row is deleted: `outcome` is the resolver's for the
/// conflict `delete_found_conflict` returned, if any. A deleted row with a
/// key gets a tombstone.
pub fn delete_found_action(outcome: Option<Outcome>) -> bool {
    outcome.is_none_or(|o| o == Outcome::ApplyRemote)
}

/// Whether a DELETE whose row is not here (delete_missing) is noted as a
/// tombstone: gone already, or not here yet, so that an older insert or
/// update arriving later does not bring the row back; not when the apply
/// stops, the table has no key, or a newer delete is already noted
/// (`deleted_later`, a lookup, asked only when the rest says yes).
pub fn delete_missing_notes(
    outcome: Outcome,
    has_key: bool,
    deleted_later: impl FnOnce() -> bool,
) -> bool {
    outcome != Outcome::Error && has_key && !deleted_later()
}

/// Whether a column of the incoming row that this node lacks is reported
/// as target_column_missing: when the change sets it, and also when it is
/// NULL under the `error` resolver (which is told of every missing column).
pub fn target_column_missing_reported(value_is_null: bool, resolver: Resolver) -> bool {
    !value_is_null || resolver == Resolver::Error
}

/// Whether a change goes on after a conflict about the shape of its table
/// (target_table_missing, target_column_missing, source_column_missing):
/// only when the resolver applies it; otherwise it is skipped, or the apply
/// stops.
pub fn shape_conflict_goes_on(outcome: Outcome) -> bool {
    outcome == Outcome::ApplyRemote
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conflict::tests::w;
    use crate::conflict::{resolve, Facts};

    const REMOTE: Writer = Writer {
        commit_ts: 100,
        node_id: 2,
    };

    /// Every resolver BDR 4 allows for `t`, with its outcome for `facts`.
    fn outcomes(t: ConflictType, facts: Facts) -> Vec<(Resolver, Outcome)> {
        t.allowed_resolvers()
            .into_iter()
            .map(|r| (r, resolve(t, r, facts)))
            .collect()
    }

    #[test]
    fn update_of_a_row_the_same_node_wrote_is_no_conflict() {
        assert_eq!(update_found_conflict(REMOTE, Some(w(50, 2))), None);
        assert_eq!(
            update_found_action(REMOTE, Some(w(50, 2)), None, false, true),
            UpdateFound::InPlace {
                old_key_gone: false
            }
        );
        // An older change of the same node's row (only a copy can be newer).
        assert_eq!(
            update_found_action(REMOTE, Some(w(150, 2)), None, false, true),
            UpdateFound::Keep
        );
        assert_eq!(update_found_conflict(REMOTE, None), None);
    }

    #[test]
    fn update_origin_change_with_every_resolver() {
        let t = update_found_conflict(REMOTE, Some(w(50, 1)));
        assert_eq!(t, Some(ConflictType::UpdateOriginChange));
        let t = t.unwrap();
        for (local, newer) in [(w(50, 1), true), (w(150, 1), false), (w(100, 3), false)] {
            let facts = Facts {
                remote_newer: remote_wins(REMOTE, Some(local)),
                full_row: true,
                ..Facts::default()
            };
            for (r, o) in outcomes(t, facts) {
                let a = update_found_action(REMOTE, Some(local), Some(o), false, true);
                let expect = match r {
                    Resolver::Error => UpdateFound::Stop,
                    Resolver::Skip => UpdateFound::Keep,
                    Resolver::Update => UpdateFound::InPlace {
                        old_key_gone: false,
                    },
                    Resolver::UpdateIfNewer if newer => UpdateFound::InPlace {
                        old_key_gone: false,
                    },
                    Resolver::UpdateIfNewer => UpdateFound::Keep,
                    other => panic!("{other:?} is not allowed for update_origin_change"),
                };
                assert_eq!(a, expect, "{r:?}, local {local:?}");
            }
        }
    }

    #[test]
    fn key_changes() {
        // Whole row: the old row goes only if the change wins; the new row
        // is inserted and resolved on its own in every case.
        for (o, delete_old) in [(Outcome::ApplyRemote, true), (Outcome::Skip, false)] {
            assert_eq!(
                update_found_action(REMOTE, Some(w(50, 1)), Some(o), true, true),
                UpdateFound::DeleteAndInsert { delete_old }
            );
        }
        // With unchanged TOAST values only the local row has them: in place,
        // and the old key is noted as gone.
        assert_eq!(
            update_found_action(REMOTE, Some(w(50, 2)), None, true, false),
            UpdateFound::InPlace { old_key_gone: true }
        );
        assert_eq!(
            update_found_action(REMOTE, Some(w(50, 1)), Some(Outcome::Error), true, true),
            UpdateFound::Stop
        );
    }

    #[test]
    fn update_missing_and_recently_deleted_with_every_resolver() {
        for deleted_later in [false, true] {
            let t = update_missing_conflict(deleted_later);
            assert_eq!(
                t,
                if deleted_later {
                    ConflictType::UpdateRecentlyDeleted
                } else {
                    ConflictType::UpdateMissing
                }
            );
            for full_row in [true, false] {
                let facts = Facts {
                    full_row,
                    ..Facts::default()
                };
                for (r, o) in outcomes(t, facts) {
                    for key_changed in [false, true] {
                        let a = update_missing_action(o, deleted_later, key_changed);
                        let inserts = match r {
                            Resolver::Error => {
                                assert_eq!(o, Outcome::Error);
                                false
                            }
                            Resolver::Skip => false,
                            Resolver::InsertOrSkip => full_row,
                            Resolver::InsertOrError => {
                                assert_eq!(o == Outcome::Error, !full_row);
                                full_row
                            }
                            other => panic!("{other:?} is not allowed for {t:?}"),
                        };
                        let kind = if key_changed {
                            ConflictType::UpdatePkeyExists
                        } else {
                            ConflictType::InsertExists
                        };
                        assert_eq!(
                            a,
                            UpdateMissing {
                                old_key_gone: key_changed && !deleted_later,
                                insert: inserts.then_some((kind, !deleted_later)),
                            },
                            "{t:?} {r:?} full_row {full_row} key_changed {key_changed}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn delete_recently_updated_with_every_resolver() {
        assert_eq!(delete_found_conflict(REMOTE, Some(w(50, 1))), None);
        assert!(delete_found_action(None));
        let t = delete_found_conflict(REMOTE, Some(w(150, 1)));
        assert_eq!(t, Some(ConflictType::DeleteRecentlyUpdated));
        let t = t.unwrap();
        for (r, o) in outcomes(t, Facts::default()) {
            let deletes = delete_found_action(Some(o));
            match r {
                Resolver::Error => assert_eq!(o, Outcome::Error),
                Resolver::Skip => assert!(!deletes),
                Resolver::Update => assert!(deletes),
                other => panic!("{other:?} is not allowed for delete_recently_updated"),
            }
            if r == Resolver::Error {
                assert!(!deletes);
            }
        }
    }

    #[test]
    fn delete_missing_with_every_resolver() {
        let t = ConflictType::DeleteMissing;
        for (r, o) in outcomes(t, Facts::default()) {
            for (has_key, deleted_later) in [(true, false), (true, true), (false, false)] {
                let notes = delete_missing_notes(o, has_key, || deleted_later);
                let expect = match r {
                    Resolver::Error => false,
                    Resolver::Skip => has_key && !deleted_later,
                    other => panic!("{other:?} is not allowed for delete_missing"),
                };
                assert_eq!(notes, expect, "{r:?} {has_key} {deleted_later}");
            }
        }
    }

    #[test]
    fn insert_without_collision_is_no_conflict() {
        let free = Collisions::default();
        for kind in [ConflictType::InsertExists, ConflictType::UpdatePkeyExists] {
            assert_eq!(insert_conflict(free, kind), None);
        }
        assert_eq!(insert_action(free, None), InsertAction::Insert);
        assert!(inserted_row_stays(true, || false));
        assert!(!inserted_row_stays(true, || true));
        assert!(
            inserted_row_stays(false, || panic!("not looked up")),
            "a resolver chose to insert over the delete"
        );
    }

    #[test]
    fn insert_exists_and_update_pkey_exists_with_every_resolver() {
        let one = [
            Collisions {
                key_row: true,
                others: 0,
            },
            Collisions {
                key_row: false,
                others: 1,
            },
        ];
        for kind in [ConflictType::InsertExists, ConflictType::UpdatePkeyExists] {
            for c in one {
                assert_eq!(insert_conflict(c, kind), Some(kind));
                for newer in [true, false] {
                    let facts = Facts {
                        remote_newer: newer,
                        full_row: true,
                        ..Facts::default()
                    };
                    for (r, o) in outcomes(kind, facts) {
                        let applies = match r {
                            Resolver::Error => {
                                assert_eq!(insert_action(c, Some(o)), InsertAction::Stop);
                                continue;
                            }
                            Resolver::Skip => false,
                            Resolver::Update => true,
                            Resolver::UpdateIfNewer => newer,
                            other => panic!("{other:?} is not allowed for {kind:?}"),
                        };
                        let expect = match (applies, c.key_row) {
                            (false, _) => InsertAction::Keep,
                            (true, true) => InsertAction::UpdateKeyRow,
                            (true, false) => InsertAction::ReplaceOthers,
                        };
                        assert_eq!(insert_action(c, Some(o)), expect, "{kind:?} {r:?} {c:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn multiple_unique_conflicts_with_every_resolver() {
        let t = ConflictType::MultipleUniqueConflicts;
        for c in [
            Collisions {
                key_row: true,
                others: 1,
            },
            Collisions {
                key_row: false,
                others: 2,
            },
            Collisions {
                key_row: true,
                others: 3,
            },
        ] {
            assert_eq!(insert_conflict(c, ConflictType::InsertExists), Some(t));
            assert_eq!(insert_conflict(c, ConflictType::UpdatePkeyExists), Some(t));
            for (r, o) in outcomes(t, Facts::default()) {
                let expect = match r {
                    Resolver::Error => InsertAction::Stop,
                    Resolver::Skip => InsertAction::Keep,
                    Resolver::Update => InsertAction::ReplaceOthers,
                    other => panic!("{other:?} is not allowed for {t:?}"),
                };
                assert_eq!(insert_action(c, Some(o)), expect, "{r:?} {c:?}");
            }
        }
        assert_eq!(update_collision_conflict(2), t);
        for (r, o) in outcomes(t, Facts::default()) {
            let expect = match r {
                Resolver::Error => UpdateCollision::Stop,
                Resolver::Skip => UpdateCollision::Keep,
                Resolver::Update => UpdateCollision::ReplaceOthers,
                other => panic!("{other:?} is not allowed for {t:?}"),
            };
            assert_eq!(update_collision_action(t, r, o), expect, "{r:?}");
        }
    }

    #[test]
    fn update_pkey_exists_on_update_with_every_resolver() {
        let t = update_collision_conflict(1);
        assert_eq!(t, ConflictType::UpdatePkeyExists);
        for newer in [true, false] {
            let facts = Facts {
                remote_newer: newer,
                full_row: true,
                ..Facts::default()
            };
            for (r, o) in outcomes(t, facts) {
                let expect = match r {
                    Resolver::Error => UpdateCollision::Stop,
                    Resolver::Skip => UpdateCollision::Keep,
                    Resolver::Update => UpdateCollision::ReplaceOthers,
                    Resolver::UpdateIfNewer if newer => UpdateCollision::ReplaceOthers,
                    // The other row won where it was written: the updated
                    // row goes here too.
                    Resolver::UpdateIfNewer => UpdateCollision::DeleteUpdated,
                    other => panic!("{other:?} is not allowed for {t:?}"),
                };
                assert_eq!(update_collision_action(t, r, o), expect, "{r:?} {newer}");
            }
        }
    }

    #[test]
    fn missing_columns_and_tables_with_every_resolver() {
        let t = ConflictType::TargetColumnMissing;
        for value_is_null in [true, false] {
            let facts = Facts {
                value_is_null,
                ..Facts::default()
            };
            for (r, o) in outcomes(t, facts) {
                let reported = target_column_missing_reported(value_is_null, r);
                let goes_on = !reported || shape_conflict_goes_on(o);
                let expect = match r {
                    Resolver::Error => {
                        assert!(reported);
                        false
                    }
                    Resolver::Skip => value_is_null,
                    Resolver::Ignore => true,
                    Resolver::IgnoreIfNull => value_is_null,
                    other => panic!("{other:?} is not allowed for {t:?}"),
                };
                assert_eq!(goes_on, expect, "{r:?} null {value_is_null}");
            }
        }
        let t = ConflictType::SourceColumnMissing;
        for (r, o) in outcomes(t, Facts::default()) {
            let expect = match r {
                Resolver::Error | Resolver::Skip => false,
                Resolver::UseDefaultValue => true,
                other => panic!("{other:?} is not allowed for {t:?}"),
            };
            assert_eq!(shape_conflict_goes_on(o), expect, "{r:?}");
        }
        let t = ConflictType::TargetTableMissing;
        for recently_dropped in [true, false] {
            let facts = Facts {
                recently_dropped,
                ..Facts::default()
            };
            for (r, o) in outcomes(t, facts) {
                assert!(!shape_conflict_goes_on(o), "a missing table takes no rows");
                let stops = match r {
                    Resolver::Error => true,
                    Resolver::Skip => false,
                    Resolver::SkipIfRecentlyDropped => !recently_dropped,
                    other => panic!("{other:?} is not allowed for {t:?}"),
                };
                assert_eq!(
                    o == Outcome::Error,
                    stops,
                    "{r:?} dropped {recently_dropped}"
                );
            }
        }
    }
}
