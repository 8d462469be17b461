//! The catalog rows join and part write: the group and the members a join
//! copies, a node's state and connection string, the join requested to run
//! in the background (`bdr.join_request`), and where streaming from each
//! member starts after a join (`bdr.subscription_start`).

use super::*;

/// Records a node's state (and target state) here.
pub fn set_node_state(node_id: u32, state: NodeState) -> BdrResult<()> {
    Spi::run_with_args(
        "UPDATE bdr.node SET node_state = $2, target_state = $2 WHERE node_id = $1",
        &[oid(node_id).into(), oid(state.oid()).into()],
    )?;
    Ok(())
}

/// Records the local node as joining in the background: JOIN_START,
/// heading for ACTIVE.
pub fn set_local_join_started(node_id: u32) -> BdrResult<()> {
    Spi::run_with_args(
        "UPDATE bdr.node SET node_state = $2, target_state = $3 WHERE node_id = $1",
        &[
            oid(node_id).into(),
            oid(NodeState::JoinStart.oid()).into(),
            oid(NodeState::Active.oid()).into(),
        ],
    )?;
    Ok(())
}

/// The local node back to CREATED after a failed background join.
pub fn reset_local_node_state() -> BdrResult<()> {
    Spi::run_with_args(
        "UPDATE bdr.node n SET node_state = $1, target_state = $1
           FROM bdr.local_node l WHERE n.node_id = l.node_id",
        &[oid(NodeState::Created.oid()).into()],
    )?;
    Ok(())
}

pub fn set_node_dsn(node_id: u32, dsn: &str) -> BdrResult<()> {
    Spi::run_with_args(
        "UPDATE bdr.node SET node_dsn = $2 WHERE node_id = $1",
        &[oid(node_id).into(), dsn.into()],
    )?;
    Ok(())
}

/// Adds or updates a node of the group as another member recorded it.
pub fn upsert_node(
    id: u32,
    name: &str,
    dsn: &str,
    dbname: &str,
    group_id: u32,
    state: NodeState,
    seq_id: i32,
) -> BdrResult<()> {
    Spi::run_with_args(
        "INSERT INTO bdr.node (node_id, node_name, node_group_id, source_node_id, node_state, target_state,
                               seq_id, dbname, node_dsn, proto_version_ranges)
         VALUES ($1, $2::name, $3, $1, $4, $4, $8, $5::name, $6, ARRAY[$7, $7])
         ON CONFLICT (node_id) DO UPDATE SET node_group_id = EXCLUDED.node_group_id,
                node_state = EXCLUDED.node_state, target_state = EXCLUDED.target_state,
                dbname = EXCLUDED.dbname, node_dsn = EXCLUDED.node_dsn,
                seq_id = CASE WHEN EXCLUDED.seq_id > 0 THEN EXCLUDED.seq_id ELSE bdr.node.seq_id END",
        &[
            oid(id).into(),
            name.into(),
            oid(group_id).into(),
            oid(state.oid()).into(),
            dbname.into(),
            dsn.into(),
            bdr_core::version::PROTOCOL_VERSION.into(),
            seq_id.into(),
        ],
    )?;
    Ok(())
}

/// The node other than `node_id` that holds sequence id `seq_id`, if any.
pub fn node_with_seq_id(seq_id: i32, node_id: u32) -> BdrResult<Option<String>> {
    select_first(
        "SELECT node_name::text FROM bdr.node WHERE seq_id = $1 AND node_id <> $2",
        &[seq_id.into(), oid(node_id).into()],
        |row| text_col(row, 1),
    )
}

/// The group a join copies, as the join target records it.
pub fn insert_joined_group(gid: u32, name: &str, uuid: &str) -> BdrResult<()> {
    Spi::run_with_args(
        "INSERT INTO bdr.node_group (node_group_id, node_group_name, node_group_uuid)
         VALUES ($1, $2::name, $3::uuid) ON CONFLICT DO NOTHING",
        &[oid(gid).into(), name.into(), uuid.into()],
    )?;
    Ok(())
}

