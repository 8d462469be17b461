//! The SPI back-end: every row read and write the writer makes, as kept
//! plans per (relation, column set), and the SPI helpers they share.

use super::*;

/// When and where the transaction `xid` (an xmin datum) committed; no
/// timestamp for frozen or too old transactions, or our own uncommitted one.
pub(super) fn commit_ts_of(xid: pg_sys::Datum) -> (Option<i64>, u16) {
    let xid = pg_sys::TransactionId::from(xid.value() as u32);
    let mut ts: pg_sys::TimestampTz = 0;
    let mut origin: pg_sys::RepOriginId = 0;
    // SAFETY: reads the commit timestamp SLRU; xmin of a visible row is valid.
    let found = unsafe { pg_sys::TransactionIdGetCommitTsData(xid, &mut ts, &mut origin) };
    if found && ts != 0 {
        (Some(ts), origin)
    } else {
        (None, 0)
    }
}

/// The first column of the first row of the last SPI result (by-value
/// columns only). Frees the result, which would otherwise be kept to the end
/// of the transaction even when it has no rows.
///
/// # Safety
/// Right after an SPI execution in this SPI connection.
pub(super) unsafe fn first_datum_and_free() -> Option<pg_sys::Datum> {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let tt = pg_sys::SPI_tuptable;
        if tt.is_null() {
            return None;
        }
        let first = if pg_sys::SPI_processed == 0 || (*(*tt).tupdesc).natts < 1 {
            None
        } else {
            let mut isnull = false;
            let d = pg_sys::SPI_getbinval(*(*tt).vals, (*tt).tupdesc, 1, &mut isnull);
            (!isnull).then_some(d)
        };
        pg_sys::SPI_freetuptable(tt);
        first
    }
}

/// Runs kept plan `plan`, whose one parameter is a tid, for the row at
/// `ctid`, returning at most `max_rows` rows; the result is in
/// SPI_tuptable.
pub(super) fn exec_at_tid(plan: pg_sys::SPIPlanPtr, mut ctid: Tid, max_rows: i64, what: &str) {
    let mut datums = [pg_sys::Datum::from(&mut ctid as *mut Tid)];
    let nulls = [b' ' as std::ffi::c_char];
    // SAFETY: a kept plan with one tid parameter; `ctid` outlives the call.
    unsafe {
        spi_check(
            pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, max_rows),
            what,
        )
    };
}

/// A PostgreSQL timestamp as text, for log lines.
pub(super) fn timestamp_text(ts: i64) -> String {
    // SAFETY: formats a timestamp value; returns a palloc'd C string.
    unsafe { std::ffi::CStr::from_ptr(pg_sys::timestamptz_to_str(ts)) }
        .to_string_lossy()
        .into_owned()
}

