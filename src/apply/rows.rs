//! The row changes: INSERT, UPDATE, DELETE and TRUNCATE from a peer,
//! with the conflict each can meet and how it is resolved.

use super::*;
use bdr_core::flow;

impl Applier {
    /// The row writes go to the back-end (`backend::RowWriter`).
    pub(super) fn exec_insert(&mut self, relid: u32, cols: &[usize], new: &[Value]) -> Option<Tid> {
        self.rows.insert(rel_of(&mut self.rels, relid), cols, new)
    }

    pub(super) fn exec_update(&mut self, relid: u32, at: Tid, cols: &[usize], new: &[Value]) {
        self.rows
            .update(rel_of(&mut self.rels, relid), at, cols, new)
    }

    pub(super) fn exec_delete(&mut self, relid: u32, at: Tid) {
        self.rows.delete(rel_of(&mut self.rels, relid), at)
    }

    /// Applies an incoming row as an INSERT of remote columns `cols`. `kind`
    /// is the conflict type to report when its key is taken (insert_exists,
    /// or update_pkey_exists for the new key of a key-changing UPDATE).
    /// `check_tombstone`: false when a resolver chose to insert over a newer
    /// delete (update_recently_deleted with insert_or_*).
    pub(super) fn insert(
        &mut self,
        relid: u32,
        new: &[Value],
        cols: &[usize],
        kind: ConflictType,
        check_tombstone: bool,
    ) {
        let key = self.rel(relid).key.clone();
        // A table without a key has nothing to lock or look up by key.
        let mut locked = key.is_empty();
        // Rounds: look; if free, lock the key and look again; then insert,
        // or, if a local session inserted the key meanwhile, resolve against it.
        for _ in 0..4 {
            let pk = if key.is_empty() {
                None
            } else {
                self.find(relid, &key, new, false, false)
            };
            let others = self.unique_collisions(relid, new, pk.as_ref().map(|f| f.ctid));
            let c = flow::Collisions {
                key_row: pk.is_some(),
                others: others.len(),
            };
            let outcome = flow::insert_conflict(c, kind).map(|t| {
                self.collision_conflict(t, relid, new, &key, new, pk.as_ref(), &others, false, true)
            });
            match flow::insert_action(c, outcome) {
                flow::InsertAction::Insert => {
                    if !locked {
                        locked = true;
                        if self.lock_key(relid, &key, new) {
                            continue;
                        }
                    }
                    // The tombstone is looked up after the insert, not
                    // before: the insert may have waited for a local
                    // transaction that inserted and deleted this key, whose
                    // tombstone only a snapshot taken after it can see.
                    match self.exec_insert(relid, cols, new) {
                        Some(ctid)
                            if !flow::inserted_row_stays(check_tombstone, || {
                                self.deleted_later(relid, &key, new)
                            }) =>
                        {
                            self.exec_delete(relid, ctid)
                        }
                        Some(_) => {}
                        // Taken meanwhile: look again.
                        None if !key.is_empty() => continue,
                        None => {}
                    }
                }
                flow::InsertAction::UpdateKeyRow => {
                    if let Some(f) = &pk {
                        self.exec_update(relid, f.ctid, cols, new);
                    }
                }
                flow::InsertAction::ReplaceOthers => {
                    for (_, f) in &others {
                        self.delete_row(relid, f);
                    }
                    match &pk {
                        Some(f) => self.exec_update(relid, f.ctid, cols, new),
                        None => {
                            self.exec_insert(relid, cols, new);
                        }
                    }
                }
                flow::InsertAction::Keep | flow::InsertAction::Stop => {}
            }
            return;
        }
        crate::fail!(ERRCODE_UNIQUE_VIOLATION,
            "a row replicated into {} conflicts with a local row on a unique index bdr cannot check (partial, on expressions or deferred)",
            self.rel(relid).qualified
        );
    }

