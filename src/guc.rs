//! Registers every `bdr.*` setting of `bdr_core::settings::SETTINGS` with
//! PostgreSQL and gives the rest of the extension typed access to them.
//!
//! The table drives registration so that the settings, their docs and their
//! tests come from one place. Each setting gets its own check hook (a const
//! generic instantiation per table index), because PostgreSQL does not tell a
//! hook which setting it is checking.

use bdr_core::settings::{
    enum_index_of, enum_spec, index_of, Context, EnumSpec, Kind, Setting, Status, Unit, SETTINGS,
};
use pgrx::pg_sys;
use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::addr_of_mut;

const MAX_SETTINGS: usize = 96;

// SAFETY of the statics below: PostgreSQL writes a setting's value through the
// pointer given at registration, and backends are single threaded, so these are
// only touched on the main thread.
static mut BOOLS: [bool; MAX_SETTINGS] = [false; MAX_SETTINGS];
static mut INTS: [i32; MAX_SETTINGS] = [0; MAX_SETTINGS];
static mut REALS: [f64; MAX_SETTINGS] = [0.0; MAX_SETTINGS];
static mut STRINGS: [*mut c_char; MAX_SETTINGS] = [std::ptr::null_mut(); MAX_SETTINGS];

/// True while a `SET LOCAL` statement is being executed (see `hooks.rs`).
pub static mut IN_SET_LOCAL: bool = false;

// Keys of the settings the extension reads. They are positions in the
// settings table computed at build time, so a misspelt name fails the build
// and reading a setting costs an array index.
pub const XACT_REPLICATION: usize = index_of("bdr.xact_replication");
pub const PERMIT_UNSAFE_COMMANDS: usize = index_of("bdr.permit_unsafe_commands");
pub const STANDBY_SLOT_NAMES: usize = index_of("bdr.standby_slot_names");
pub const MIN_WORKER_BACKOFF_DELAY: usize = index_of("bdr.min_worker_backoff_delay");
pub const MAX_WORKER_BACKOFF_DELAY: usize = index_of("bdr.max_worker_backoff_delay");
pub const WRITER_INPUT_QUEUE_SIZE: usize = index_of("bdr.writer_input_queue_size");
pub const WRITER_OUTPUT_QUEUE_SIZE: usize = index_of("bdr.writer_output_queue_size");
pub const MAXIMUM_CLOCK_SKEW: usize = index_of("bdr.maximum_clock_skew");
pub const MAXIMUM_CLOCK_SKEW_ACTION: usize = enum_index_of("bdr.maximum_clock_skew_action");
pub const DEFAULT_REPLICA_IDENTITY: usize = enum_index_of("bdr.default_replica_identity");
pub const DEFAULT_SEQUENCE_KIND: usize = enum_index_of("bdr.default_sequence_kind");
pub const DDL_LOCKING: usize = enum_index_of("bdr.ddl_locking");
pub const PREDICTIVE_CHECKS: usize = enum_index_of("bdr.predictive_checks");
pub const GLOBAL_LOCK_TIMEOUT: usize = index_of("bdr.global_lock_timeout");
pub const GLOBAL_LOCK_MAX_LOCKS: usize = index_of("bdr.global_lock_max_locks");
pub const GLOBAL_LOCK_STATEMENT_TIMEOUT: usize = index_of("bdr.global_lock_statement_timeout");
pub const GLOBAL_LOCK_IDLE_TIMEOUT: usize = index_of("bdr.global_lock_idle_timeout");
pub const TRUNCATE_LOCKING: usize = index_of("bdr.truncate_locking");
pub const DDL_REPLICATION: usize = index_of("bdr.ddl_replication");
pub const ROLE_REPLICATION: usize = index_of("bdr.role_replication");
pub const RAFT_ELECTION_TIMEOUT: usize = index_of("bdr.raft_election_timeout");
pub const RAFT_RESPONSE_TIMEOUT: usize = index_of("bdr.raft_response_timeout");
pub const RAFT_KEEP_MIN_ENTRIES: usize = index_of("bdr.raft_keep_min_entries");
pub const RAFT_LOG_MIN_APPLY_DURATION: usize = index_of("bdr.raft_log_min_apply_duration");
pub const RAFT_LOG_MIN_MESSAGE_DURATION: usize = index_of("bdr.raft_log_min_message_duration");
pub const RAFT_GROUP_MAX_CONNECTIONS: usize = index_of("bdr.raft_group_max_connections");
pub const TRACK_SUBSCRIPTION_APPLY: usize = index_of("bdr.track_subscription_apply");
pub const DEBUG_LEVEL: usize = enum_index_of("bdr.debug_level");
pub const TRACE_LEVEL: usize = enum_index_of("bdr.trace_level");

