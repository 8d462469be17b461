//! bdr: asynchronous multi-master logical replication for PostgreSQL.
//!
//! `_PG_init` refuses to load unless bdr is in `shared_preload_libraries`,
//! then registers the settings, shared memory, hooks and the supervisor.

use pgrx::prelude::*;

pub mod api;
pub mod apply;
pub mod catalog;
pub mod conflict_settings;
pub mod consensus;
pub mod ddl;
pub mod dmllock;
pub mod error;
pub mod globallock;
pub mod guc;
pub mod hlc;
pub mod hooks;
pub mod join;
pub mod log;
pub mod node;
pub mod output_plugin;
pub mod part;
pub mod peer;
pub mod pg;
pub mod prereq;
pub mod relcache;
pub mod sequence;
pub mod shmem;
pub mod stats;
pub mod tombstone;
pub mod walrcv;
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
    hlc::init();
    consensus::shmem::init();
    stats::init();
    hooks::init();
    dmllock::init();
    sequence::init();
    sequence::generator::init();
    sequence::planner::init();
    workers::init();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    use crate::guc;
    use pgrx::spi;

    #[pg_test]
    fn version_num_matches_version() -> Result<(), spi::Error> {
        let v = Spi::get_one::<String>("SELECT bdr.bdr_version()")?;
        let n = Spi::get_one::<i32>("SELECT bdr.bdr_version_num()")?;
        assert_eq!(n, v.map(|v| bdr_core::version::version_num(&v)));
        Ok(())
    }

    #[pg_test]
    fn every_setting_is_registered_with_its_default() -> Result<(), spi::Error> {
        for s in bdr_core::settings::SETTINGS {
            let boot = Spi::get_one_with_args::<String>(
                "SELECT boot_val FROM pg_settings WHERE name = $1",
                &[s.name.into()],
            )?;
            assert_eq!(boot, Some(s.default_text()), "{}", s.name);
        }
        Ok(())
    }

    #[pg_test]
    fn backoff_settings_are_typed() {
        assert_eq!(guc::get_int(guc::MIN_WORKER_BACKOFF_DELAY), 1000);
        assert_eq!(guc::get_int(guc::MAX_WORKER_BACKOFF_DELAY), 60000);
        assert_eq!(guc::get_enum(guc::DEBUG_LEVEL), "debug2");
    }

    #[pg_test(error = "invalid value for parameter \"bdr.ddl_locking\": \"sometimes\"")]
    fn enum_rejects_unknown_value() -> Result<(), spi::Error> {
        Spi::run("SET bdr.ddl_locking = 'sometimes'")
    }

    #[pg_test(error = "invalid configuration parameter name \"bdr.no_such_setting\"")]
    fn prefix_is_reserved() -> Result<(), spi::Error> {
        Spi::run("SET bdr.no_such_setting = 1")
    }

    #[pg_test]
    fn node_lifecycle() -> Result<(), spi::Error> {
        let id = Spi::get_one::<pg_sys::Oid>(
            "SELECT bdr.create_node('pgtest', 'host=localhost dbname=pgrx_tests')",
        )?;
        assert_eq!(
            id.map(|o| o.to_u32()),
            Some(bdr_core::node::node_id_for("pgtest"))
        );
        Spi::run("SELECT bdr.create_node_group('pgtestgroup')")?;
        let state = Spi::get_one::<String>("SELECT peer_state_name FROM bdr.local_node_summary")?;
        assert_eq!(state.as_deref(), Some("ACTIVE"));
        Spi::run("SELECT bdr.drop_node('pgtest')")?;
        let n = Spi::get_one::<i64>("SELECT count(*) FROM bdr.node")?;
        assert_eq!(n, Some(0));
        Ok(())
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