    /// Reports conflict `t` of an incoming row `new` (found by `key` in
    /// `key_vals`) with the local row holding its key (`pk`) and the
    /// `others` holding its values in other unique indexes; returns the
    /// resolver's outcome. `updating`: the row is an UPDATE's new version.
    #[allow(clippy::too_many_arguments)]
    fn collision_conflict(
        &mut self,
        t: ConflictType,
        relid: u32,
        new: &[Value],
        key: &[usize],
        key_vals: &[Value],
        pk: Option<&Found>,
        others: &[(pg_sys::Oid, Found)],
        updating: bool,
        full_row: bool,
    ) -> Outcome {
        let key_index = self.rel(relid).key_index;
        let (index, local, detail) = if t == ConflictType::MultipleUniqueConflicts {
            let (index, local) = match pk {
                Some(f) => (key_index, Some(f)),
                None => (
                    others.first().map(|(i, _)| *i),
                    others.first().map(|(_, f)| f),
                ),
            };
            let mut names: Vec<String> = others
                .iter()
                .map(|(i, _)| relname_of(*i).unwrap_or_default())
                .collect();
            if let (Some(i), Some(_)) = (index, local) {
                if !others.iter().any(|(o, _)| *o == i) {
                    names.insert(0, relname_of(i).unwrap_or_default());
                }
            }
            let nrows = others.len() + usize::from(pk.is_some());
            let detail = format!(
                "the incoming row collides with {nrows} local rows (unique indexes {})",
                names.join(", ")
            );
            (index, local, detail)
        } else if let Some(f) = pk {
            let detail = format!("the key already exists: {}", self.local_desc(f));
            (key_index, Some(f), detail)
        } else {
            let (i, f) = &others[0];
            let index_name = relname_of(*i).unwrap_or_default();
            let detail = if updating {
                format!(
                    "the updated row would hold values another local row holds in unique index {index_name}: {}",
                    self.local_desc(f)
                )
            } else {
                format!(
                    "a local row with another key holds the same values in unique index {index_name}: {}",
                    self.local_desc(f)
                )
            };
            (Some(*i), Some(f), detail)
        };
        self.conflict(
            Seen::of(t, relid, key, key_vals, new, detail).against_any(index, local),
            Facts {
                full_row,
                ..Facts::default()
            },
        )
    }

