//! SQL functions of global sequences (`crate::sequence`) and the
//! snowflakeid, timeshard and KSUUID v2 layouts (`bdr_core::sequence`).
//! The user-facing wrappers with `regclass` and `timestamptz` arguments are
//! SQL functions in `sql/bdr_finalize.sql`.

use crate::error::OrRaise;
use bdr_core::sequence as layout;
use pgrx::prelude::*;

#[pg_extern(volatile)]
fn _alter_sequence_set_kind(seqoid: pg_sys::Oid, seqkind: &str, start: Option<i64>) {
    crate::sequence::alter_sequence_set_kind(seqoid.to_u32(), seqkind, start).or_raise()
}

#[pg_extern(volatile, strict)]
fn _seq_nextval(seqoid: pg_sys::Oid) -> i64 {
    crate::sequence::planner::nextval(seqoid.to_u32())
}

#[pg_extern(volatile, strict)]
fn _seq_currval(seqoid: pg_sys::Oid) -> i64 {
    crate::sequence::planner::currval(seqoid.to_u32())
}

#[pg_extern(immutable, strict, parallel_safe)]
fn _snowflakeid_ms(snowflakeid: i64) -> i64 {
    layout::snowflake_parts(snowflakeid).0
}

#[pg_extern(immutable, strict, parallel_safe)]
fn extract_nodeid_from_snowflakeid(snowflakeid: i64) -> i64 {
    layout::snowflake_parts(snowflakeid).1
}

#[pg_extern(immutable, strict, parallel_safe)]
fn extract_localseqid_from_snowflakeid(snowflakeid: i64) -> i64 {
    layout::snowflake_parts(snowflakeid).2
}

/// The smallest snowflakeid of millisecond `ms` (since 1970).
#[pg_extern(immutable, strict, parallel_safe)]
fn _snowflakeid_of_ms(ms: i64) -> i64 {
    layout::snowflake_compose(ms, 0, 0)
}

#[pg_extern(immutable, strict, parallel_safe)]
fn _timeshard_ms(timeshard: i64) -> i64 {
    layout::timeshard_parts(timeshard).0
}

#[pg_extern(immutable, strict, parallel_safe)]
fn extract_nodeid_from_timeshard(timeshard: i64) -> i64 {
    layout::timeshard_parts(timeshard).1
}

#[pg_extern(immutable, strict, parallel_safe)]
fn extract_localseqid_from_timeshard(timeshard: i64) -> i64 {
    layout::timeshard_parts(timeshard).2
}

#[pg_extern(immutable, strict, parallel_safe)]
fn _timeshard_of_ms(ms: i64) -> i64 {
    layout::timeshard_compose(ms, 0, 0)
}

#[pg_extern(volatile, strict)]
fn _ksuuid_v2(unix_us: i64) -> pgrx::Uuid {
    let mut random = [0u8; 8];
    // SAFETY: fills a local buffer of the length given.
    if !unsafe { pg_sys::pg_strong_random(random.as_mut_ptr().cast(), random.len()) } {
        crate::fail!(ERRCODE_INTERNAL_ERROR, "could not generate random bytes");
    }
    pgrx::Uuid::from_bytes(layout::ksuuid_v2(unix_us, random))
}

#[pg_extern(immutable, strict, parallel_safe)]
fn _ksuuid_v2_us(u: pgrx::Uuid) -> i64 {
    layout::ksuuid_v2_unix_us(u.as_bytes())
}

#[pg_extern(immutable, strict, parallel_safe)]
fn ksuuid_v2_cmp(a: pgrx::Uuid, b: pgrx::Uuid) -> i32 {
    match layout::ksuuid_v2_cmp(a.as_bytes(), b.as_bytes()) {
        std::cmp::Ordering::Less => -1,
        std::cmp::Ordering::Equal => 0,
        std::cmp::Ordering::Greater => 1,
    }
}

/// The galloc allocations of the group, as this node's consensus state
/// holds them.
#[pg_extern(stable)]
fn _sequence_alloc() -> TableIterator<
    'static,
    (
        name!(alloc_key, String),
        name!(chunk_size, i64),
        name!(allocated_up_to, i64),
        name!(nallocs, i64),
        name!(last_alloc_us, i64),
    ),
> {
    let rows = crate::consensus::applied_state().or_raise().allocations();
    TableIterator::new(rows.into_iter().map(|(k, a)| {
        (
            k,
            a.chunk_size,
            a.allocated_up_to,
            a.nallocs,
            a.last_alloc_us,
        )
    }))
}
