//! Waiting on this process's latch, and the signal handling of workers.

use pgrx::pg_sys;

// The handlers themselves, not pgrx's guarded wrappers: a signal handler
// must be the plain C function.
unsafe extern "C-unwind" {
    #[link_name = "die"]
    fn pg_die(sig: std::ffi::c_int);
    #[link_name = "SignalHandlerForConfigReload"]
    fn pg_reload(sig: std::ffi::c_int);
}

/// Signal handling of workers that run SPI or wait on sockets: SIGTERM ends
/// them at the next CHECK_FOR_INTERRUPTS, wherever they are, as PostgreSQL's
/// own apply workers do.
pub fn attach_die_handlers() {
    // SAFETY: installing PostgreSQL's standard handlers before unblocking signals.
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(pg_die));
        pg_sys::pqsignal(pg_sys::SIGHUP as i32, Some(pg_reload));
        pg_sys::BackgroundWorkerUnblockSignals();
    }
}

/// Re-reads the configuration if SIGHUP asked for it.
pub fn reload_config_if_asked() {
    // SAFETY: flag set by SignalHandlerForConfigReload; reloading is what it asks for.
    unsafe {
        if pg_sys::ConfigReloadPending != 0 {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
    }
}

/// Sleeps until the latch is set, `fd` is readable (when given) or `ms` pass;
/// exits the process if the postmaster died.
pub fn wait(fd: Option<pg_sys::pgsocket>, ms: i64) {
    let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
    if fd.is_some() {
        events |= pg_sys::WL_SOCKET_READABLE;
    }
    // SAFETY: waiting on our own latch (and a socket we own) as any backend does.
    unsafe {
        pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            fd.unwrap_or(-1),
            ms.max(1) as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}