    /// An incoming UPDATE of the row `f` (found by `lookup`'s `key`) gives
    /// it values other local rows hold in unique indexes (its key or
    /// another): update_pkey_exists against one, multiple_unique_conflicts
    /// against more (`bdr_core::flow` decides what goes).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn resolve_update_collisions(
        &mut self,
        relid: u32,
        new: &[Value],
        cols: &[usize],
        key: &[usize],
        lookup: &[Value],
        f: &Found,
        others: Vec<(pg_sys::Oid, Found)>,
    ) {
        let t = flow::update_collision_conflict(others.len());
        let full_row = !new.contains(&Value::UnchangedToast);
        let o = self.collision_conflict(t, relid, new, key, lookup, None, &others, true, full_row);
        match flow::update_collision_action(t, self.config.resolver(t), o) {
            flow::UpdateCollision::ReplaceOthers => {
                for (_, l) in &others {
                    self.delete_row(relid, l);
                }
                self.exec_update(relid, f.ctid, cols, new);
            }
            flow::UpdateCollision::DeleteUpdated => self.delete_row(relid, f),
            flow::UpdateCollision::Keep | flow::UpdateCollision::Stop => {}
        }
    }

    /// Deletes a local row that lost a unique-key conflict, noting its key
    /// as deleted like any applied delete.
    pub(super) fn delete_row(&mut self, relid: u32, f: &Found) {
        let key = self.rel(relid).key.clone();
        let vals = if key.is_empty() {
            Vec::new()
        } else {
            self.key_values_at(relid, &key, f.ctid)
        };
        self.exec_delete(relid, f.ctid);
        if !key.is_empty() {
            self.note_deleted(relid, &key, &vals);
        }
    }

    pub(super) fn update(&mut self, relid: u32, old: Option<&[Value]>, new: &[Value]) {
        let lookup = old.unwrap_or(new);
        let (key, full) = self.identity(relid, lookup, "UPDATE");
        let key_changed =
            !full && old.is_some() && key.iter().any(|&i| lookup.get(i) != new.get(i));
        let full_row = !new.contains(&Value::UnchangedToast);
        // Missing columns are resolved first, so that nothing of the change
        // is applied when it is to be skipped.
        let Some(cols) = self.present_cols(relid, new, false) else {
            return;
        };
        match self.find(relid, &key, lookup, full, true) {
            Some(f) => {
                let remote = self.remote_writer();
                let outcome = match flow::update_found_conflict(remote, f.writer) {
                    Some(t) => {
                        let detail = self.local_desc(&f);
                        let index = self.rel(relid).key_index;
                        Some(self.conflict(
                            Seen::of(t, relid, &key, lookup, new, detail).against(index, &f),
                            Facts {
                                full_row,
                                ..Facts::default()
                            },
                        ))
                    }
                    None => None,
                };
                match flow::update_found_action(remote, f.writer, outcome, key_changed, full_row) {
                    flow::UpdateFound::Stop | flow::UpdateFound::Keep => {}
                    flow::UpdateFound::DeleteAndInsert { delete_old } => {
                        // The new key may be taken here by a newer row
                        // (update_pkey_exists); the old row still goes if the
                        // change won, as it did on the origin.
                        if delete_old {
                            self.exec_delete(relid, f.ctid);
                            self.note_deleted(relid, &key, lookup);
                        }
                        self.insert(relid, new, &cols, ConflictType::UpdatePkeyExists, true);
                    }
                    flow::UpdateFound::InPlace { old_key_gone } => {
                        // In place (also a key change that kept TOASTed
                        // values, which only the local row has).
                        let mut others = Vec::new();
                        if key_changed {
                            if let Some(p) = self.find(relid, &key, new, false, false) {
                                let index = self.rel(relid).key_index.unwrap_or(pg_sys::InvalidOid);
                                others.push((index, p));
                            }
                        }
                        for (i, o) in self.unique_collisions(relid, new, Some(f.ctid)) {
                            if !others.iter().any(|(_, g)| same_tid(&g.ctid, &o.ctid)) {
                                others.push((i, o));
                            }
                        }
                        if others.is_empty() {
                            self.exec_update(relid, f.ctid, &cols, new);
                            if old_key_gone {
                                self.note_deleted(relid, &key, lookup);
                            }
                        } else {
                            self.resolve_update_collisions(
                                relid, new, &cols, &key, lookup, &f, others,
                            );
                        }
                    }
                }
            }
            None => {
                // The row is not here: deleted here by a newer delete
                // (update_recently_deleted), or not here (yet): an update
                // that overtook its insert from a third node, or one whose
                // row was deleted here earlier (update_missing). Inserting
                // the whole row keeps the update; an older insert arriving
                // later then loses against it.
                let deleted_later = !full && self.deleted_later(relid, &key, lookup);
                let t = flow::update_missing_conflict(deleted_later);
                let detail = if deleted_later {
                    "the row was deleted on this node by a newer transaction".to_string()
                } else {
                    "the row does not exist on this node".to_string()
                };
                let o = self.conflict(
                    Seen::of(t, relid, &key, lookup, new, detail),
                    Facts {
                        full_row,
                        ..Facts::default()
                    },
                );
                let action = flow::update_missing_action(o, deleted_later, key_changed);
                if action.old_key_gone {
                    self.note_deleted(relid, &key, lookup);
                }
                if let Some((kind, check_tombstone)) = action.insert {
                    self.insert(relid, new, &cols, kind, check_tombstone);
                }
            }
        }
    }

    pub(super) fn delete(&mut self, relid: u32, old: &[Value]) {
        let (key, full) = self.identity(relid, old, "DELETE");
        match self.find(relid, &key, old, full, true) {
            Some(f) => {
                // A row updated here after the delete was made stays.
                let outcome = match flow::delete_found_conflict(self.remote_writer(), f.writer) {
                    Some(t) => {
                        let detail = format!(
                            "the row was updated after the delete was made: {}",
                            self.local_desc(&f)
                        );
                        let index = self.rel(relid).key_index;
                        Some(
                            self.conflict(
                                Seen::of(t, relid, &key, old, old, detail)
                                    .against(index, &f)
                                    .deleting(),
                                Facts::default(),
                            ),
                        )
                    }
                    None => None,
                };
                if flow::delete_found_action(outcome) {
                    self.exec_delete(relid, f.ctid);
                    if !full {
                        self.note_deleted(relid, &key, old);
                    }
                }
            }
            None => {
                let o = self.conflict(
                    Seen::of(
                        ConflictType::DeleteMissing,
                        relid,
                        &key,
                        old,
                        old,
                        "the row does not exist on this node".into(),
                    )
                    .deleting(),
                    Facts::default(),
                );
                // Gone already, or not here yet: noted, so that an older
                // insert or update arriving later does not bring it back.
                if flow::delete_missing_notes(o, !full, || self.deleted_later(relid, &key, old)) {
                    self.note_deleted(relid, &key, old);
                }
            }
        }
    }

    pub(super) fn truncate(&mut self, relids: &[u32], cascade: bool, restart_identity: bool) {
        let names: Vec<String> = relids
            .iter()
            .map(|r| self.rel(*r).qualified.clone())
            .collect();
        let sql = format!(
            "TRUNCATE {}{}{}",
            names.join(", "),
            if restart_identity {
                " RESTART IDENTITY"
            } else {
                ""
            },
            if cascade { " CASCADE" } else { "" }
        );
        let c = CString::new(sql).unwrap_or_default();
        // SAFETY: a utility statement inside the apply transaction.
        unsafe { spi_check(pg_sys::SPI_execute(c.as_ptr(), false, 0), "truncating") };
    }
}
