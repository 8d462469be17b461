//! bdr: asynchronous multi-master logical replication for PostgreSQL.
//!
//! `_PG_init` refuses to load unless bdr is in `shared_preload_libraries`,
//! then registers the settings, shared memory, hooks and the supervisor.

use pgrx::prelude::*;

pub mod api;
pub mod catalog;
pub mod error;
pub mod guc;
pub mod hooks;
pub mod log;
pub mod prereq;
pub mod shmem;
pub mod workers;

::pgrx::pg_module_magic!(name, version);

extension_sql_file!("../sql/bdr_schema.sql", name = "bdr_schema", bootstrap);
extension_sql_file!("../sql/bdr_finalize.sql", name = "bdr_finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: reads a flag PostgreSQL sets while processing shared_preload_libraries.
    if !unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "bdr must be loaded via shared_preload_libraries",
            "_PG_init",
        )
        .set_hint("Add bdr to shared_preload_libraries in postgresql.conf and restart PostgreSQL.")
        .report(PgLogLevel::ERROR);
    }
    // pgrx puts a Rust backtrace into the DETAIL of every error that crosses
    // Rust frames when RUST_BACKTRACE is set; users must never see that. Set
    // BDR_RUST_BACKTRACE=1 in the server's environment to keep them.
    if std::env::var_os("BDR_RUST_BACKTRACE").is_none() {
        // SAFETY: the postmaster is single threaded while loading libraries.
        unsafe { std::env::set_var("RUST_LIB_BACKTRACE", "0") };
    }
    guc::init();
    log::init();
    shmem::init();
    hooks::init();
    workers::init();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn version_num_matches_version() {
        let v = Spi::get_one::<String>("SELECT bdr.bdr_version()")
            .unwrap()
            .unwrap();
        let n = Spi::get_one::<i32>("SELECT bdr.bdr_version_num()")
            .unwrap()
            .unwrap();
        assert_eq!(n, bdr_core::version::version_num(&v));
    }

    #[pg_test]
    fn every_setting_is_registered_with_its_default() {
        for s in bdr_core::settings::SETTINGS {
            let boot = Spi::get_one_with_args::<String>(
                "SELECT boot_val FROM pg_settings WHERE name = $1",
                &[s.name.into()],
            )
            .unwrap()
            .unwrap_or_else(|| panic!("{} is not in pg_settings", s.name));
            assert_eq!(boot, s.default_text(), "{}", s.name);
        }
    }

    #[pg_test]
    fn backoff_settings_are_typed() {
        assert_eq!(crate::guc::get_int("bdr.min_worker_backoff_delay"), 1000);
        assert_eq!(crate::guc::get_int("bdr.max_worker_backoff_delay"), 60000);
        assert_eq!(crate::guc::get_enum("bdr.debug_level"), "debug2");
    }

    #[pg_test(error = "invalid value for parameter \"bdr.ddl_locking\": \"sometimes\"")]
    fn enum_rejects_unknown_value() {
        Spi::run("SET bdr.ddl_locking = 'sometimes'").unwrap();
    }

    #[pg_test(error = "invalid configuration parameter name \"bdr.no_such_setting\"")]
    fn prefix_is_reserved() {
        Spi::run("SET bdr.no_such_setting = 1").unwrap();
    }

    #[pg_test]
    fn node_lifecycle() {
        let id = Spi::get_one::<pg_sys::Oid>(
            "SELECT bdr.create_node('pgtest', 'host=localhost dbname=pgrx_tests')",
        )
        .unwrap()
        .unwrap();
        assert_eq!(id.to_u32(), bdr_core::node::node_id_for("pgtest"));
        Spi::run("SELECT bdr.create_node_group('pgtestgroup')").unwrap();
        let state =
            Spi::get_one::<String>("SELECT peer_state_name FROM bdr.local_node_summary").unwrap();
        assert_eq!(state.as_deref(), Some("ACTIVE"));
        Spi::run("SELECT bdr.drop_node('pgtest')").unwrap();
        let n = Spi::get_one::<i64>("SELECT count(*) FROM bdr.node").unwrap();
        assert_eq!(n, Some(0));
    }
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'bdr'",
            "wal_level = logical",
            "track_commit_timestamp = on",
            "output_plugin_libraries = 'pgoutput, test_decoding, bdr'",
            "max_worker_processes = 32",
        ]
    }
}