pub fn get_bool(key: usize) -> bool {
    // SAFETY: see the statics above.
    unsafe { (*addr_of_mut!(BOOLS))[key] }
}

pub fn get_int(key: usize) -> i32 {
    // SAFETY: see the statics above.
    unsafe { (*addr_of_mut!(INTS))[key] }
}

/// The ordinal of an enum setting's current value in its `values`.
pub fn get_enum_ordinal(key: usize) -> usize {
    // SAFETY: see the statics above; PostgreSQL stores enum settings as int.
    unsafe { (*addr_of_mut!(INTS))[key] as usize }
}

/// The current value of an enum setting (a key from `enum_index_of`), by name.
pub fn get_enum(key: usize) -> &'static str {
    let Kind::Enum { values, .. } = SETTINGS[key].kind else {
        // Keys of enum settings come from enum_index_of, which checks the kind.
        return "";
    };
    values
        .get(get_enum_ordinal(key))
        .copied()
        .unwrap_or(values[0])
}

/// A C string that lives as long as the process, as PostgreSQL needs for
/// setting names, descriptions and enum entries.
fn leak_cstr(s: &str) -> *const c_char {
    // The settings table holds no NUL (bdr-core test texts_hold_no_nul), so
    // the fallback to an empty string never happens.
    CString::new(s).unwrap_or_default().into_raw()
}

fn context(c: Context) -> pg_sys::GucContext::Type {
    match c {
        Context::Postmaster => pg_sys::GucContext::PGC_POSTMASTER,
        Context::Sighup => pg_sys::GucContext::PGC_SIGHUP,
        Context::Suset => pg_sys::GucContext::PGC_SUSET,
        Context::Userset => pg_sys::GucContext::PGC_USERSET,
    }
}

fn unit_flags(u: Unit) -> i32 {
    match u {
        Unit::None => 0,
        Unit::Ms => pg_sys::GUC_UNIT_MS as i32,
        Unit::S => pg_sys::GUC_UNIT_S as i32,
        Unit::Kb => pg_sys::GUC_UNIT_KB as i32,
    }
}

/// Whether a value arriving from `source` is something a person just set, so
/// that a warning about it is useful: interactive sources always, the config
/// file only in the postmaster (every backend re-reads it too).
fn worth_warning(source: pg_sys::GucSource::Type) -> bool {
    use pg_sys::GucSource::*;
    match source {
        PGC_S_DEFAULT | PGC_S_DYNAMIC_DEFAULT | PGC_S_OVERRIDE => false,
        PGC_S_ENV_VAR | PGC_S_FILE | PGC_S_ARGV | PGC_S_GLOBAL => {
            // SAFETY: plain read of a process-global flag.
            unsafe { !pg_sys::IsUnderPostmaster }
        }
        _ => true,
    }
}

fn warn_not_yet(s: &Setting, source: pg_sys::GucSource::Type, differs: bool) {
    if s.status != Status::Honoured && differs && worth_warning(source) {
        pgrx::pg_sys::panic::ErrorReport::new(
            pgrx::PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!(
                "setting \"{}\" is accepted but not implemented yet; it has no effect",
                s.name
            ),
            "bdr",
        )
        .set_hint("See docs/settings.md for the status of every bdr setting.")
        .report(pgrx::PgLogLevel::WARNING);
    }
}

/// Sets the message of a failed check, which PostgreSQL reports with the
/// setting's name.
fn check_fail(msg: &str, hint: &str) {
    let msg = CString::new(msg).unwrap_or_default();
    let hint = CString::new(hint).unwrap_or_default();
    // SAFETY: GUC_check_errmsg_string and friends are the documented way for a
    // check hook to report; PostgreSQL copies them with pstrdup.
    unsafe {
        pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32);
        pg_sys::GUC_check_errmsg_string = pg_sys::pstrdup(msg.as_ptr());
        pg_sys::GUC_check_errhint_string = pg_sys::pstrdup(hint.as_ptr());
    }
}

/// The value types PostgreSQL hands to bool, int, real and enum check hooks.
trait CheckedValue: Copy {
    /// Whether `v` differs from the setting's default.
    fn differs(s: &Setting, v: Self) -> bool;
    /// Setting-specific validation beyond PostgreSQL's own range checks.
    fn validate(_key: usize, _v: Self, _source: pg_sys::GucSource::Type) -> bool {
        true
    }
}

