//! Tombstones: a note of each deleted row's key, so that a change to that row
//! which was made elsewhere before the delete, but arrives after it, is not
//! applied (it would bring the row back on this node only). The note's own
//! `xmin` is the deleting transaction, so its commit timestamp and origin say
//! who deleted when, exactly as a row's `xmin` does for a live row.
//!
//! Local deletes are noted by the `bdr_tombstone` trigger bdr puts on every
//! replicated table; writers note the deletes they apply themselves (their
//! replica session role keeps ordinary triggers from firing).

use pgrx::prelude::*;
use std::ffi::CStr;

/// The canonical text of a key: the local type output of each key column,
/// in column order. Writers and the trigger must agree on it exactly.
pub fn key_text(parts: &[Option<String>]) -> String {
    serde_json::to_string(parts).unwrap_or_default()
}

/// The settings that change how values print, and the values keys are
/// printed with. Sessions that print many keys (a join copying rows, a part
/// catching up) set them once with SET LOCAL instead.
pub const CANONICAL_OUTPUT: &[(&str, &str)] = &[
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "3"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
];

/// `CANONICAL_OUTPUT` as SET LOCAL statements, for another session.
pub fn canonical_output_sql() -> String {
    CANONICAL_OUTPUT
        .iter()
        .map(|(name, value)| format!("SET LOCAL {name} = {};", bdr_core::quote::literal(value)))
        .collect()
}

/// Runs `f` with the settings that change how values print fixed, so a key
/// prints the same in every session and in the writers.
pub fn with_canonical_output<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: a GUC nest level, as functions with SET clauses use; undone
    // below (and by transaction abort if `f` raises an ERROR).
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    for (name, value) in CANONICAL_OUTPUT {
        let (name, value) = (
            std::ffi::CString::new(*name).unwrap_or_default(),
            std::ffi::CString::new(*value).unwrap_or_default(),
        );
        // SAFETY: setting ordinary user settings for this nest level only.
        unsafe {
            pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_SESSION,
                pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
    }
    let r = f();
    // SAFETY: pops the nest level pushed above.
    unsafe { pg_sys::AtEOXact_GUC(false, level) };
    r
}

/// Text of a datum through its type's output function.
///
/// # Safety
/// `d` must be a valid datum of type `typid`.
pub unsafe fn output_text(typid: pg_sys::Oid, d: pg_sys::Datum) -> String {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let mut out = pg_sys::InvalidOid;
        let mut varlena = false;
        pg_sys::getTypeOutputInfo(typid, &mut out, &mut varlena);
        CStr::from_ptr(pg_sys::OidOutputFunctionCall(out, d))
            .to_string_lossy()
            .into_owned()
    }
}

/// The replica identity key columns of a tuple of `rel`, in column order:
/// (attribute, value, is null) each; `None` when the table has no key.
///
/// # Safety
/// `rel` must be open and `tuple` a tuple of it; the attributes and values
/// borrow from both and must not be used after either goes.
unsafe fn key_columns<'a>(
    rel: pg_sys::Relation,
    tuple: pg_sys::HeapTuple,
) -> Option<Vec<(&'a pg_sys::FormData_pg_attribute, pg_sys::Datum, bool)>> {
    // SAFETY: the caller upholds this function's contract; the attributes
    // live in the relation's tuple descriptor, which outlives the trigger.
    unsafe {
        let keys = pg_sys::RelationGetIdentityKeyBitmap(rel);
        if keys.is_null() {
            return None;
        }
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let mut cols = Vec::new();
        let mut bit = -1;
        loop {
            bit = pg_sys::bms_next_member(keys, bit);
            if bit < 0 {
                return Some(cols);
            }
            let attnum = bit + pg_sys::FirstLowInvalidHeapAttributeNumber;
            if attnum <= 0 {
                continue;
            }
            let i = (attnum - 1) as usize;
            let attr = &*(*desc).attrs.as_ptr().add(i);
            cols.push((attr, values[i], nulls[i]));
        }
    }
}

/// The key of a heap tuple of `rel` by its replica identity index, if it has one.
///
/// # Safety
/// `rel` must be open and `tuple` a tuple of it.
unsafe fn tuple_key(rel: pg_sys::Relation, tuple: pg_sys::HeapTuple) -> Option<String> {
    // SAFETY: the caller upholds this function's contract; each value is of
    // its attribute's type.
    unsafe {
        let parts: Vec<Option<String>> = key_columns(rel, tuple)?
            .into_iter()
            .map(|(attr, v, null)| (!null).then(|| output_text(attr.atttypid, v)))
            .collect();
        Some(key_text(&parts))
    }
}

