//! The apply decision flow for an incoming UPDATE or DELETE: given what the
//! writer found (the local row and who last wrote it, a tombstone), which
//! conflict to report, and, given the outcome its resolver gave
//! (`conflict::resolve`), what to do with the row. The writer
//! (`src/apply/rows.rs`) only gathers the facts and carries the actions out.
//!
//! INSERT and the collisions on unique indexes other than the key are still
//! decided in the writer.

use crate::conflict::{remote_wins, ConflictType, Outcome, Writer};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conflict::tests::w;
    use crate::conflict::{resolve, Facts, Resolver};

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
}
