//! What a join checks here before it contacts anyone, and of this
//! database's tables and slots.

use super::*;

/// What a join checks before it contacts anyone, in the session (also for
/// a background join): returns `synchronize_structure` normalized and the
/// local node, which must be in no group.
pub(super) fn check_join_args(args: &JoinArgs<'_>) -> BdrResult<(String, catalog::LocalNode)> {
    let (join_target_dsn, synchronize_structure) = (args.target_dsn, args.synchronize_structure);
    prereq::check()?;
    if args.pause_in_standby {
        return Err(BdrError::NotSupported(
            "joining as a standby (pause_in_standby)".into(),
        ));
    }
    let sync = synchronize_structure.to_ascii_lowercase();
    if sync != "all" && sync != "none" {
        return Err(BdrError::InvalidValue {
            what: "synchronize_structure",
            msg: format!("\"{synchronize_structure}\" is not one of 'all', 'none'"),
        });
    }
    bdr_core::dsn::Dsn::parse(join_target_dsn).map_err(|err| BdrError::BadDsn {
        dsn: join_target_dsn.to_string(),
        err,
    })?;
    let local = catalog::local_node()?.ok_or(BdrError::NoLocalNode)?;
    if let Some(g) = catalog::group_name(local.node_group_id)? {
        return Err(BdrError::AlreadyInGroup {
            node: local.node_name,
            group: g,
        });
    }
    Ok((sync, local))
}

pub(super) fn check_local_tables(tables: &[Table], synchronize_structure: &str) -> BdrResult<()> {
    for t in tables {
        let exists = local_relid(t)?;
        if exists.is_none() {
            return Err(if synchronize_structure == "all" {
                BdrError::NotSupported(format!(
                    "copying the schema to a joining node (table {} is missing here; synchronize_structure 'all')",
                    t.qualified()
                ))
            } else {
                BdrError::JoinRefused {
                    msg: format!(
                        "table {} of the group does not exist on this node",
                        t.qualified()
                    ),
                    hint: "Create the group's tables on the joining node before joining.".into(),
                }
            });
        }
        let q = format!("SELECT EXISTS (SELECT 1 FROM ONLY {})", t.qualified());
        let has_rows = Spi::connect(|c| c.select(&q, None, &[])?.first().get_one::<bool>())?;
        if has_rows == Some(true) {
            return Err(BdrError::JoinRefused {
                msg: format!("table {} is not empty on the joining node", t.qualified()),
                hint: "A joining node receives the group's rows; start from empty tables.".into(),
            });
        }
    }
    Ok(())
}

/// `synchronize_structure => 'all'` copies the schema, so the joining
/// database must not have tables of its own.
pub(super) fn check_no_local_tables() -> BdrResult<()> {
    // A read-only query: Spi::get_one would assign a transaction id, and
    // then this transaction could not create its slots.
    let names: Option<String> = Spi::connect(|c| {
        c.select(
            "SELECT string_agg(format('%I.%I', n.nspname, c.relname), ', ' ORDER BY 1)
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'bdr')
                AND n.nspname NOT LIKE 'pg\\_%'",
            None,
            &[],
        )?
        .first()
        .get_one::<String>()
    })?;
    match names {
        None => Ok(()),
        Some(names) => Err(BdrError::JoinRefused {
            msg: format!(
                "the joining database already has tables ({names}); synchronize_structure 'all' copies the group's schema into an empty database"
            ),
            hint: "Join from a database that has only the bdr extension and its node, or keep these tables (they must match the group's) with synchronize_structure => 'none'.".into(),
        }),
    }
}

pub(super) fn slot_exists_local(name: &str) -> BdrResult<bool> {
    Ok(Spi::connect(|c| {
        c.select(
            "SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = $1",
            None,
            &[name.into()],
        )
        .map(|t| !t.is_empty())
    })?)
}
