//! Routes `tracing` events into PostgreSQL's log.
//!
//! One subscriber per process maps levels to elog levels: errors and warnings
//! become WARNING (never ERROR: an event must not abort the code that logs
//! it), info becomes LOG, debug uses `bdr.debug_level` and trace uses
//! `bdr.trace_level`. Nothing is written to stderr directly.

use crate::guc;
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

/// The log level an enum setting over `bdr_core::settings::LOG_LEVELS` names.
fn level_of(key: usize) -> PgLogLevel {
    const LEVELS: [PgLogLevel; 8] = [
        PgLogLevel::DEBUG5,
        PgLogLevel::DEBUG4,
        PgLogLevel::DEBUG3,
        PgLogLevel::DEBUG2,
        PgLogLevel::DEBUG1,
        PgLogLevel::LOG,
        PgLogLevel::NOTICE,
        PgLogLevel::WARNING,
    ];
    const _: () = assert!(LEVELS.len() == bdr_core::settings::LOG_LEVELS.len());
    LEVELS
        .get(guc::get_enum_ordinal(key))
        .copied()
        .unwrap_or(PgLogLevel::WARNING)
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
            Level::DEBUG => level_of(guc::DEBUG_LEVEL),
            Level::TRACE => level_of(guc::TRACE_LEVEL),
        };
        let msg = format!("bdr: {}{}", f.message, f.extra);
        ErrorReport::new(PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION, msg, "bdr").report(level);
    }
}

pub fn init() {
    // Fails only if a default is already set, which would be our own.
    let _ = tracing::subscriber::set_global_default(PgLog);
}
