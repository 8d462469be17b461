-- bdr catalog tables. Created first (bootstrap), before the functions.
-- Column names follow BDR 4's catalogs so that BDR users' queries work.

CREATE TABLE bdr.node_group (
    node_group_id oid PRIMARY KEY,
    node_group_name name NOT NULL UNIQUE,
    node_group_default_repset oid NOT NULL DEFAULT 0,
    node_group_default_repset_ext oid NOT NULL DEFAULT 0,
    node_group_parent_id oid NOT NULL DEFAULT 0,
    node_group_flags integer NOT NULL DEFAULT 0,
    node_group_uuid uuid NOT NULL,
    node_group_apply_delay interval NOT NULL DEFAULT '0',
    node_group_check_constraints boolean NOT NULL DEFAULT true,
    node_group_num_writers integer NOT NULL DEFAULT -1,
    node_group_enable_wal_decoder boolean NOT NULL DEFAULT false,
    node_group_streaming_mode "char" NOT NULL DEFAULT 'D'
);

CREATE TABLE bdr.node (
    node_id oid PRIMARY KEY,
    node_name name NOT NULL UNIQUE,
    -- 0 while the node is not a member of any group
    node_group_id oid NOT NULL DEFAULT 0,
    source_node_id oid NOT NULL DEFAULT 0,
    synchronize_structure "char" NOT NULL DEFAULT 'n',
    node_state oid NOT NULL,
    target_state oid NOT NULL,
    seq_id integer NOT NULL DEFAULT 0,
    dbname name NOT NULL,
    node_dsn text NOT NULL,
    proto_version_ranges integer[] NOT NULL
);

-- The node this database is. At most one row.
CREATE TABLE bdr.local_node (
    node_id oid PRIMARY KEY REFERENCES bdr.node (node_id),
    pub_repsets text[],
    sub_repsets text[]
);
CREATE UNIQUE INDEX local_node_single_row ON bdr.local_node ((true));

CREATE TABLE bdr.subscription (
    sub_id oid PRIMARY KEY,
    sub_name name NOT NULL UNIQUE,
    nodegroup_id oid NOT NULL,
    origin_node_id oid NOT NULL,
    source_node_id oid NOT NULL,
    target_node_id oid NOT NULL,
    -- 'n' normal
    subscription_mode "char" NOT NULL DEFAULT 'n',
    sub_enabled boolean NOT NULL DEFAULT true,
    apply_delay interval NOT NULL DEFAULT '0',
    slot_name name NOT NULL,
    origin_name name NOT NULL,
    num_writers integer NOT NULL DEFAULT -1,
    streaming_mode "char" NOT NULL DEFAULT 'D',
    replication_sets text[],
    forward_origins text[]
);

-- Keys of recently deleted rows (see src/tombstone.rs). Local to each node;
-- the row's xmin is the deleting transaction. Old entries are purged by the
-- manager.
CREATE TABLE bdr.tombstone (
    relid oid NOT NULL,
    key_hash text NOT NULL,
    PRIMARY KEY (relid, key_hash)
);

-- Conflict resolvers this node uses instead of BDR 4's defaults
-- (bdr.alter_node_set_conflict_resolver). Local to each node, as in BDR 4.
CREATE TABLE bdr.node_conflict_resolver_config (
    conflict_type text PRIMARY KEY,
    conflict_resolver text NOT NULL
);

-- Where this node logs conflicts (bdr.alter_node_set_log_config). One row.
CREATE TABLE bdr.node_log_config_data (
    log_name name PRIMARY KEY DEFAULT 'default',
    log_to_file boolean NOT NULL DEFAULT true,
    log_to_table boolean NOT NULL DEFAULT true,
    log_conflict_type text[],
    log_conflict_res text[]
);
INSERT INTO bdr.node_log_config_data DEFAULT VALUES;

