//! Conflict reporting: resolving a conflict with the node's resolver,
//! counting it, logging it to the server log and `bdr.conflict_history`,
//! and the stop of the apply when the resolver says `error`.

use super::*;
use crate::catalog::statements::{self, HISTORY_PARAMS};

/// A conflict as the writer met it, for resolving and logging.
pub(super) struct Seen<'a> {
    pub(super) t: ConflictType,
    pub(super) relid: u32,
    pub(super) index: Option<pg_sys::Oid>,
    /// The key (remote column indexes) and the values it is taken from.
    pub(super) key: &'a [usize],
    pub(super) key_vals: &'a [Value],
    /// The incoming row (for a DELETE, its key).
    pub(super) remote: Option<&'a [Value]>,
    pub(super) local: Option<&'a Found>,
    /// Applying means the incoming row becomes the local row (not a DELETE).
    pub(super) applies_row: bool,
    /// What to say about it in the server log.
    pub(super) detail: String,
}

impl<'a> Seen<'a> {
    /// Conflict `t` of the incoming row `remote` (for a DELETE, its key)
    /// into peer relation `relid`, looked up by remote columns `key` in
    /// `key_vals`, with no local row.
    pub(super) fn of(
        t: ConflictType,
        relid: u32,
        key: &'a [usize],
        key_vals: &'a [Value],
        remote: &'a [Value],
        detail: String,
    ) -> Seen<'a> {
        Seen {
            t,
            relid,
            index: None,
            key,
            key_vals,
            remote: Some(remote),
            local: None,
            applies_row: true,
            detail,
        }
    }

    /// Against the local row `local`, found through `index`.
    pub(super) fn against(self, index: Option<pg_sys::Oid>, local: &'a Found) -> Seen<'a> {
        self.against_any(index, Some(local))
    }

    pub(super) fn against_any(
        mut self,
        index: Option<pg_sys::Oid>,
        local: Option<&'a Found>,
    ) -> Seen<'a> {
        self.index = index;
        self.local = local;
        self
    }

    /// Applying it does not make the incoming row the local row (a DELETE,
    /// a change of a missing table).
    pub(super) fn deleting(mut self) -> Seen<'a> {
        self.applies_row = false;
        self
    }
}

/// A conflict whose resolver stops the apply: the writer rolls back, logs
/// it, and exits with this error; it retries from the same transaction.
pub struct Stop {
    pub message: String,
    pub hint: String,
    pub code: PgSqlErrorCode,
    pub(super) conflict_type: ConflictType,
    pub(super) history: Option<Vec<Option<String>>>,
}

impl Applier {
    /// Resolves a conflict with this node's resolver for its type, counts
    /// it, and logs it as configured. An `error` outcome stops the apply.
    pub(super) fn conflict(&mut self, s: Seen<'_>, mut facts: Facts) -> Outcome {
        if self.stop.is_some() {
            return Outcome::Error;
        }
        if let Some(local) = s.local {
            facts.remote_newer = remote_wins(self.remote_writer(), local.writer);
        }
        let resolver = self.config.resolver(s.t);
        let outcome = conflict::resolve(s.t, resolver, facts);
        self.counts.conflict(s.t);
        let logs = self.config.logs(s.t, outcome);
        let qualified = self.rel(s.relid).qualified.clone();
        let line = format!(
            "CONFLICT: {} on {} from node {} (transaction {} committed at {}, LSN {}): {}; resolver {}, resolution {}",
            s.t.name(),
            qualified,
            self.remote_node_id,
            self.remote_xid,
            timestamp_text(self.commit_ts),
            bdr_core::lsn::format(self.remote_final_lsn),
            s.detail,
            resolver.name(),
            outcome.resolution()
        );
        if logs && self.config.log_to_file {
            log!("{line}");
        }
        // Read-only, so the subtransaction takes no transaction id.
        let history = if logs && self.config.log_to_table {
            match in_subtransaction(|| self.history_row(&s, outcome)) {
                Ok(row) => Some(row),
                Err(msg) => {
                    warning!("could not describe a conflict for bdr.conflict_history: {msg}");
                    None
                }
            }
        } else {
            None
        };
        if outcome == Outcome::Error {
            let code = match s.t {
                ConflictType::MultipleUniqueConflicts
                | ConflictType::InsertExists
                | ConflictType::UpdatePkeyExists => PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
                ConflictType::TargetTableMissing => PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                ConflictType::TargetColumnMissing | ConflictType::SourceColumnMissing => {
                    PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN
                }
                _ => PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            };
            let sub = self.sub_id;
            self.stop = Some(Stop {
                message: line,
                hint: format!(
                    "Fix the local data and the writer resumes by itself; or change the resolver with bdr.alter_node_set_conflict_resolver(); or skip the transaction: bdr.alter_subscription_disable(), bdr.alter_subscription_skip_changes_upto(<subscription {sub}>, '{}'), bdr.alter_subscription_enable().",
                    bdr_core::lsn::format(self.remote_final_lsn)
                ),
                code,
                conflict_type: s.t,
                history,
            });
        } else if let Some(row) = history {
            self.pending_history.push(row);
        }
        outcome
    }

