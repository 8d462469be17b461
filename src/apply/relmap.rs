//! The relation map: how a peer's relation (RELATION message) maps onto
//! the local table: columns, replica identity key, unique indexes, the
//! kept plans; rebuilt when local DDL changes the table
//! (target_table_missing, source/target_column_missing are found here).

use super::*;
use bdr_core::flow;

pub(super) struct LocalCol {
    pub(super) name: String,
    pub(super) attnum: i16,
    pub(super) typid: pg_sys::Oid,
    pub(super) typmod: i32,
    pub(super) input: pg_sys::Oid,
    pub(super) input_param: pg_sys::Oid,
    pub(super) recv: pg_sys::Oid,
    pub(super) recv_param: pg_sys::Oid,
    /// GENERATED ALWAYS AS IDENTITY: an UPDATE cannot set it (an INSERT
    /// does, with OVERRIDING SYSTEM VALUE).
    pub(super) identity_always: bool,
}

#[derive(Hash, PartialEq, Eq, Clone)]
pub(super) enum PlanKey {
    /// Find the row by these remote columns (`=`, or IS NOT DISTINCT FROM for
    /// REPLICA IDENTITY FULL).
    Find(Vec<usize>, bool),
    Insert(Vec<usize>),
    Update(Vec<usize>),
    Delete,
    /// The local row at a ctid as JSON (conflict history).
    LocalJson,
    /// The key columns of the local row at a ctid, as text.
    KeyAt,
    /// These remote columns' values as a JSON object (conflict history).
    Json(Vec<usize>),
}

/// A unique index of the local table other than the replica identity's.
pub(super) struct UniqueIndex {
    pub(super) oid: pg_sys::Oid,
    /// Remote column indexes of its columns.
    pub(super) cols: Vec<usize>,
}

pub(super) struct RelMap {
    pub(super) remote: Relation,
    pub(super) local_oid: pg_sys::Oid,
    pub(super) qualified: String,
    /// For each remote column, the local column it maps to.
    pub(super) map: Vec<Option<usize>>,
    pub(super) local: Vec<LocalCol>,
    /// Remote column indexes of the replica identity key.
    pub(super) key: Vec<usize>,
    /// The local index that holds the key, if there is one.
    pub(super) key_index: Option<pg_sys::Oid>,
    /// The other unique indexes an incoming row may collide on.
    pub(super) uniques: Vec<UniqueIndex>,
    /// Local columns the peer does not send (source_column_missing).
    pub(super) source_missing: Vec<String>,
    /// The table does not exist here (target_table_missing).
    pub(super) missing: bool,
    pub(super) plans: HashMap<PlanKey, pg_sys::SPIPlanPtr>,
}

impl Drop for RelMap {
    fn drop(&mut self) {
        for (_, p) in self.plans.drain() {
            // SAFETY: plans were kept with SPI_keepplan and are freed once.
            unsafe { pg_sys::SPI_freeplan(p) };
        }
    }
}

/// The unique indexes of local table `oid` an incoming row can be checked
/// against (plain columns, no predicate), split into the one that holds the
/// replica identity key and the others, with their columns as remote
/// column indexes.
/// Unique indexes of `oid` as (index oid, attnums separated by spaces).
///
/// # Safety
/// Inside an SPI connection, with a snapshot.
pub(super) unsafe fn index_rows(oid: pg_sys::Oid) -> Vec<(pg_sys::Oid, String, bool)> {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let q = format!(
            "SELECT i.indexrelid, pg_catalog.array_to_string((i.indkey::int2[])[0:i.indnkeyatts - 1], ' '),
                    i.indisprimary
               FROM pg_catalog.pg_index i
              WHERE i.indrelid = {} AND i.indisunique AND i.indisvalid AND i.indimmediate
                AND i.indpred IS NULL AND i.indexprs IS NULL
              ORDER BY i.indisprimary DESC, i.indexrelid",
            oid.to_u32()
        );
        let c = CString::new(q).unwrap_or_default();
        let mut rows: Vec<(pg_sys::Oid, String, bool)> = Vec::new();
        spi_check(
            pg_sys::SPI_execute(c.as_ptr(), true, 0),
            "reading a table's indexes",
        );
        let tt = pg_sys::SPI_tuptable;
        for i in 0..pg_sys::SPI_processed as usize {
            let tup = *(*tt).vals.add(i);
            let mut isnull = false;
            let d = pg_sys::SPI_getbinval(tup, (*tt).tupdesc, 1, &mut isnull);
            let cols = pg_sys::SPI_getvalue(tup, (*tt).tupdesc, 2);
            let primary = pg_sys::SPI_getbinval(tup, (*tt).tupdesc, 3, &mut isnull).value() != 0;
            rows.push((
                pg_sys::Oid::from(d.value() as u32),
                CStr::from_ptr(cols).to_string_lossy().into_owned(),
                primary,
            ));
        }
        rows
    }
}