/// Prepares and keeps a statement for the life of the writer.
pub(super) fn keep_plan(sql: &str, types: &mut [pg_sys::Oid]) -> pg_sys::SPIPlanPtr {
    let c = CString::new(sql).unwrap_or_default();
    // SAFETY: prepared inside the apply transaction's SPI connection and kept.
    unsafe {
        let p = pg_sys::SPI_prepare(c.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if p.is_null() {
            crate::fail!(
                ERRCODE_INTERNAL_ERROR,
                "bdr writer: could not prepare: {sql}"
            );
        }
        pg_sys::SPI_keepplan(p);
        p
    }
}

pub(super) fn spi_check(rc: i32, what: &str) {
    if rc < 0 {
        crate::fail!(
            ERRCODE_INTERNAL_ERROR,
            "bdr writer: SPI failed ({rc}) while {what}"
        );
    }
}

/// Runs a kept plan whose parameters are all text (NULL for `None`);
/// returns the first column of its first row as text. Parameter values are
/// made in `cxt`.
pub(super) fn exec_texts(
    plan: pg_sys::SPIPlanPtr,
    params: &[Option<String>],
    cxt: pg_sys::MemoryContext,
) -> Option<String> {
    // SAFETY: text datums built in `cxt`; a kept plan with as many text
    // parameters; the result row is read before it is freed.
    unsafe {
        let old = pg_sys::MemoryContextSwitchTo(cxt);
        let mut args: Vec<pg_sys::Datum> = Vec::with_capacity(params.len());
        let mut nulls: Vec<std::ffi::c_char> = Vec::with_capacity(params.len());
        for p in params {
            match p {
                Some(v) => {
                    let c = CString::new(v.as_str()).unwrap_or_default();
                    args.push(pg_sys::Datum::from(pg_sys::cstring_to_text(c.as_ptr())));
                    nulls.push(b' ' as std::ffi::c_char);
                }
                None => {
                    args.push(pg_sys::Datum::from(0));
                    nulls.push(b'n' as std::ffi::c_char);
                }
            }
        }
        pg_sys::MemoryContextSwitchTo(old);
        spi_check(
            pg_sys::SPI_execute_plan(plan, args.as_mut_ptr(), nulls.as_ptr(), false, 1),
            "running a bdr statement",
        );
        first_text_and_free()
    }
}

/// The first column of the first row of the last SPI result as text.
///
/// # Safety
/// Right after an SPI execution in this SPI connection.
pub(super) unsafe fn first_text_and_free() -> Option<String> {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let tt = pg_sys::SPI_tuptable;
        if tt.is_null() {
            return None;
        }
        let v = if pg_sys::SPI_processed == 0 {
            None
        } else {
            let p = pg_sys::SPI_getvalue(*(*tt).vals, (*tt).tupdesc, 1);
            (!p.is_null()).then(|| {
                let s = CStr::from_ptr(p).to_string_lossy().into_owned();
                pg_sys::pfree(p as *mut std::ffi::c_void);
                s
            })
        };
        pg_sys::SPI_freetuptable(tt);
        v
    }
}

pub(super) fn same_tid(a: &pg_sys::ItemPointerData, b: &pg_sys::ItemPointerData) -> bool {
    a.ip_blkid.bi_hi == b.ip_blkid.bi_hi
        && a.ip_blkid.bi_lo == b.ip_blkid.bi_lo
        && a.ip_posid == b.ip_posid
}

/// A relation name for log lines and the history.
pub(super) fn relname_of(oid: pg_sys::Oid) -> Option<String> {
    // SAFETY: returns NULL for an oid that is no relation.
    let p = unsafe { pg_sys::get_rel_name(oid) };
    (!p.is_null()).then(|| {
        // SAFETY: a palloc'd C string, freed once copied.
        unsafe {
            let s = CStr::from_ptr(p).to_string_lossy().into_owned();
            pg_sys::pfree(p as *mut std::ffi::c_void);
            s
        }
    })
}

impl Applier {
    /// Runs a kept plan that takes (oid, text); returns the first column of
    /// its first row, if it returned one.
    pub(super) fn exec_oid_text(
        &self,
        plan: pg_sys::SPIPlanPtr,
        oid: pg_sys::Oid,
        text: &str,
        what: &str,
    ) -> Option<pg_sys::Datum> {
        let ctext = CString::new(text).unwrap_or_default();
        // SAFETY: a kept plan with an oid and a text parameter; the text
        // datum is built in the per-row context; the result row is read
        // before it is freed.
        unsafe {
            let old = pg_sys::MemoryContextSwitchTo(self.row_cxt);
            let mut args = [
                pg_sys::Datum::from(oid),
                pg_sys::Datum::from(pg_sys::cstring_to_text(ctext.as_ptr())),
            ];
            pg_sys::MemoryContextSwitchTo(old);
            spi_check(
                pg_sys::SPI_execute_plan(plan, args.as_mut_ptr(), std::ptr::null(), false, 1),
                what,
            );
            first_datum_and_free()
        }
    }