/// Notes, in `bdr.tombstone`, that the row of `rel` with key `tuple` is gone
/// from this node.
///
/// # Safety
/// `rel` must be open and `tuple` a tuple of it.
unsafe fn note_gone(rel: pg_sys::Relation, tuple: pg_sys::HeapTuple) {
    // SAFETY: the caller upholds this function's contract (see its
    // documentation, or PostgreSQL's for a callback).
    unsafe {
        let Some(key) = with_canonical_output(|| tuple_key(rel, tuple)) else {
            return;
        };
        let relid = (*rel).rd_id;
        Spi::run_with_args(
            crate::catalog::statements::TOMBSTONE_PUT,
            &[relid.into(), key.as_str().into()],
        )
        .unwrap_or_else(|e| {
            crate::fail!(
                ERRCODE_INTERNAL_ERROR,
                "bdr could not record a deleted row: {e}"
            )
        });
    }
}

/// The bytes of a non-null value of `attr`, borrowed: a detoasted value
/// lives in the caller's memory context; no copy per updated row.
///
/// # Safety
/// `d` must be a non-null value of `attr`'s type.
unsafe fn value_bytes<'a>(attr: &pg_sys::FormData_pg_attribute, d: pg_sys::Datum) -> &'a [u8] {
    // SAFETY: the caller upholds this function's contract; the length comes
    // from the attribute (fixed), the varlena header or the NUL terminator.
    unsafe {
        if attr.attlen > 0 {
            std::slice::from_raw_parts(d.cast_mut_ptr::<u8>(), attr.attlen as usize)
        } else if attr.attlen == -1 {
            pgrx::varlena::varlena_to_byte_slice(pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr()))
        } else {
            std::ffi::CStr::from_ptr(d.cast_mut_ptr()).to_bytes()
        }
    }
}

/// Whether two tuples of `rel` differ in a replica identity column (by
/// their bytes: equal bytes print the same key).
///
/// # Safety
/// `rel` must be open and both tuples tuples of it.
unsafe fn key_differs(rel: pg_sys::Relation, a: pg_sys::HeapTuple, b: pg_sys::HeapTuple) -> bool {
    // SAFETY: the caller upholds this function's contract; each value is of
    // its attribute's type and length.
    unsafe {
        let (Some(ka), Some(kb)) = (key_columns(rel, a), key_columns(rel, b)) else {
            return false;
        };
        ka.iter()
            .zip(kb.iter())
            .any(|((attr, va, na), (_, vb, nb))| {
                if na != nb {
                    return true;
                }
                if *na {
                    return false;
                }
                if attr.attbyval {
                    va != vb
                } else {
                    value_bytes(attr, *va) != value_bytes(attr, *vb)
                }
            })
    }
}

/// Notes the deletion of a local row.
#[pg_trigger]
fn _tombstone_trigger<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let td = trigger.trigger_data();
    // SAFETY: an AFTER ROW DELETE trigger gets the open relation and the old tuple.
    unsafe { note_gone(td.tg_relation, td.tg_trigtuple) };
    Ok(None)
}

/// Notes the old key of a local UPDATE that changes a row's key: for every
/// other node's change to that key, the row was deleted here then, exactly
/// as by a DELETE (without it, an older update of the old key arriving later
/// would bring the row back on this node only).
///
/// A BEFORE trigger, inline with the update: an AFTER trigger would queue
/// an event for every updated row, and a column list (UPDATE OF the key)
/// would make the key columns impossible to drop without CASCADE. A user's
/// BEFORE trigger that fires later and changes the key itself is not seen;
/// one that changes it back or skips the update leaves a tombstone for a
/// key that still exists, which is harmless: tombstones are only consulted
/// for missing rows.
#[pg_trigger]
fn _key_change_trigger<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let td = trigger.trigger_data();
    // SAFETY: a BEFORE ROW UPDATE trigger gets the open relation, the old
    // and the new tuple; returning the new tuple unchanged lets the update go on.
    unsafe {
        if key_differs(td.tg_relation, td.tg_trigtuple, td.tg_newtuple) {
            note_gone(td.tg_relation, td.tg_trigtuple);
        }
    }
    Ok(trigger.new())
}

/// The key text of a row of `rel` (a whole-row value of its type), as the
/// trigger computes it. The caller fixes the output settings first (see
/// `with_canonical_output`); a join copying many rows sets them once.
#[pg_extern(stable, parallel_safe)]
fn _key_text(rel: pg_sys::Oid, row: pgrx::AnyElement) -> Option<String> {
    // SAFETY: `row` is a composite datum of the relation's row type (the
    // caller passes the table's whole-row variable); detoasted before use,
    // and the relation is opened and closed with a share lock.
    unsafe {
        let td = pg_sys::pg_detoast_datum(row.datum().cast_mut_ptr()) as pg_sys::HeapTupleHeader;
        let mut tuple: pg_sys::HeapTupleData = std::mem::zeroed();
        tuple.t_len = pgrx::htup::heap_tuple_header_get_datum_length(td) as u32;
        tuple.t_data = td;
        let r = pg_sys::relation_open(rel, pg_sys::AccessShareLock as i32);
        let key = tuple_key(r, &mut tuple);
        pg_sys::relation_close(r, pg_sys::AccessShareLock as i32);
        key
    }
}
