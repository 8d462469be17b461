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

/// Text of a datum through its type's output function.
///
/// # Safety
/// `d` must be a valid datum of type `typid`.
pub unsafe fn output_text(typid: pg_sys::Oid, d: pg_sys::Datum) -> String {
    let mut out = pg_sys::InvalidOid;
    let mut varlena = false;
    pg_sys::getTypeOutputInfo(typid, &mut out, &mut varlena);
    CStr::from_ptr(pg_sys::OidOutputFunctionCall(out, d))
        .to_string_lossy()
        .into_owned()
}

/// The key of a heap tuple of `rel` by its replica identity index, if it has one.
///
/// # Safety
/// `rel` must be open and `tuple` a tuple of it.
unsafe fn tuple_key(rel: pg_sys::Relation, tuple: pg_sys::HeapTuple) -> Option<String> {
    let keys = pg_sys::RelationGetIdentityKeyBitmap(rel);
    if keys.is_null() {
        return None;
    }
    let desc = (*rel).rd_att;
    let natts = (*desc).natts as usize;
    let mut values = vec![pg_sys::Datum::from(0); natts];
    let mut nulls = vec![false; natts];
    pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
    let mut parts = Vec::new();
    let mut bit = -1;
    loop {
        bit = pg_sys::bms_next_member(keys, bit);
        if bit < 0 {
            break;
        }
        let attnum = bit + pg_sys::FirstLowInvalidHeapAttributeNumber;
        if attnum <= 0 {
            continue;
        }
        let i = (attnum - 1) as usize;
        let attr = &*(*desc).attrs.as_ptr().add(i);
        parts.push((!nulls[i]).then(|| output_text(attr.atttypid, values[i])));
    }
    Some(key_text(&parts))
}

/// Notes the deletion of a local row.
#[pg_trigger]
fn _tombstone_trigger<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let td = trigger.trigger_data();
    // SAFETY: an AFTER ROW DELETE trigger gets the open relation and the old tuple.
    let key = unsafe { tuple_key(td.tg_relation, td.tg_trigtuple) };
    if let Some(key) = key {
        // SAFETY: the relation is open for the trigger.
        let relid = unsafe { (*td.tg_relation).rd_id };
        Spi::run_with_args(
            "INSERT INTO bdr.tombstone (relid, key_hash) VALUES ($1, md5($2))
             ON CONFLICT (relid, key_hash) DO UPDATE SET relid = EXCLUDED.relid",
            &[relid.into(), key.as_str().into()],
        )
        .unwrap_or_else(|e| error!("bdr could not record a deleted row: {e}"));
    }
    Ok(None)
}