-- Every conflict the writers of this node met, and how it was resolved.
-- Local to each node (schema bdr is never replicated). Rows older than 30
-- days are purged by the manager. Row-level security: a user sees the
-- conflicts of the tables he owns (superusers see all).
CREATE TABLE bdr.conflict_history (
    sub_id oid NOT NULL,
    local_xid xid,
    local_lsn pg_lsn,
    local_time timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    remote_xid xid,
    remote_commit_lsn pg_lsn,
    remote_commit_time timestamptz,
    conflict_type text NOT NULL,
    conflict_resolution text NOT NULL,
    conflict_index regclass,
    reloid oid,
    nspname text,
    relname text,
    key_tuple json,
    remote_tuple json,
    local_tuple json,
    apply_tuple json,
    local_tuple_xmin xid,
    local_tuple_node_id oid,
    local_tuple_commit_time timestamptz
);
CREATE INDEX conflict_history_local_time ON bdr.conflict_history (local_time);
-- No key; bdr_replica_identity_check (FOR ALL TABLES) would refuse deletes
-- (the purge, or a user's).
ALTER TABLE bdr.conflict_history REPLICA IDENTITY FULL;
ALTER TABLE bdr.conflict_history ENABLE ROW LEVEL SECURITY;
CREATE POLICY conflict_history_table_owner ON bdr.conflict_history FOR SELECT
    USING (EXISTS (SELECT 1 FROM pg_catalog.pg_class c
                    WHERE c.oid = reloid AND pg_catalog.pg_has_role(c.relowner, 'USAGE')));
GRANT SELECT ON bdr.conflict_history TO PUBLIC;

-- Tables dropped on this node in the last day, for the resolver
-- skip_if_recently_dropped of target_table_missing.
CREATE TABLE bdr.dropped_relation (
    nspname text NOT NULL,
    relname text NOT NULL,
    dropped_at timestamptz NOT NULL,
    PRIMARY KEY (nspname, relname)
);

-- Where a node that joined starts streaming from each member other than its
-- join target: that member's earlier changes came with the copy of the
-- target's data. Used until the subscription's origin has moved past it.
CREATE TABLE bdr.subscription_start (
    origin_node_id oid PRIMARY KEY,
    start_lsn pg_lsn NOT NULL
);

-- A join requested with wait_for_completion => false: the manager of this
-- database runs it. last_error is set when it failed (it is not retried;
-- bdr.join_node_group again replaces the request).
CREATE TABLE bdr.join_request (
    node_id oid PRIMARY KEY,
    join_target_dsn text NOT NULL,
    node_group_name name,
    synchronize_structure text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    last_error text,
    last_error_at timestamptz
);

-- Who really last wrote (or deleted) the rows a join copied here: copied
-- rows commit with the earliest timestamp, so the writers look them up here
-- to resolve a conflict as the join target would. Filled from the target in
-- the join's snapshot; purged with old tombstones.
CREATE TABLE bdr.copied_row (
    relid oid NOT NULL,
    key_hash text NOT NULL,
    -- microseconds since 2000-01-01, as PostgreSQL counts; NULL: unknown
    commit_us bigint,
    node_id oid,
    deleted boolean NOT NULL,
    copied_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
CREATE INDEX copied_row_key ON bdr.copied_row (relid, key_hash);
-- No key; bdr_replica_identity_check (FOR ALL TABLES) would refuse deletes.
ALTER TABLE bdr.copied_row REPLICA IDENTITY FULL;

-- Consensus (src/consensus/): this node's part of the group's Raft log,
-- its durable Raft state, and the state machine the log builds. Written by
-- the consensus worker only, flushed before it answers (synchronous_commit
-- local).
CREATE TABLE bdr.global_consensus_journal (
    log_index bigint PRIMARY KEY,
    term bigint NOT NULL,
    -- the proposing node and its request (0 for Raft's own entries)
    origin oid NOT NULL,
    req_id bigint NOT NULL,
    -- the Raft entry as raft-rs encodes it (protobuf)
    req_payload bytea NOT NULL,
    trace_context bytea
);

CREATE TABLE bdr.local_consensus_state (
    node_id oid PRIMARY KEY,
    current_term bigint NOT NULL,
    apply_index bigint NOT NULL,
    voted_for oid NOT NULL,
    last_known_leader oid NOT NULL,
    commit_index bigint NOT NULL,
    -- the voters (raft-rs ConfState, protobuf) as of apply_index
    conf_state bytea NOT NULL,
    -- the state machine (bdr_core::consensus::State) as of apply_index
    sm_state bytea NOT NULL
);

-- Where the log was last compacted, with the state machine as of there.
CREATE TABLE bdr.local_consensus_snapshot (
    log_index bigint NOT NULL,
    log_term bigint NOT NULL,
    snapshot bytea NOT NULL
);
ALTER TABLE bdr.local_consensus_snapshot REPLICA IDENTITY FULL;


-- Global sequences (src/sequence/): the kind of every sequence created or
-- converted since bdr was installed ('l' local, 's' snowflakeid, 't'
-- timeshard, 'g' galloc; a sequence with no row is local). Each node
-- writes its own rows when it runs the replicated
-- bdr.alter_sequence_set_kind, so oids are this node's. For galloc, the
-- chunks this node holds: the current one is the range of the sequence
-- itself, the reserved one is next.
CREATE TABLE bdr.sequence_kind (
    seqid oid PRIMARY KEY,
    seqkind "char" NOT NULL,
    -- galloc: where the group's first chunk starts, and the sequence's name
    -- in the consensus state (its qualified name when it was converted,
    -- kept through renames)
    start_value bigint,
    alloc_key text,
    current_start bigint,
    current_end bigint,
    reserved_start bigint,
    reserved_end bigint
);
