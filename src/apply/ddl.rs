//! A peer's DDL (`crate::ddl` queued it there): run here, in the remote
//! transaction's place in the stream, with the origin's search path and
//! role, in a subtransaction. A statement that fails is the
//! apply_error_ddl conflict: by default the apply stops (and retries) until
//! the DBA fixes the cause; `skip` leaves the statement out,
//! `skip_transaction` the whole remote transaction.

use super::*;
use crate::pg::xact::in_subtransaction_coded;
use bdr_core::ddl::{self as rules, DdlCommand};

/// Runs `cmd` as its role (as the writer if the role does not exist here),
/// then puts the writer's own role and search path back.
fn run(cmd: &DdlCommand) {
    let saved_path = Spi::get_one::<String>("SELECT pg_catalog.current_setting('search_path')")
        .ok()
        .flatten()
        .unwrap_or_default();
    Spi::run(&rules::search_path_sql(&cmd.search_path))
        .unwrap_or_else(|e| crate::fail!(ERRCODE_INTERNAL_ERROR, "{e}"));
    let role_exists = Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = $1)",
        &[cmd.role.as_str().into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if role_exists {
        Spi::run_with_args(
            "SELECT pg_catalog.set_config('role', $1, true)",
            &[cmd.role.as_str().into()],
        )
        .unwrap_or_else(|e| crate::fail!(ERRCODE_INTERNAL_ERROR, "{e}"));
    }
    let run = in_subtransaction_coded(|| Spi::run(&rules::without_concurrently(&cmd.sql)));
    // Back to the writer's own identity whatever happened.
    let _ = Spi::run("SELECT pg_catalog.set_config('role', 'none', true)");
    let _ = Spi::run(&rules::search_path_sql(&saved_path));
    match run {
        Ok(Ok(())) => {}
        Ok(Err(e)) => crate::fail!(ERRCODE_INTERNAL_ERROR, "{e}"),
        // Roles are the instance's: another database of this instance in
        // the group may have made the change already.
        Err((code, msg))
            if rules::is_role_command(&cmd.sql)
                && rules::role_state_matches(&format!("{code:?}")) =>
        {
            tracing::debug!("{msg}: the role is already as the statement wants it");
        }
        Err((code, msg)) => crate::error::raise_code(code, msg),
    }
}

impl Applier {
    pub(super) fn ddl(&mut self, content: &[u8]) {
        let Some(cmd) = DdlCommand::decode(content) else {
            crate::fail!(
                ERRCODE_PROTOCOL_VIOLATION,
                "bdr writer: a DDL message from node {} it cannot read",
                self.remote_node_id
            );
        };
        if let Err(msg) = in_subtransaction(|| run(&cmd)) {
            self.ddl_failed(&cmd, &msg);
        }
    }
}
