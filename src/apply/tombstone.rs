//! Tombstones and key locks: what the writer notes about deleted keys and
//! looks up for missing rows, and the advisory locks that make writers of
//! different peers decide about one missing key one at a time.

use super::*;

/// Key locks one transaction takes on one relation before it locks the
/// whole relation instead (see `Applier::lock_key`).
pub(super) const MAX_KEY_LOCKS: u32 = 256;

impl Applier {
    /// The tombstone text of the key columns `key` (remote indexes) of `vals`.
    pub(super) fn key_text(&mut self, relid: u32, key: &[usize], vals: &[Value]) -> String {
        let (datums, nulls) = self.datums(relid, key, vals);
        let row_cxt = self.row_cxt;
        let r = self.rel(relid);
        let mut parts: Vec<(i16, Option<String>)> = crate::tombstone::with_canonical_output(|| {
            // SAFETY: switched back below; output strings belong to the row.
            let old = unsafe { pg_sys::MemoryContextSwitchTo(row_cxt) };
            let parts = key
                .iter()
                .enumerate()
                .map(|(n, &i)| {
                    let l = &r.local[r.map[i].expect("key columns exist locally")];
                    let text = (nulls[n] != b'n' as std::ffi::c_char)
                        // SAFETY: the datum was made by this column type's input function.
                        .then(|| unsafe { crate::tombstone::output_text(l.typid, datums[n]) });
                    (l.attnum, text)
                })
                .collect();
            // SAFETY: restores the context switched from above.
            unsafe { pg_sys::MemoryContextSwitchTo(old) };
            parts
        });
        parts.sort_by_key(|p| p.0);
        crate::tombstone::key_text(&parts.into_iter().map(|p| p.1).collect::<Vec<_>>())
    }

    /// Makes writers of different peers decide about the same missing key
    /// one after the other: an advisory lock on (relation, key) to the end of
    /// the transaction, under a shared lock on the relation. Every
    /// `MAX_KEY_LOCKS` key locks on one relation (a bulk change) the writer
    /// tries to take the relation's lock exclusively instead, so that the
    /// lock table does not fill up; it only tries, because two writers that
    /// waited for it would deadlock.
    ///
    /// Returns whether the caller must look for the row again (the lock may
    /// have waited for another writer's commit); not once the relation is
    /// held exclusively, since every lookup after that sees all there is.
    pub(super) fn lock_key(&mut self, relid: u32, key: &[usize], vals: &[Value]) -> bool {
        if key.is_empty() || self.escalated.contains(&relid) {
            return false;
        }
        let local_oid = self.rel(relid).local_oid;
        let n = self.key_locks.entry(relid).or_insert(0);
        *n += 1;
        let count = *n;
        if count == 1 {
            if self.rel_lock_s.is_null() {
                self.rel_lock_s = keep_plan(
                    "SELECT pg_catalog.pg_advisory_xact_lock_shared($1::int8)",
                    &mut [pg_sys::OIDOID],
                );
            }
            self.exec_oid(self.rel_lock_s, local_oid, "locking a relation");
        } else if count % MAX_KEY_LOCKS == 1 {
            // Try, not wait: two writers that both hold the shared lock and
            // waited for the exclusive one would deadlock. If another writer
            // is busy here, go on with key locks and try again later.
            if self.rel_lock_x.is_null() {
                self.rel_lock_x = keep_plan(
                    "SELECT pg_catalog.pg_try_advisory_xact_lock($1::int8)",
                    &mut [pg_sys::OIDOID],
                );
            }
            let got = self
                .exec_oid(self.rel_lock_x, local_oid, "locking a relation")
                .is_some_and(|d| d.value() != 0);
            if got {
                self.escalated.insert(relid);
                return true;
            }
        }
        let text = self.key_text(relid, key, vals);
        if self.key_lock.is_null() {
            self.key_lock = keep_plan(
                "SELECT pg_catalog.pg_advisory_xact_lock($1::int4, pg_catalog.hashtext($2))",
                &mut [pg_sys::OIDOID, pg_sys::TEXTOID],
            );
        }
        self.exec_oid_text(self.key_lock, local_oid, &text, "locking a key");
        true
    }

    /// Whether this row was deleted here by a write newer than the incoming one.
    pub(super) fn deleted_later(&mut self, relid: u32, key: &[usize], vals: &[Value]) -> bool {
        if key.is_empty() {
            return false;
        }
        let text = self.key_text(relid, key, vals);
        let local_oid = self.rel(relid).local_oid;
        if self.tomb_find.is_null() {
            self.tomb_find = keep_plan(
                crate::catalog::statements::TOMBSTONE_FIND,
                &mut [pg_sys::OIDOID, pg_sys::TEXTOID],
            );
        }
        let found = self
            .exec_oid_text(self.tomb_find, local_oid, &text, "looking up a deleted row")
            .map(commit_ts_of);
        match found {
            // Deletes the join target remembered when this node joined.
            None => match self.copied_writer(relid, key, vals, true) {
                Some(Some(tomb)) => !remote_wins(self.remote_writer(), Some(tomb)),
                _ => false,
            },
            Some((None, _)) => false,
            Some((Some(commit_ts), ro)) => {
                let tomb = Writer {
                    commit_ts,
                    node_id: self.node_of_origin(ro),
                };
                !remote_wins(self.remote_writer(), Some(tomb))
            }
        }
    }

    pub(super) fn note_deleted(&mut self, relid: u32, key: &[usize], vals: &[Value]) {
        if key.is_empty() {
            return;
        }
        let text = self.key_text(relid, key, vals);
        let local_oid = self.rel(relid).local_oid;
        if self.tomb_put.is_null() {
            self.tomb_put = keep_plan(
                crate::catalog::statements::TOMBSTONE_PUT,
                &mut [pg_sys::OIDOID, pg_sys::TEXTOID],
            );
        }
        self.exec_oid_text(self.tomb_put, local_oid, &text, "noting a deleted row");
    }
}
