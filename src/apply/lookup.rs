//! Finding the local row an incoming change meets, and who last wrote it
//! (commit timestamp and node, from its xmin's origin, or the real writer
//! a join copied).

use super::*;

/// The local row an incoming change meets.
pub(super) struct Found {
    pub(super) ctid: pg_sys::ItemPointerData,
    pub(super) xmin: u32,
    pub(super) writer: Option<Writer>,
}

pub(super) use bdr_core::time::COPIED_COMMIT_TS;

impl Applier {
    /// The node that made the local row's last write, from its origin.
    pub(super) fn node_of_origin(&mut self, roident: u16) -> u32 {
        if roident == 0 || roident as u32 == pg_sys::DoNotReplicateId {
            return self.local_node_id;
        }
        if let Some(n) = self.origin_nodes.get(&roident) {
            return *n;
        }
        let q = CString::new(format!(
            "SELECT CASE WHEN {} THEN {} ELSE s.origin_node_id END
               FROM pg_catalog.pg_replication_origin o
               LEFT JOIN bdr.subscription s ON s.origin_name = o.roname WHERE o.roident = {roident}",
            bdr_core::hlc::local_origin_sql("o.roname"),
            self.local_node_id
        ))
        .unwrap_or_default();
        // SAFETY: read-only query inside the apply transaction's SPI connection.
        let node = unsafe {
            spi_check(
                pg_sys::SPI_execute(q.as_ptr(), true, 1),
                "looking up an origin",
            );
            let n = if pg_sys::SPI_processed == 0 {
                0
            } else {
                let mut isnull = false;
                let d = pg_sys::SPI_getbinval(
                    *(*pg_sys::SPI_tuptable).vals,
                    (*pg_sys::SPI_tuptable).tupdesc,
                    1,
                    &mut isnull,
                );
                if isnull {
                    0
                } else {
                    d.value() as u32
                }
            };
            if !pg_sys::SPI_tuptable.is_null() {
                pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
            }
            n
        };
        self.origin_nodes.insert(roident, node);
        node
    }

    pub(super) fn remote_writer(&self) -> Writer {
        Writer {
            commit_ts: self.commit_ts,
            node_id: self.remote_node_id,
        }
    }

    /// Local rows other than `except` that hold the incoming row's values
    /// in a unique index other than the key's, each with the index.
    pub(super) fn unique_collisions(
        &mut self,
        relid: u32,
        new: &[Value],
        except: Option<pg_sys::ItemPointerData>,
    ) -> Vec<(pg_sys::Oid, Found)> {
        let checks: Vec<(pg_sys::Oid, Vec<usize>)> = self
            .rel(relid)
            .uniques
            .iter()
            .filter(|u| {
                u.cols.iter().all(|&i| {
                    !matches!(
                        new.get(i),
                        None | Some(Value::Null) | Some(Value::UnchangedToast)
                    )
                })
            })
            .map(|u| (u.oid, u.cols.clone()))
            .collect();
        let mut found: Vec<(pg_sys::Oid, Found)> = Vec::new();
        for (oid, cols) in checks {
            if let Some(f) = self.find(relid, &cols, new, false, false) {
                if except.is_some_and(|e| same_tid(&e, &f.ctid))
                    || found.iter().any(|(_, g)| same_tid(&g.ctid, &f.ctid))
                {
                    continue;
                }
                found.push((oid, f));
            }
        }
        found
    }

    /// The key columns of the local row at `ctid`, as text values placed at
    /// their remote column indexes.
    pub(super) fn key_values_at(&mut self, relid: u32, key: &[usize], ctid: Tid) -> Vec<Value> {
        let plan = self.plan(relid, PlanKey::KeyAt);
        let n = self.rel(relid).remote.columns.len();
        let mut vals = vec![Value::Null; n];
        exec_at_tid(plan, ctid, 1, "reading a local key");
        // SAFETY: the one result row is read (and its strings freed) before
        // the result is freed.
        unsafe {
            let tt = pg_sys::SPI_tuptable;
            if !tt.is_null() && pg_sys::SPI_processed > 0 {
                for (j, &i) in key.iter().enumerate() {
                    let p = pg_sys::SPI_getvalue(*(*tt).vals, (*tt).tupdesc, j as i32 + 1);
                    if !p.is_null() {
                        vals[i] = Value::Text(CStr::from_ptr(p).to_string_lossy().into_owned());
                        pg_sys::pfree(p as *mut std::ffi::c_void);
                    }
                }
            }
            if !tt.is_null() {
                pg_sys::SPI_freetuptable(tt);
            }
        }
        vals
    }

