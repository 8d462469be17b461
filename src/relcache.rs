//! Notes of relations changed by DDL (relcache invalidations), for the code
//! that caches per-relation state across transactions: the output plugin's
//! relation descriptions and the writers' column maps. The invalidation
//! callback cannot reach those caches, so it leaves notes here; each process
//! registers it once.

use pgrx::prelude::*;
use std::cell::{Cell, RefCell};
use std::collections::HashSet;

thread_local! {
    static NOTES: RefCell<(bool, HashSet<u32>)> = RefCell::new((false, HashSet::new()));
    static WATCHING: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn invalidated(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    NOTES.with(|n| {
        let mut n = n.borrow_mut();
        if relid == pg_sys::InvalidOid {
            n.0 = true;
        } else {
            n.1.insert(relid.to_u32());
        }
    });
}

/// Starts taking notes in this process (once).
pub fn watch() {
    if !WATCHING.with(|w| w.replace(true)) {
        // SAFETY: registers a callback for the life of the process.
        unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(invalidated), pg_sys::Datum::from(0)) };
    }
}

/// What changed since the last call: `all` after a full relcache reset,
/// else the relations named. `None` when nothing did.
pub struct Changed {
    pub all: bool,
    pub relids: HashSet<u32>,
}

pub fn take() -> Option<Changed> {
    NOTES.with(|n| {
        let mut n = n.borrow_mut();
        if !n.0 && n.1.is_empty() {
            return None;
        }
        Some(Changed {
            all: std::mem::take(&mut n.0),
            relids: std::mem::take(&mut n.1),
        })
    })
}
