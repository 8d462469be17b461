//! The local node's conflict settings: resolvers per conflict type
//! (`bdr.node_conflict_resolver_config`) and where conflicts are logged
//! (`bdr.node_log_config_data`).

use super::*;
use bdr_core::conflict::{ConflictConfig, ConflictType, Resolver};

/// The local node's conflict settings, as the writers apply them. Must run
/// inside a transaction with a snapshot.
pub fn conflict_config() -> BdrResult<ConflictConfig> {
    let mut c = ConflictConfig::default();
    Spi::connect(|client| -> BdrResult<()> {
        for row in client.select(
            "SELECT conflict_type, conflict_resolver FROM bdr.node_conflict_resolver_config",
            None,
            &[],
        )? {
            let t = row.get::<String>(1)?.unwrap_or_default();
            let r = row.get::<String>(2)?.unwrap_or_default();
            if let (Some(t), Some(r)) = (ConflictType::parse(&t), Resolver::parse(&r)) {
                c.set_resolver(t, r);
            }
        }
        for row in client.select(
            "SELECT log_to_file, log_to_table, log_conflict_type, log_conflict_res
               FROM bdr.node_log_config_data LIMIT 1",
            None,
            &[],
        )? {
            c.log_to_file = row.get::<bool>(1)?.unwrap_or(true);
            c.log_to_table = row.get::<bool>(2)?.unwrap_or(true);
            c.log_types = row.get::<Vec<Option<String>>>(3)?.map(|v| {
                v.into_iter()
                    .flatten()
                    .filter_map(|t| ConflictType::parse(&t))
                    .collect()
            });
            c.log_resolutions = row
                .get::<Vec<Option<String>>>(4)?
                .map(|v| v.into_iter().flatten().collect());
        }
        Ok(())
    })?;
    Ok(c)
}

pub fn set_conflict_resolver(t: ConflictType, r: Resolver) -> BdrResult<()> {
    Spi::run_with_args(
        "INSERT INTO bdr.node_conflict_resolver_config (conflict_type, conflict_resolver)
         VALUES ($1, $2)
         ON CONFLICT (conflict_type) DO UPDATE SET conflict_resolver = EXCLUDED.conflict_resolver",
        &[t.name().into(), r.name().into()],
    )?;
    Ok(())
}

/// `None` for types or resolutions: all of them.
pub fn set_conflict_log(
    log_to_file: bool,
    log_to_table: bool,
    types: Option<Vec<String>>,
    resolutions: Option<Vec<String>>,
) -> BdrResult<()> {
    Spi::run_with_args(
        "UPDATE bdr.node_log_config_data SET log_to_file = $1, log_to_table = $2,
                log_conflict_type = $3, log_conflict_res = $4",
        &[
            log_to_file.into(),
            log_to_table.into(),
            types.into(),
            resolutions.into(),
        ],
    )?;
    Ok(())
}