/// Splits the unique indexes (`index_rows`) of a table into the one that
/// holds the replica identity key and the others, with their columns as
/// remote column indexes. Indexes on columns the peer does not send are
/// left out.
pub(super) fn unique_indexes(
    rows: Vec<(pg_sys::Oid, String, bool)>,
    local: &[LocalCol],
    map: &[Option<usize>],
    key: &[usize],
) -> (Vec<usize>, Option<pg_sys::Oid>, Vec<UniqueIndex>) {
    let resolved: Vec<(pg_sys::Oid, Vec<usize>, bool)> = rows
        .into_iter()
        .filter_map(|(ioid, cols, primary)| {
            let remote: Option<Vec<usize>> = cols
                .split_whitespace()
                .map(|a| {
                    let attnum: i16 = a.parse().ok()?;
                    let li = local.iter().position(|l| l.attnum == attnum)?;
                    map.iter().position(|m| *m == Some(li))
                })
                .collect();
            remote.filter(|r| !r.is_empty()).map(|r| (ioid, r, primary))
        })
        .collect();
    // REPLICA IDENTITY FULL marks no key columns; the primary key still
    // identifies rows for conflicts.
    let key: Vec<usize> = if key.is_empty() {
        resolved
            .iter()
            .find(|r| r.2)
            .map(|r| r.1.clone())
            .unwrap_or_default()
    } else {
        key.to_vec()
    };
    let mut sorted_key = key.clone();
    sorted_key.sort_unstable();
    let mut key_index = None;
    let mut uniques = Vec::new();
    for (ioid, mut cols, _) in resolved {
        let mut sorted = cols.clone();
        sorted.sort_unstable();
        if key_index.is_none() && sorted == sorted_key {
            key_index = Some(ioid);
        } else {
            cols.dedup();
            uniques.push(UniqueIndex { oid: ioid, cols });
        }
    }
    (key, key_index, uniques)
}

/// The remote columns of `vals` this node has and that carry a value.
pub(super) fn present(r: &RelMap, vals: &[Value]) -> Vec<usize> {
    (0..r.remote.columns.len())
        .filter(|i| r.map[*i].is_some() && vals.get(*i) != Some(&Value::UnchangedToast))
        .collect()
}

/// The map of peer relation `relid`, which its RELATION message must have
/// brought before any change of it.
pub(super) fn rel_of(rels: &mut HashMap<u32, RelMap>, relid: u32) -> &mut RelMap {
    match rels.get_mut(&relid) {
        Some(r) => r,
        None => crate::fail!(
            ERRCODE_PROTOCOL_VIOLATION,
            "bdr writer: change for relation {relid} before its description"
        ),
    }
}