    /// Runs a kept plan that takes one oid; returns the first column of
    /// its first row, if any.
    pub(super) fn exec_oid(
        &self,
        plan: pg_sys::SPIPlanPtr,
        oid: pg_sys::Oid,
        what: &str,
    ) -> Option<pg_sys::Datum> {
        let mut args = [pg_sys::Datum::from(oid)];
        // SAFETY: a kept plan with one oid parameter, run in the apply
        // transaction's SPI connection.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, args.as_mut_ptr(), std::ptr::null(), false, 1),
                what,
            );
            first_datum_and_free()
        }
    }

    /// Remote values as local datums, for the given remote columns.
    pub(super) fn datums(
        &mut self,
        relid: u32,
        cols: &[usize],
        vals: &[Value],
    ) -> (Vec<pg_sys::Datum>, Vec<std::ffi::c_char>) {
        let row_cxt = self.row_cxt;
        datums(self.rel(relid), cols, vals, row_cxt)
    }

    pub(super) fn plan(&mut self, relid: u32, key: PlanKey) -> pg_sys::SPIPlanPtr {
        plan(self.rel(relid), key)
    }
}

/// Converts remote values to local datums for the given remote columns.
pub(super) fn datums(
    r: &RelMap,
    cols: &[usize],
    vals: &[Value],
    row_cxt: pg_sys::MemoryContext,
) -> (Vec<pg_sys::Datum>, Vec<std::ffi::c_char>) {
    let mut datums = Vec::with_capacity(cols.len() + 1);
    let mut nulls = Vec::with_capacity(cols.len() + 1);
    // SPI calls leave the SPI procedure context current, which lives to
    // the remote commit; values belong to the row, reset after it.
    // SAFETY: switched back below.
    let old_cxt = unsafe { pg_sys::MemoryContextSwitchTo(row_cxt) };
    for &i in cols {
        let Some(li) = r.map[i] else {
            datums.push(pg_sys::Datum::from(0));
            nulls.push(b'n' as std::ffi::c_char);
            continue;
        };
        let l = &r.local[li];
        let v = vals.get(i).unwrap_or(&Value::Null);
        // SAFETY: type input/receive functions of the local column's type,
        // called with NUL-terminated text or a StringInfo over the bytes.
        let d = unsafe {
            match v {
                Value::Null | Value::UnchangedToast => None,
                Value::Text(s) => {
                    let c = CString::new(s.as_str()).unwrap_or_default();
                    Some(pg_sys::OidInputFunctionCall(
                        l.input,
                        c.as_ptr() as *mut _,
                        l.input_param,
                        l.typmod,
                    ))
                }
                Value::Binary(b) => {
                    if r.remote.columns[i].type_oid != l.typid.to_u32() {
                        crate::fail!(
                            ERRCODE_DATATYPE_MISMATCH,
                            "column \"{}\" of {} has type {} here but another type on the peer",
                            l.name,
                            r.qualified,
                            l.typid.to_u32()
                        );
                    }
                    let buf = pg_sys::makeStringInfo();
                    pg_sys::appendBinaryStringInfo(buf, b.as_ptr() as *const _, b.len() as i32);
                    let d = pg_sys::OidReceiveFunctionCall(l.recv, buf, l.recv_param, l.typmod);
                    if (*buf).cursor != (*buf).len {
                        pgrx::ereport!(
                            ERROR,
                            PgSqlErrorCode::ERRCODE_INVALID_BINARY_REPRESENTATION,
                            format!(
                                "incorrect binary data format in column \"{}\" of {}",
                                l.name, r.qualified
                            )
                        );
                    }
                    Some(d)
                }
            }
        };
        match d {
            Some(d) => {
                datums.push(d);
                nulls.push(b' ' as std::ffi::c_char);
            }
            None => {
                datums.push(pg_sys::Datum::from(0));
                nulls.push(b'n' as std::ffi::c_char);
            }
        }
    }
    // SAFETY: restores the context switched from above.
    unsafe { pg_sys::MemoryContextSwitchTo(old_cxt) };
    (datums, nulls)
}

