//! Running a piece of bdr's own work as the bootstrap superuser, whoever
//! the session is: bdr reads its catalogs and queues a DDL statement for the
//! group while a role without rights on schema bdr runs that statement.

use pgrx::pg_sys;

/// Runs `f` as the bootstrap superuser, then as the session's user again
/// (on an ERROR, the transaction's abort puts the user back).
pub fn as_bdr<R>(f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: the pattern of SECURITY DEFINER functions: switch user for
    // the call and back; only bdr's own statements run in between.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let r = f();
    // SAFETY: restores what was saved above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    r
}