    /// The parameters of one `bdr.conflict_history` row, as text.
    pub(super) fn history_row(&mut self, s: &Seen<'_>, outcome: Outcome) -> Vec<Option<String>> {
        let (local_oid, nsp, rel) = {
            let r = self.rel(s.relid);
            (r.local_oid, r.remote.schema.clone(), r.remote.name.clone())
        };
        let key_json = if s.key.is_empty() {
            None
        } else {
            self.values_json(s.relid, s.key, s.key_vals)
        };
        let remote_json = s.remote.and_then(|v| {
            let cols: Vec<usize> = (0..v.len()).collect();
            self.values_json(s.relid, &cols, v)
        });
        let local_json = s.local.and_then(|f| self.local_json(s.relid, f.ctid));
        let apply_json = if outcome == Outcome::ApplyRemote && s.applies_row {
            remote_json.clone()
        } else {
            None
        };
        // SAFETY: WAL position and xid of the running apply transaction.
        let (xid, lsn) = unsafe {
            (
                pg_sys::GetTopTransactionIdIfAny(),
                pg_sys::GetXLogInsertRecPtr(),
            )
        };
        vec![
            Some(self.sub_id.to_string()),
            (xid != pg_sys::InvalidTransactionId).then(|| xid.into_inner().to_string()),
            Some(bdr_core::lsn::format(lsn)),
            Some(self.remote_xid.to_string()),
            Some(bdr_core::lsn::format(self.remote_final_lsn)),
            Some(self.commit_ts.to_string()),
            Some(s.t.name().to_string()),
            Some(outcome.resolution().to_string()),
            s.index.map(|i| i.to_u32().to_string()),
            (local_oid != pg_sys::InvalidOid).then(|| local_oid.to_u32().to_string()),
            Some(nsp),
            Some(rel),
            key_json,
            remote_json,
            local_json,
            apply_json,
            s.local.map(|f| f.xmin.to_string()),
            s.local
                .and_then(|f| f.writer)
                .map(|w| w.node_id.to_string()),
            s.local
                .and_then(|f| f.writer)
                .map(|w| w.commit_ts.to_string()),
        ]
    }

    pub(super) fn history_plan(&mut self) -> pg_sys::SPIPlanPtr {
        if self.history_plan.is_null() {
            self.history_plan = keep_plan(
                &statements::history_insert(),
                &mut [pg_sys::TEXTOID; HISTORY_PARAMS],
            );
        }
        self.history_plan
    }

