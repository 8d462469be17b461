//! Routes `tracing` events into PostgreSQL's log.
//!
//! One subscriber per process maps levels to elog levels: errors and warnings
//! become WARNING (never ERROR: an event must not abort the code that logs
//! it), info becomes LOG, debug uses `bdr.debug_level` and trace uses
//! `bdr.trace_level`. Nothing is written to stderr directly.

use crate::guc;
use pgrx::pg_sys;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};
use std::fmt::Write;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Level, Metadata, Subscriber};

struct PgLog;

#[derive(Default)]
struct Fields {
    message: String,
    extra: String,
}

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.message, "{value:?}");
        } else {
            let _ = write!(self.extra, " {}={:?}", field.name(), value);
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.message.push_str(value);
        } else {
            let _ = write!(self.extra, " {}={}", field.name(), value);
        }
    }
}

fn pg_level(elevel: i32) -> PgLogLevel {
    match elevel as u32 {
        pg_sys::DEBUG5 => PgLogLevel::DEBUG5,
        pg_sys::DEBUG4 => PgLogLevel::DEBUG4,
        pg_sys::DEBUG3 => PgLogLevel::DEBUG3,
        pg_sys::DEBUG2 => PgLogLevel::DEBUG2,
        pg_sys::DEBUG1 => PgLogLevel::DEBUG1,
        pg_sys::LOG => PgLogLevel::LOG,
        pg_sys::NOTICE => PgLogLevel::NOTICE,
        _ => PgLogLevel::WARNING,
    }
}

impl Subscriber for PgLog {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut f = Fields::default();
        event.record(&mut f);
        let level = match *event.metadata().level() {
            Level::ERROR | Level::WARN => PgLogLevel::WARNING,
            Level::INFO => PgLogLevel::LOG,
            Level::DEBUG => pg_level(guc::elog_level("bdr.debug_level")),
            Level::TRACE => pg_level(guc::elog_level("bdr.trace_level")),
        };
        let msg = format!("bdr: {}{}", f.message, f.extra);
        ErrorReport::new(PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, msg, "bdr").report(level);
    }
}

pub fn init() {
    // Fails only if a default is already set, which would be our own.
    let _ = tracing::subscriber::set_global_default(PgLog);
}