impl CheckedValue for bool {
    fn differs(s: &Setting, v: bool) -> bool {
        matches!(s.kind, Kind::Bool { default } if v != default)
    }

    fn validate(key: usize, v: bool, source: pg_sys::GucSource::Type) -> bool {
        if key == XACT_REPLICATION && !v && !xact_replication_off_allowed(source) {
            check_fail(
                "bdr.xact_replication can only be turned off for the current transaction",
                "Use SET LOCAL bdr.xact_replication = off inside a transaction, or set bdr.permit_unsafe_commands = on first.",
            );
            return false;
        }
        true
    }
}

/// Int and enum settings both arrive as an int (an enum as its ordinal).
impl CheckedValue for i32 {
    fn differs(s: &Setting, v: i32) -> bool {
        match s.kind {
            Kind::Int { default, .. } => v != default,
            Kind::Enum { default, .. } => Some(v) != s.enum_ordinal(default),
            _ => false,
        }
    }
}

impl CheckedValue for f64 {
    fn differs(s: &Setting, v: f64) -> bool {
        matches!(s.kind, Kind::Real { default, .. } if v != default)
    }
}

/// Turning replication off for more than one transaction silently diverges
/// the nodes, so it is allowed only through SET LOCAL (or with the explicit
/// unsafe override); the boot value and RESET are always fine.
fn xact_replication_off_allowed(source: pg_sys::GucSource::Type) -> bool {
    if source == pg_sys::GucSource::PGC_S_DEFAULT {
        return true;
    }
    if get_bool(PERMIT_UNSAFE_COMMANDS) {
        return true;
    }
    // SAFETY: plain read of a flag set by our own utility hook on this thread.
    unsafe { IN_SET_LOCAL }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_value<const I: usize, T: CheckedValue>(
    newval: *mut T,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    let s = &SETTINGS[I];
    // SAFETY: PostgreSQL passes a valid pointer to the proposed value.
    let v = unsafe { *newval };
    if !T::validate(I, v, source) {
        return false;
    }
    warn_not_yet(s, source, T::differs(s, v));
    true
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_string<const I: usize>(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    let s = &SETTINGS[I];
    // SAFETY: PostgreSQL passes a valid pointer to a (possibly NULL) C string.
    let v = unsafe {
        let p = *newval;
        if p.is_null() {
            String::new()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    if I == STANDBY_SLOT_NAMES {
        for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if !bdr_core::naming::is_valid_slot_name(name) {
                check_fail(
                    &format!("\"{name}\" is not a valid replication slot name"),
                    "List slot names separated by commas; a slot name has only lowercase letters, digits and underscores.",
                );
                return false;
            }
        }
    }
    if let Kind::Str { default } = s.kind {
        warn_not_yet(s, source, v != default);
    }
    true
}

type BoolHook =
    unsafe extern "C-unwind" fn(*mut bool, *mut *mut c_void, pg_sys::GucSource::Type) -> bool;
type IntHook =
    unsafe extern "C-unwind" fn(*mut i32, *mut *mut c_void, pg_sys::GucSource::Type) -> bool;
type RealHook =
    unsafe extern "C-unwind" fn(*mut f64, *mut *mut c_void, pg_sys::GucSource::Type) -> bool;
type StrHook = unsafe extern "C-unwind" fn(
    *mut *mut c_char,
    *mut *mut c_void,
    pg_sys::GucSource::Type,
) -> bool;

macro_rules! hook_table {
    ($f:ident, $ty:ty; $t:ty; [$($n:literal),*]) => { [$($f::<$n, $ty> as $t),*] };
    ($f:ident; $t:ty; [$($n:literal),*]) => { [$($f::<$n> as $t),*] };
}

macro_rules! all_hooks {
    ($($args:tt)*) => {
        hook_table!(
            $($args)*;
            [
                0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
                23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43,
                44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64,
                65, 66, 67, 68, 69, 70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 83, 84, 85,
                86, 87, 88, 89, 90, 91, 92, 93, 94, 95
            ]
        )
    };
}

/// PostgreSQL's `config_enum_entry` array for an enum setting, terminated
/// by a NULL name, leaked because PostgreSQL keeps it.
fn enum_entries(spec: &EnumSpec) -> *const pg_sys::config_enum_entry {
    let mut v: Vec<pg_sys::config_enum_entry> = spec
        .entries
        .iter()
        .map(|(name, val, hidden)| pg_sys::config_enum_entry {
            name: leak_cstr(name),
            val: *val,
            hidden: *hidden,
        })
        .collect();
    v.push(pg_sys::config_enum_entry {
        name: std::ptr::null(),
        val: 0,
        hidden: false,
    });
    Box::leak(v.into_boxed_slice()).as_ptr()
}

/// `bdr.xact_replication = off` tags the transaction's WAL with the origin
/// "do not replicate", which the output plugin filters out like any origin.
/// SET LOCAL reverts at transaction end, after the commit record is written.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn assign_xact_replication(newval: bool, _extra: *mut std::ffi::c_void) {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let dnr = pg_sys::DoNotReplicateId as pg_sys::RepOriginId;
        let none = pg_sys::InvalidRepOriginId as pg_sys::RepOriginId;
        if !newval && pg_sys::replorigin_session_origin == none {
            pg_sys::replorigin_session_origin = dnr;
        } else if newval && pg_sys::replorigin_session_origin == dnr {
            pg_sys::replorigin_session_origin = none;
        }
    }
}

pub fn init() {
    assert!(SETTINGS.len() <= MAX_SETTINGS, "raise MAX_SETTINGS");
    let bool_hooks: [BoolHook; MAX_SETTINGS] = all_hooks!(check_value, bool; BoolHook);
    let int_hooks: [IntHook; MAX_SETTINGS] = all_hooks!(check_value, i32; IntHook);
    let real_hooks: [RealHook; MAX_SETTINGS] = all_hooks!(check_value, f64; RealHook);
    let str_hooks: [StrHook; MAX_SETTINGS] = all_hooks!(check_string; StrHook);

    for (i, s) in SETTINGS.iter().enumerate() {
        // Names and descriptions must outlive the process: PostgreSQL keeps the pointers.
        let name = leak_cstr(s.name);
        let short = leak_cstr(s.description);
        let long = std::ptr::null();
        let ctx = context(s.context);
        let flags = 0i32;
        // SAFETY: registration in _PG_init of a preloaded library, with storage
        // that lives as long as the process.
        unsafe {
            match s.kind {
                Kind::Bool { default } => {
                    (*addr_of_mut!(BOOLS))[i] = default;
                    pg_sys::DefineCustomBoolVariable(
                        name,
                        short,
                        long,
                        addr_of_mut!(BOOLS[i]),
                        default,
                        ctx,
                        flags,
                        Some(bool_hooks[i]),
                        if i == XACT_REPLICATION {
                            Some(assign_xact_replication)
                        } else {
                            None
                        },
                        None,
                    );
                }
                Kind::Int {
                    default,
                    min,
                    max,
                    unit,
                } => {
                    (*addr_of_mut!(INTS))[i] = default;
                    pg_sys::DefineCustomIntVariable(
                        name,
                        short,
                        long,
                        addr_of_mut!(INTS[i]),
                        default,
                        min,
                        max,
                        ctx,
                        flags | unit_flags(unit),
                        Some(int_hooks[i]),
                        None,
                        None,
                    );
                }
                Kind::Real { default, min, max } => {
                    (*addr_of_mut!(REALS))[i] = default;
                    pg_sys::DefineCustomRealVariable(
                        name,
                        short,
                        long,
                        addr_of_mut!(REALS[i]),
                        default,
                        min,
                        max,
                        ctx,
                        flags,
                        Some(real_hooks[i]),
                        None,
                        None,
                    );
                }
                Kind::Enum {
                    default,
                    values,
                    aliases,
                } => {
                    let spec = enum_spec(default, values, aliases);
                    let boot = spec.default;
                    (*addr_of_mut!(INTS))[i] = boot;
                    pg_sys::DefineCustomEnumVariable(
                        name,
                        short,
                        long,
                        addr_of_mut!(INTS[i]),
                        boot,
                        enum_entries(&spec),
                        ctx,
                        flags,
                        Some(int_hooks[i]),
                        None,
                        None,
                    );
                }
                Kind::Str { default } => {
                    pg_sys::DefineCustomStringVariable(
                        name,
                        short,
                        long,
                        addr_of_mut!(STRINGS[i]),
                        leak_cstr(default),
                        ctx,
                        flags,
                        Some(str_hooks[i]),
                        None,
                        None,
                    );
                }
            }
        }
    }
    // SAFETY: called once from _PG_init after all bdr.* settings are defined.
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"bdr".as_ptr());
    }
}