impl Applier {
    pub(super) fn map_relation(&mut self, r: Relation) -> RelMap {
        let qualified = format!("{}.{}", ident(&r.schema), ident(&r.name));
        let mut local = Vec::new();
        let mut local_oid = pg_sys::InvalidOid;
        let mut index_list = Vec::new();
        let q = CString::new(format!(
            "SELECT a.attname::text, a.atttypid, a.atttypmod, a.attnum, a.attrelid, a.attidentity = 'a' FROM pg_catalog.pg_attribute a
              WHERE a.attrelid = pg_catalog.to_regclass({})
                AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
              ORDER BY a.attnum",
            bdr_core::quote::literal(&qualified)
        ))
        .unwrap_or_default();
        // SAFETY: a read-only catalog query in the current transaction (or a
        // short one of its own); results are copied out before SPI_finish.
        unsafe {
            let own_txn = !pg_sys::IsTransactionState();
            if own_txn {
                pg_sys::StartTransactionCommand();
            }
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            spi_check(pg_sys::SPI_connect(), "connecting to SPI");
            spi_check(
                pg_sys::SPI_execute(q.as_ptr(), true, 0),
                "reading a table's columns",
            );
            let tt = pg_sys::SPI_tuptable;
            for i in 0..pg_sys::SPI_processed as usize {
                let tup = *(*tt).vals.add(i);
                let desc = (*tt).tupdesc;
                let mut isnull = false;
                let name = pg_sys::SPI_getvalue(tup, desc, 1);
                let typid = pg_sys::SPI_getbinval(tup, desc, 2, &mut isnull);
                let typmod = pg_sys::SPI_getbinval(tup, desc, 3, &mut isnull);
                let attnum = pg_sys::SPI_getbinval(tup, desc, 4, &mut isnull).value() as i16;
                local_oid = pg_sys::Oid::from(
                    pg_sys::SPI_getbinval(tup, desc, 5, &mut isnull).value() as u32,
                );
                let identity_always = pg_sys::SPI_getbinval(tup, desc, 6, &mut isnull).value() != 0;
                let typid = pg_sys::Oid::from(typid.value() as u32);
                let (mut input, mut input_param, mut recv, mut recv_param) = (
                    pg_sys::InvalidOid,
                    pg_sys::InvalidOid,
                    pg_sys::InvalidOid,
                    pg_sys::InvalidOid,
                );
                pg_sys::getTypeInputInfo(typid, &mut input, &mut input_param);
                pg_sys::getTypeBinaryInputInfo(typid, &mut recv, &mut recv_param);
                local.push(LocalCol {
                    name: CStr::from_ptr(name).to_string_lossy().into_owned(),
                    attnum,
                    typid,
                    typmod: typmod.value() as i32,
                    input,
                    input_param,
                    recv,
                    recv_param,
                    identity_always,
                });
            }
            if local_oid != pg_sys::InvalidOid {
                index_list = index_rows(local_oid);
            }
            pg_sys::SPI_finish();
            pg_sys::PopActiveSnapshot();
            if own_txn {
                pg_sys::CommitTransactionCommand();
            }
        }
        let missing = local.is_empty();
        let map: Vec<Option<usize>> = r
            .columns
            .iter()
            .map(|c| local.iter().position(|l| l.name == c.name))
            .collect();
        let key: Vec<usize> = r
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_key)
            .map(|(i, _)| i)
            .collect();
        let source_missing = local
            .iter()
            .enumerate()
            .filter(|(li, _)| !map.contains(&Some(*li)))
            .map(|(_, l)| l.name.clone())
            .collect();
        let (key, key_index, uniques) = if missing {
            (key, None, Vec::new())
        } else {
            unique_indexes(index_list, &local, &map, &key)
        };
        RelMap {
            remote: r,
            local_oid,
            qualified,
            map,
            local,
            key,
            key_index,
            uniques,
            source_missing,
            missing,
            plans: HashMap::new(),
        }
    }

    /// Whether local table `oid` changed by DDL since it was mapped (after
    /// a relcache reset, every mapped table counts as changed); forgets it.
    pub(super) fn changed_since_mapped(&mut self, oid: pg_sys::Oid) -> bool {
        if let Some(changed) = crate::relcache::take() {
            let mapped = self.rels.values().map(|r| r.local_oid.to_u32());
            if changed.all {
                self.stale.extend(mapped);
            } else {
                let mapped: std::collections::HashSet<u32> = mapped.collect();
                self.stale
                    .extend(changed.relids.into_iter().filter(|o| mapped.contains(o)));
            }
        }
        self.stale.remove(&oid.to_u32())
    }

    /// Whether the change's table exists here. When it does not, that is a
    /// target_table_missing conflict, resolved here; a table dropped and
    /// created again since it was described is described anew.
    pub(super) fn table_present(&mut self, relid: u32, vals: &[Value]) -> bool {
        if self.stop.is_some() {
            return false;
        }
        let (missing, oid) = {
            let r = self.rel(relid);
            (r.missing, r.local_oid)
        };
        // Local DDL (a column or index added, the table dropped) changes
        // how the peer's rows map here.
        let changed = !missing && self.changed_since_mapped(oid);
        if changed || (missing && self.rel_exists_now(relid)) {
            let remote = self.rel(relid).remote.clone();
            let map = self.map_relation(remote);
            self.rels.insert(relid, map);
        }
        if !self.rel(relid).missing {
            return true;
        }
        let recently_dropped = self.recently_dropped(relid);
        let detail = "the table does not exist on this node".to_string();
        self.conflict(
            Seen::of(
                ConflictType::TargetTableMissing,
                relid,
                &[],
                vals,
                vals,
                detail,
            )
            .deleting(),
            Facts {
                recently_dropped,
                ..Facts::default()
            },
        );
        false
    }

    pub(super) fn rel_exists_now(&mut self, relid: u32) -> bool {
        let q = format!(
            "SELECT pg_catalog.to_regclass({})::oid",
            bdr_core::quote::literal(&self.rel(relid).qualified)
        );
        let c = CString::new(q).unwrap_or_default();
        // SAFETY: a read-only query in the apply transaction's SPI connection.
        unsafe {
            spi_check(
                pg_sys::SPI_execute(c.as_ptr(), true, 1),
                "looking up a table",
            );
            first_datum_and_free().is_some()
        }
    }

    /// Whether a table of this name was dropped here within the last day.
    pub(super) fn recently_dropped(&mut self, relid: u32) -> bool {
        let (nsp, name) = {
            let r = self.rel(relid);
            (r.remote.schema.clone(), r.remote.name.clone())
        };
        if self.dropped_plan.is_null() {
            self.dropped_plan = keep_plan(
                crate::catalog::statements::RECENTLY_DROPPED,
                &mut [pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
            );
        }
        let window = format!("{} microseconds", conflict::RECENTLY_DROPPED_US);
        exec_texts(
            self.dropped_plan,
            &[Some(nsp), Some(name), Some(window)],
            self.row_cxt,
        )
        .is_some()
    }

    pub(super) fn rel(&mut self, relid: u32) -> &mut RelMap {
        rel_of(&mut self.rels, relid)
    }

    /// The replica identity columns to find a row by, and whether that is
    /// the whole row (REPLICA IDENTITY FULL without a key).
    pub(super) fn identity(&mut self, relid: u32, old: &[Value], what: &str) -> (Vec<usize>, bool) {
        let r = self.rel(relid);
        let (key, full) = if r.key.is_empty() && r.remote.replica_identity == b'f' {
            (
                (0..old.len())
                    .filter(|i| old[*i] != Value::UnchangedToast)
                    .collect(),
                true,
            )
        } else {
            (r.key.clone(), false)
        };
        if key.is_empty() {
            crate::fail!(
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "table {} has no replica identity; {what} cannot be applied",
                r.qualified
            );
        }
        (key, full)
    }

    /// The remote columns an insert or update sets here, after resolving the
    /// columns the two sides do not share: a column only the peer has is
    /// target_column_missing (by default ignored while its value is NULL,
    /// since a value would be lost), a column only this node has is
    /// source_column_missing (by default it keeps its default, or for an
    /// update its value). `None`: the row is not applied.
    pub(super) fn present_cols(
        &mut self,
        relid: u32,
        vals: &[Value],
        inserting: bool,
    ) -> Option<Vec<usize>> {
        let r = self.rel(relid);
        if r.source_missing.is_empty() && r.map.iter().all(Option::is_some) {
            // Both sides have the same columns: the usual case, per row.
            return Some(present(r, vals));
        }
        let (unmapped, source_missing, key): (Vec<(usize, String)>, Vec<String>, Vec<usize>) = {
            let r = self.rel(relid);
            (
                r.remote
                    .columns
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| r.map[*i].is_none())
                    .map(|(i, c)| (i, c.name.clone()))
                    .collect(),
                r.source_missing.clone(),
                r.key.clone(),
            )
        };
        for (i, name) in unmapped {
            let value_is_null = matches!(
                vals.get(i),
                None | Some(Value::Null) | Some(Value::UnchangedToast)
            );
            let resolver = self.config.resolver(ConflictType::TargetColumnMissing);
            if !flow::target_column_missing_reported(value_is_null, resolver) {
                continue;
            }
            let detail = format!(
                "column \"{name}\" exists on node {} but not on this node{}",
                self.remote_node_id,
                if value_is_null {
                    ""
                } else {
                    ", and the change sets it"
                }
            );
            let o = self.conflict(
                Seen::of(
                    ConflictType::TargetColumnMissing,
                    relid,
                    &key,
                    vals,
                    vals,
                    detail,
                ),
                Facts {
                    value_is_null,
                    ..Facts::default()
                },
            );
            if !flow::shape_conflict_goes_on(o) {
                return None;
            }
        }
        if !source_missing.is_empty() {
            let detail = format!(
                "column{} {} of this node {} not sent by node {}; {}",
                if source_missing.len() > 1 { "s" } else { "" },
                source_missing.join(", "),
                if source_missing.len() > 1 {
                    "are"
                } else {
                    "is"
                },
                self.remote_node_id,
                if inserting {
                    "the row gets their default values"
                } else {
                    "the update leaves them as they are"
                }
            );
            let o = self.conflict(
                Seen::of(
                    ConflictType::SourceColumnMissing,
                    relid,
                    &key,
                    vals,
                    vals,
                    detail,
                ),
                Facts::default(),
            );
            if !flow::shape_conflict_goes_on(o) {
                return None;
            }
        }
        Some(present(self.rel(relid), vals))
    }
}
