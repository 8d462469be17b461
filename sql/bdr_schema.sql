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
