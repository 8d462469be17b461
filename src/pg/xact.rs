//! Transactions and subtransactions.

use pgrx::pg_sys;

/// Runs `f` in a subtransaction: on an ERROR it is rolled back and the
/// error's message returned, and the enclosing transaction goes on.
pub fn in_subtransaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    in_subtransaction_coded(f).map_err(|(_, msg)| msg)
}

/// As `in_subtransaction`, with the error's SQLSTATE.
pub fn in_subtransaction_coded<R>(
    f: impl FnOnce() -> R,
) -> Result<R, (pgrx::PgSqlErrorCode, String)> {
    // SAFETY: the pattern of PL/pgSQL's exception blocks: memory context and
    // resource owner are restored on both paths; pgrx has copied and flushed
    // the error before the catch closure runs.
    unsafe {
        let old_cxt = pg_sys::CurrentMemoryContext;
        let old_owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(old_cxt);
        let f = std::panic::AssertUnwindSafe(f);
        let r = pgrx::PgTryBuilder::new(move || {
            let f = f;
            Ok((f.0)())
        })
        .catch_others(|e| {
            let r = crate::error::caught_report(&e);
            Err((r.sql_error_code(), r.message().to_string()))
        })
        .execute();
        match r {
            Ok(_) => pg_sys::ReleaseCurrentSubTransaction(),
            Err(_) => pg_sys::RollbackAndReleaseCurrentSubTransaction(),
        }
        pg_sys::MemoryContextSwitchTo(old_cxt);
        pg_sys::CurrentResourceOwner = old_owner;
        r
    }
}
