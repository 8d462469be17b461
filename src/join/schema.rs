//! The join's schema copy: `pg_dump --schema-only` of the join target at
//! the join slot's snapshot, run inside the join's transaction
//! (synchronize_structure 'all').

use super::*;

/// The directory of this server's programs (pg_dump is there).
pub(super) fn bin_dir() -> std::path::PathBuf {
    // SAFETY: my_exec_path is a NUL-terminated path set at backend start.
    let exe = unsafe {
        CStr::from_ptr(std::ptr::addr_of!(pg_sys::my_exec_path) as *const std::ffi::c_char)
    };
    std::path::Path::new(&*exe.to_string_lossy())
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default()
}

/// Copies the join target's schema as of `snapshot` (exported from the
/// transaction the data is copied in): pg_dump --schema-only, run inside
/// this transaction. bdr's own objects are the extension's and not dumped;
/// the tombstone triggers are made by bdr's event trigger as the tables are
/// created here.
/// This database's encoding, which the dump is asked to use.
pub(super) fn server_encoding() -> String {
    // SAFETY: returns a static string for the database's encoding.
    unsafe { CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) }
        .to_string_lossy()
        .into_owned()
}

pub(super) fn copy_schema(target: &Member, snapshot: &str) -> BdrResult<()> {
    let pg_dump = bin_dir().join("pg_dump");
    let out = std::process::Command::new(&pg_dump)
        .args([
            "--schema-only",
            "--no-publications",
            "--no-subscriptions",
            // bdr's schema comes with the extension, which exists here.
            "--exclude-schema=bdr",
            "--encoding",
            &server_encoding(),
            "--snapshot",
            snapshot,
            "--dbname",
            &target.dsn,
        ])
        .output()
        .map_err(|e| BdrError::Prerequisite {
            msg: format!("could not run {}: {e}", pg_dump.display()),
            hint: "synchronize_structure 'all' needs pg_dump next to the postgres program; or create the tables yourself and join with synchronize_structure => 'none'.".into(),
        })?;
    if !out.status.success() {
        return Err(BdrError::PeerCommand {
            what: "dumping the schema".into(),
            node: target.name.clone(),
            msg: crate::walrcv::PeerError::Remote(
                String::from_utf8_lossy(&out.stderr).trim().to_string(),
            ),
        });
    }
    let dump = String::from_utf8_lossy(&out.stdout);
    let sql = bdr_core::dump::schema_script(&dump);
    Spi::run(&sql).map_err(|e| BdrError::JoinRefused {
        msg: format!("could not create the group's schema here: {e}"),
        hint: "Roles that own or are granted objects must exist on the joining node; create them and join again.".into(),
    })?;
    Ok(())
}