/// Streaming from `origin_node_id` starts at `lsn` (what the join copied
/// of its changes ends there).
pub fn set_subscription_start(origin_node_id: u32, lsn: u64) -> BdrResult<()> {
    Spi::run_with_args(
        "INSERT INTO bdr.subscription_start (origin_node_id, start_lsn) VALUES ($1, $2::pg_lsn)
         ON CONFLICT (origin_node_id) DO UPDATE SET start_lsn = EXCLUDED.start_lsn",
        &[
            oid(origin_node_id).into(),
            bdr_core::lsn::format(lsn).as_str().into(),
        ],
    )?;
    Ok(())
}

/// Where streaming from `origin_node_id` starts, if a join recorded it.
pub fn subscription_start(origin_node_id: u32) -> BdrResult<Option<u64>> {
    Ok(select_first(
        "SELECT start_lsn::text FROM bdr.subscription_start WHERE origin_node_id = $1",
        &[oid(origin_node_id).into()],
        |row| text_col(row, 1),
    )?
    .and_then(|l| bdr_core::lsn::parse(&l)))
}

/// A join requested with `wait_for_completion => false`.
pub struct JoinRequest {
    pub dsn: String,
    pub group: Option<String>,
    pub sync: String,
    /// Why it failed, once it has.
    pub last_error: Option<String>,
}

/// The local node's join request, if there is one.
pub fn join_request() -> BdrResult<Option<JoinRequest>> {
    select_first(
        "SELECT r.join_target_dsn, r.node_group_name::text, r.synchronize_structure, r.last_error
           FROM bdr.join_request r JOIN bdr.local_node l USING (node_id)",
        &[],
        |row| {
            Ok(JoinRequest {
                dsn: text_col(row, 1)?,
                group: row.get::<String>(2)?,
                sync: text_col(row, 3)?,
                last_error: row.get::<String>(4)?,
            })
        },
    )
}

/// Whether a background join is pending (requested and not failed).
pub fn join_pending() -> BdrResult<bool> {
    Ok(join_request()?.is_some_and(|r| r.last_error.is_none()))
}

pub fn record_join_request(
    node_id: u32,
    dsn: &str,
    group: Option<&str>,
    sync: &str,
) -> BdrResult<()> {
    Spi::run_with_args(
        "INSERT INTO bdr.join_request (node_id, join_target_dsn, node_group_name, synchronize_structure)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (node_id) DO UPDATE SET join_target_dsn = EXCLUDED.join_target_dsn,
             node_group_name = EXCLUDED.node_group_name,
             synchronize_structure = EXCLUDED.synchronize_structure,
             requested_at = now(), last_error = NULL, last_error_at = NULL",
        &[oid(node_id).into(), dsn.into(), group.into(), sync.into()],
    )?;
    Ok(())
}

pub fn record_join_failure(msg: &str) -> BdrResult<()> {
    Spi::run_with_args(
        "UPDATE bdr.join_request SET last_error = $1, last_error_at = now()",
        &[msg.into()],
    )?;
    Ok(())
}

/// Whatever join was requested is done, or moot.
pub fn clear_join_requests() -> BdrResult<()> {
    Spi::run("DELETE FROM bdr.join_request")?;
    Ok(())
}

/// Drops the slots and origins of parted nodes here that are not in use;
/// returns how many it dropped.
pub fn drop_parted_artifacts(slots: &[String], origins: &[String]) -> BdrResult<i32> {
    Ok(Spi::get_one_with_args::<i32>(
        "SELECT bdr._drop_parted_artifacts($1, $2)",
        &[slots.to_vec().into(), origins.to_vec().into()],
    )?
    .unwrap_or(0))
}

/// The name of this database.
pub fn current_database() -> BdrResult<String> {
    Ok(select_first("SELECT current_database()::text", &[], |row| {
        text_col(row, 1)
    })?
    .unwrap_or_default())
}