    /// "written by node N at T" for log lines.
    pub(super) fn local_desc(&mut self, f: &Found) -> String {
        match f.writer {
            Some(w) => format!(
                "the local row was last written by node {} at {}",
                w.node_id,
                timestamp_text(w.commit_ts)
            ),
            None => "the local row's last writer is unknown (frozen or older than track_commit_timestamp)".into(),
        }
    }

    /// Finds the local row with `vals` in remote columns `key` (the whole
    /// row when `full`) and locks it. `lock_if_missing`: when it is missing
    /// and has a key, locks the key and looks again, so that what is decided
    /// about a missing row is decided by one writer at a time and sees the
    /// others' committed work.
    pub(super) fn find(
        &mut self,
        relid: u32,
        key: &[usize],
        vals: &[Value],
        full: bool,
        lock_if_missing: bool,
    ) -> Option<Found> {
        let plan = self.plan(relid, PlanKey::Find(key.to_vec(), full));
        let (mut datums, nulls) = self.datums(relid, key, vals);
        let mut lock = lock_if_missing && !full;
        let (ctid, ts, ro, xmin) = loop {
            // SAFETY: executes a kept plan with as many datums as it has
            // parameters; reads the one result row before freeing it.
            let found = unsafe {
                spi_check(
                    pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 1),
                    "finding a row",
                );
                if pg_sys::SPI_processed == 0 {
                    if !pg_sys::SPI_tuptable.is_null() {
                        pg_sys::SPI_freetuptable(pg_sys::SPI_tuptable);
                    }
                    None
                } else {
                    let tt = pg_sys::SPI_tuptable;
                    let tup = *(*tt).vals;
                    let desc = (*tt).tupdesc;
                    let mut isnull = false;
                    let ctid_d = pg_sys::SPI_getbinval(tup, desc, 1, &mut isnull);
                    let ctid = *(ctid_d.cast_mut_ptr::<pg_sys::ItemPointerData>());
                    let xmin = pg_sys::SPI_getbinval(tup, desc, 2, &mut isnull);
                    pg_sys::SPI_freetuptable(tt);
                    let (ts, ro) = commit_ts_of(xmin);
                    Some((ctid, ts, ro, xmin.value() as u32))
                }
            };
            match found {
                Some(f) => break f,
                None if lock && self.lock_key(relid, key, vals) => lock = false,
                None => return None,
            }
        };
        let mut writer = ts.map(|commit_ts| Writer {
            commit_ts,
            node_id: self.node_of_origin(ro),
        });
        if ts == Some(COPIED_COMMIT_TS) && !full {
            // A row a join copied here: its real writer was copied too.
            let key_vals;
            let (key_cols, vals) = if key == self.rel(relid).key.as_slice() {
                (key.to_vec(), vals)
            } else {
                let k = self.rel(relid).key.clone();
                key_vals = self.key_values_at(relid, &k, ctid);
                (k, key_vals.as_slice())
            };
            if !key_cols.is_empty() {
                writer = self.copied_writer(relid, &key_cols, vals, false).flatten();
            }
        }
        Some(Found { ctid, xmin, writer })
    }

    /// The real writer of a row (or, `deleted`, of a delete) a join copied
    /// here, from `bdr.copied_row`: `None` when there is no such entry,
    /// `Some(None)` when its writer was not known either.
    pub(super) fn copied_writer(
        &mut self,
        relid: u32,
        key: &[usize],
        vals: &[Value],
        deleted: bool,
    ) -> Option<Option<Writer>> {
        let text = self.key_text(relid, key, vals);
        let local_oid = self.rel(relid).local_oid;
        if self.copied_plan.is_null() {
            self.copied_plan = keep_plan(
                crate::catalog::statements::COPIED_ROW_WRITER,
                &mut [pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TEXTOID],
            );
        }
        let params = [
            Some(local_oid.to_u32().to_string()),
            Some(text),
            Some(deleted.to_string()),
        ];
        let row = exec_texts(self.copied_plan, &params, self.row_cxt);
        let row = row?;
        let mut it = row.split(' ');
        let ts = it.next().and_then(|t| t.parse::<i64>().ok());
        let node = it.next().and_then(|n| n.parse::<u32>().ok()).unwrap_or(0);
        Some(ts.map(|commit_ts| Writer {
            commit_ts,
            node_id: node,
        }))
    }
}