    /// Writes the conflicts this transaction logged to `bdr.conflict_history`,
    /// in one subtransaction just before commit, so that a failure to log
    /// never undoes the applied changes.
    pub(super) fn flush_history(&mut self) {
        if self.pending_history.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut self.pending_history);
        let plan = self.history_plan();
        let cxt = self.row_cxt;
        // SAFETY: the inserts need a snapshot; popped right after.
        unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
        let r = in_subtransaction(|| {
            for row in &rows {
                exec_texts(plan, row, cxt);
            }
        });
        // SAFETY: pushed above; the subtransaction restored the stack.
        unsafe { pg_sys::PopActiveSnapshot() };
        // SAFETY: the per-row context holds only the insert's parameters.
        unsafe { pg_sys::MemoryContextReset(cxt) };
        if let Err(msg) = r {
            warning!(
                "could not record {} conflict(s) in bdr.conflict_history: {msg}; the changes are applied all the same",
                rows.len()
            );
        }
    }

    /// The values of remote columns `cols` as a JSON object (columns this
    /// node lacks as text), or NULL when there are none to show.
    pub(super) fn values_json(
        &mut self,
        relid: u32,
        cols: &[usize],
        vals: &[Value],
    ) -> Option<String> {
        let cols: Vec<usize> = cols
            .iter()
            .copied()
            .filter(|&i| vals.get(i).is_some_and(|v| *v != Value::UnchangedToast))
            .collect();
        if cols.is_empty() {
            return None;
        }
        let plan = self.plan(relid, PlanKey::Json(cols.clone()));
        let (mut datums, mut nulls) = self.datums(relid, &cols, vals);
        let (map, types): (Vec<Option<usize>>, Vec<u32>) = {
            let r = self.rel(relid);
            (
                r.map.clone(),
                r.remote.columns.iter().map(|c| c.type_oid).collect(),
            )
        };
        for (n, &i) in cols.iter().enumerate() {
            if map[i].is_some() {
                continue;
            }
            // A column this node lacks is shown as text. Binary values are
            // of built-in types, whose oids are the same on every node.
            let t = pg_sys::Oid::from(types[i]);
            // SAFETY: the type's own receive and output functions, in the
            // per-row context.
            let d = unsafe {
                let old = pg_sys::MemoryContextSwitchTo(self.row_cxt);
                let text = match vals.get(i) {
                    Some(Value::Text(v)) => Some(CString::new(v.as_str()).unwrap_or_default()),
                    Some(Value::Binary(b))
                        if types[i] != 0 && types[i] < pg_sys::FirstGenbkiObjectId =>
                    {
                        let (mut recv, mut param, mut out, mut varlena) = (
                            pg_sys::InvalidOid,
                            pg_sys::InvalidOid,
                            pg_sys::InvalidOid,
                            false,
                        );
                        pg_sys::getTypeBinaryInputInfo(t, &mut recv, &mut param);
                        pg_sys::getTypeOutputInfo(t, &mut out, &mut varlena);
                        let buf = pg_sys::makeStringInfo();
                        pg_sys::appendBinaryStringInfo(buf, b.as_ptr() as *const _, b.len() as i32);
                        let v = pg_sys::OidReceiveFunctionCall(recv, buf, param, -1);
                        Some(CStr::from_ptr(pg_sys::OidOutputFunctionCall(out, v)).to_owned())
                    }
                    _ => None,
                };
                let d = text.map(|c| pg_sys::Datum::from(pg_sys::cstring_to_text(c.as_ptr())));
                pg_sys::MemoryContextSwitchTo(old);
                d
            };
            if let Some(d) = d {
                datums[n] = d;
                nulls[n] = b' ' as std::ffi::c_char;
            }
        }
        // SAFETY: a kept plan with matching parameters.
        unsafe {
            spi_check(
                pg_sys::SPI_execute_plan(plan, datums.as_mut_ptr(), nulls.as_ptr(), false, 1),
                "describing a row",
            );
            first_text_and_free()
        }
    }

    /// The local row at `ctid` as JSON.
    pub(super) fn local_json(&mut self, relid: u32, ctid: Tid) -> Option<String> {
        let plan = self.plan(relid, PlanKey::LocalJson);
        exec_at_tid(plan, ctid, 1, "describing a local row");
        // SAFETY: right after the execution above.
        unsafe { first_text_and_free() }
    }

    /// The stop a conflict asked for, if any.
    pub fn take_stop(&mut self) -> Option<Stop> {
        self.stop.take()
    }

    /// Rolls back the transaction a stop interrupted and records the
    /// conflict in its own transaction (once per remote transaction and
    /// type, however often the writer retries it).
    pub fn abort_for(&mut self, stop: &Stop) {
        let history = stop.history.clone();
        let plan = history.as_ref().map(|_| self.history_error_plan());
        // SAFETY: aborts the apply transaction (SPI is cleaned up with it);
        // the history row is written in a transaction without the peer's
        // origin, so that origin progress does not move.
        unsafe {
            pg_sys::AbortCurrentTransaction();
            self.in_txn = false;
            if let (Some(row), Some(plan)) = (history, plan) {
                let origin = pg_sys::replorigin_session_origin;
                pg_sys::replorigin_session_origin = 0;
                pg_sys::StartTransactionCommand();
                pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
                spi_check(pg_sys::SPI_connect(), "connecting to SPI");
                exec_texts(plan, &row, self.row_cxt);
                pg_sys::SPI_finish();
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
                pg_sys::replorigin_session_origin = origin;
                pg_sys::MemoryContextReset(self.row_cxt);
            }
        }
        // The conflict that stopped the apply counts once, not per retry;
        // the others of this attempt count when the transaction commits.
        let lsn = self.remote_final_lsn;
        let t = stop.conflict_type;
        stats::update(self.dboid, self.sub_id, |s| {
            s.nabort += 1;
            if s.last_failed_lsn != lsn {
                s.conflicts[t as usize] += 1;
            }
        });
    }

    /// A peer's DDL failed here (apply_error_ddl): resolved like any
    /// conflict, logged with the statement and the error; `error` stops
    /// the apply, `skip` leaves the statement out, `skip_transaction` the
    /// remote transaction.
    pub(super) fn ddl_failed(&mut self, cmd: &bdr_core::ddl::DdlCommand, error: &str) -> Outcome {
        if self.stop.is_some() {
            return Outcome::Error;
        }
        let t = ConflictType::ApplyErrorDdl;
        let resolver = self.config.resolver(t);
        let outcome = conflict::resolve(t, resolver, Facts::default());
        self.counts.conflict(t);
        let line = format!(
            "CONFLICT: {} from node {} (transaction {} committed at {}, LSN {}): {}: {error}; resolver {}, resolution {}",
            t.name(),
            self.remote_node_id,
            self.remote_xid,
            timestamp_text(self.commit_ts),
            bdr_core::lsn::format(self.remote_final_lsn),
            cmd.sql,
            resolver.name(),
            outcome.resolution()
        );
        let logs = self.config.logs(t, outcome);
        if logs && self.config.log_to_file {
            log!("{line}");
        }
        let statement = serde_json::json!({ "command": cmd.sql, "error": error, "role": cmd.role, "search_path": cmd.search_path });
        // SAFETY: WAL position and xid of the running apply transaction.
        let (xid, lsn) = unsafe {
            (
                pg_sys::GetTopTransactionIdIfAny(),
                pg_sys::GetXLogInsertRecPtr(),
            )
        };
        let mut row: Vec<Option<String>> = vec![None; HISTORY_PARAMS];
        row[0] = Some(self.sub_id.to_string());
        row[1] = (xid != pg_sys::InvalidTransactionId).then(|| xid.into_inner().to_string());
        row[2] = Some(bdr_core::lsn::format(lsn));
        row[3] = Some(self.remote_xid.to_string());
        row[4] = Some(bdr_core::lsn::format(self.remote_final_lsn));
        row[5] = Some(self.commit_ts.to_string());
        row[6] = Some(t.name().to_string());
        row[7] = Some(outcome.resolution().to_string());
        row[13] = Some(statement.to_string());
        let history = (logs && self.config.log_to_table).then_some(row);
        match outcome {
            Outcome::Error => {
                self.stop = Some(Stop {
                    message: line,
                    hint: "Fix the cause on this node (for example create what the statement needs), and the writer runs it again by itself; or set the resolver of apply_error_ddl to skip with bdr.alter_node_set_conflict_resolver().".into(),
                    code: PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    conflict_type: t,
                    history,
                });
            }
            _ => {
                if resolver == bdr_core::conflict::Resolver::SkipTransaction {
                    self.discard_txn = true;
                }
                if let Some(row) = history {
                    self.pending_history.push(row);
                }
            }
        }
        outcome
    }

    pub(super) fn history_error_plan(&mut self) -> pg_sys::SPIPlanPtr {
        // Kept plans outlive the aborted transaction.
        keep_plan(
            &statements::history_insert_error_once(),
            &mut [pg_sys::TEXTOID; HISTORY_PARAMS],
        )
    }
}