/// The kept plan of statement `key` on `r`, prepared at first use.
pub(super) fn plan(r: &mut RelMap, key: PlanKey) -> pg_sys::SPIPlanPtr {
    if let Some(p) = r.plans.get(&key) {
        return *p;
    }
    let col = |i: usize| -> (&str, pg_sys::Oid) {
        match r.map[i] {
            Some(li) => (r.local[li].name.as_str(), r.local[li].typid),
            None => crate::fail!(
                ERRCODE_UNDEFINED_COLUMN,
                "column \"{}\" of {} exists on the peer but not on this node",
                r.remote.columns[i].name,
                r.qualified
            ),
        }
    };
    let mut types: Vec<pg_sys::Oid> = Vec::new();
    let sql = match &key {
        PlanKey::Find(cols, full) => {
            let conds: Vec<String> = cols
                .iter()
                .enumerate()
                .map(|(n, &i)| {
                    let (name, t) = col(i);
                    types.push(t);
                    let op = if *full { "IS NOT DISTINCT FROM" } else { "=" };
                    format!("{} {op} ${}", ident(name), n + 1)
                })
                .collect();
            format!(
                // The commit timestamp is looked up from the xmin of the row
                // version we locked: a join here would, after waiting for a
                // concurrent writer, pair the new version with the old
                // version's timestamp.
                "SELECT t.ctid, t.xmin FROM ONLY {} t WHERE {} LIMIT 1 FOR UPDATE",
                r.qualified,
                conds.join(" AND ")
            )
        }
        PlanKey::Insert(cols) => {
            let names: Vec<String> = cols
                .iter()
                .map(|&i| {
                    let (name, t) = col(i);
                    types.push(t);
                    ident(name)
                })
                .collect();
            let params: Vec<String> = (1..=cols.len()).map(|n| format!("${n}")).collect();
            format!(
                "INSERT INTO {} ({}) OVERRIDING SYSTEM VALUE VALUES ({}) ON CONFLICT DO NOTHING RETURNING ctid",
                r.qualified,
                names.join(", "),
                params.join(", ")
            )
        }
        PlanKey::Update(cols) => {
            // An identity column GENERATED ALWAYS cannot be set by UPDATE
            // (its value does not change but by SET ... DEFAULT, which the
            // origin's row already holds): its parameter stays unused.
            let always = |i: usize| r.map[i].is_some_and(|li| r.local[li].identity_always);
            let mut sets: Vec<String> = cols
                .iter()
                .enumerate()
                .filter_map(|(n, &i)| {
                    let (name, t) = col(i);
                    types.push(t);
                    (!always(i)).then(|| format!("{} = ${}", ident(name), n + 1))
                })
                .collect();
            if sets.is_empty() {
                if let Some(c) = r.local.iter().find(|c| !c.identity_always) {
                    sets.push(format!("{0} = {0}", ident(&c.name)));
                }
            }
            types.push(pg_sys::TIDOID);
            format!(
                "UPDATE ONLY {} SET {} WHERE ctid = ${}",
                r.qualified,
                sets.join(", "),
                cols.len() + 1
            )
        }
        PlanKey::Delete => {
            types.push(pg_sys::TIDOID);
            format!("DELETE FROM ONLY {} WHERE ctid = $1", r.qualified)
        }
        PlanKey::KeyAt => {
            types.push(pg_sys::TIDOID);
            let cols: Vec<String> = r
                .key
                .iter()
                .map(|&i| format!("{}::text", ident(col(i).0)))
                .collect();
            format!(
                "SELECT {} FROM ONLY {} WHERE ctid = $1",
                cols.join(", "),
                r.qualified
            )
        }
        PlanKey::LocalJson => {
            types.push(pg_sys::TIDOID);
            format!(
                "SELECT pg_catalog.to_json(t)::text FROM ONLY {} t WHERE ctid = $1",
                r.qualified
            )
        }
        PlanKey::Json(cols) => {
            // json_build_object takes at most 100 arguments: objects of
            // 50 columns are merged.
            let pairs: Vec<String> = cols
                .iter()
                .enumerate()
                .map(|(n, &i)| {
                    let t = match r.map[i] {
                        Some(li) => r.local[li].typid,
                        None => pg_sys::TEXTOID,
                    };
                    types.push(t);
                    format!(
                        "{}, ${}",
                        bdr_core::quote::literal(&r.remote.columns[i].name),
                        n + 1
                    )
                })
                .collect();
            let objects: Vec<String> = pairs
                .chunks(50)
                .map(|c| format!("pg_catalog.jsonb_build_object({})", c.join(", ")))
                .collect();
            if objects.len() == 1 {
                format!(
                    "SELECT pg_catalog.json_build_object({})::text",
                    pairs.join(", ")
                )
            } else {
                format!("SELECT ({})::text", objects.join(" || "))
            }
        }
    };
    let c = CString::new(sql).unwrap_or_default();
    // SAFETY: prepared inside the apply transaction's SPI connection and
    // kept, so it outlives the transaction; freed when the RelMap goes.
    let plan = unsafe {
        let p = pg_sys::SPI_prepare(c.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if p.is_null() {
            crate::fail!(
                ERRCODE_INTERNAL_ERROR,
                "bdr writer: could not prepare a statement for {}",
                r.qualified
            );
        }
        pg_sys::SPI_keepplan(p);
        p
    };
    r.plans.insert(key, plan);
    plan
}

/// The SPI back-end: each row change is a kept, prepared statement on the
/// table (`plan`), so that it goes through the executor: constraints,
/// indexes, triggers the DBA enabled for replicas, and row locks, as a
/// local statement would.
pub(super) struct SpiRows {
    /// Per-row memory for the datums, reset after each change.
    pub(super) row_cxt: pg_sys::MemoryContext,
}

impl RowWriter for SpiRows {
    /// Inserts the row and returns where it went; `None` if a unique
    /// constraint already holds its key.
    fn insert(&mut self, r: &mut RelMap, cols: &[usize], new: &[Value]) -> Option<Tid> {
        let plan = plan(r, PlanKey::Insert(cols.to_vec()));
        let (mut datums, nulls) = datums(r, cols, new, self.row_cxt);
        // SAFETY: a kept plan with matching parameters; the one result row
        // (RETURNING ctid) is read before it is freed.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 0),
                "inserting a row",
            );
            let tt = pg_sys::SPI_tuptable;
            let ctid = (pg_sys::SPI_processed == 1 && !tt.is_null()).then(|| {
                let mut isnull = false;
                let d = pg_sys::SPI_getbinval(*(*tt).vals, (*tt).tupdesc, 1, &mut isnull);
                *(d.cast_mut_ptr::<pg_sys::ItemPointerData>())
            });
            if !tt.is_null() {
                pg_sys::SPI_freetuptable(tt);
            }
            ctid
        }
    }

    fn update(&mut self, r: &mut RelMap, mut ctid: Tid, cols: &[usize], new: &[Value]) {
        let plan = plan(r, PlanKey::Update(cols.to_vec()));
        let (mut datums, mut nulls) = datums(r, cols, new, self.row_cxt);
        datums.push(pg_sys::Datum::from(
            &mut ctid as *mut pg_sys::ItemPointerData,
        ));
        nulls.push(b' ' as std::ffi::c_char);
        // SAFETY: a kept plan with matching parameters; `ctid` outlives the call.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 0),
                "updating a row",
            )
        };
    }

    fn delete(&mut self, r: &mut RelMap, ctid: Tid) {
        exec_at_tid(plan(r, PlanKey::Delete), ctid, 0, "deleting a row");
    }
}
