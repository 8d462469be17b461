//! The PostgreSQL settings bdr cannot work without, checked by
//! `CREATE EXTENSION bdr` and `bdr.create_node`.

use crate::error::{BdrError, BdrResult};
use pgrx::pg_sys;
use std::ffi::{CStr, CString};

/// A server setting's current value, or None if this server has no such setting.
pub fn setting(name: &str) -> Option<String> {
    let c = CString::new(name).ok()?;
    // SAFETY: GetConfigOption with missing_ok returns NULL or a string owned by guc.c.
    unsafe {
        let p = pg_sys::GetConfigOption(c.as_ptr(), true, false);
        if p.is_null() {
            None
        } else {
            Some(CStr::from_ptr(p).to_string_lossy().into_owned())
        }
    }
}

fn list_contains(list: &str, item: &str) -> bool {
    list.split(',')
        .map(|s| s.trim().trim_matches('"'))
        .any(|s| s == item)
}

pub fn check() -> BdrResult<()> {
    let wal_level = setting("wal_level").unwrap_or_default();
    if wal_level != "logical" {
        return Err(BdrError::Prerequisite {
            msg: format!("bdr requires wal_level = logical, but it is \"{wal_level}\""),
            hint: "Set wal_level = logical in postgresql.conf and restart PostgreSQL.".into(),
        });
    }
    let cts = setting("track_commit_timestamp").unwrap_or_default();
    if cts != "on" {
        return Err(BdrError::Prerequisite {
            msg: "bdr requires track_commit_timestamp = on, to resolve conflicts by commit time"
                .into(),
            hint: "Set track_commit_timestamp = on in postgresql.conf and restart PostgreSQL."
                .into(),
        });
    }
    // PostgreSQL 15.20 lets only the listed libraries serve as output plugins.
    if let Some(libs) = setting("output_plugin_libraries") {
        if !list_contains(&libs, "bdr") {
            return Err(BdrError::Prerequisite {
                msg: format!("output_plugin_libraries (\"{libs}\") does not list bdr, so bdr cannot decode changes"),
                hint: "Add bdr to output_plugin_libraries in postgresql.conf (for example output_plugin_libraries = 'pgoutput, test_decoding, bdr') and reload.".into(),
            });
        }
    }
    Ok(())
}
