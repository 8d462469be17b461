-- Views and SQL-language functions over the Rust functions. Runs last.

CREATE FUNCTION bdr._ts(us bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS
$$ SELECT CASE WHEN us = 0 THEN NULL
               ELSE timestamptz '2000-01-01 00:00:00+00' + us * interval '1 microsecond' END $$;

CREATE VIEW bdr.node_summary AS
SELECT n.node_name,
       g.node_group_name,
       n.node_dsn AS interface_connstr,
       bdr.peer_state_name(n.node_state) AS peer_state_name,
       bdr.peer_state_name(n.target_state) AS peer_target_state_name,
       n.seq_id AS node_seq_id,
       n.dbname AS node_local_dbname,
       n.node_id,
       n.node_group_id
  FROM bdr.node n
  LEFT JOIN bdr.node_group g ON g.node_group_id = n.node_group_id;

CREATE VIEW bdr.local_node_summary AS
SELECT s.node_name,
       s.node_group_name,
       s.interface_connstr,
       s.peer_state_name,
       s.peer_target_state_name,
       s.node_seq_id,
       s.node_local_dbname,
       s.node_id,
       s.node_group_id,
       l.pub_repsets,
       l.sub_repsets
  FROM bdr.node_summary s
  JOIN bdr.local_node l ON l.node_id = s.node_id;

CREATE VIEW bdr.worker_tasks AS
SELECT t.role AS task_key_worker_role,
       t.role_name AS task_key_worker_role_name,
       NULLIF(t.dboid, 0)::oid AS task_key_dboid,
       d.datname,
       NULLIF(t.subid, 0)::oid AS task_key_subid,
       s.sub_name,
       NULL::text AS task_key_ext_libname,
       NULL::text AS task_key_ext_funcname,
       NULL::text AS task_key_ext_workername,
       NULL::oid AS task_key_remoterelid,
       NULLIF(t.pid, 0) AS task_pid,
       bdr._ts(t.registered) AS task_registered,
       now() - bdr._ts(t.registered) AS since_registered,
       bdr._ts(t.attached) AS task_attached,
       now() - bdr._ts(t.attached) AS since_attached,
       bdr._ts(t.exited) AS task_exited,
       now() - bdr._ts(t.exited) AS since_exited,
       t.success AS task_success,
       bdr._ts(t.next_launch_not_before) AS task_next_launch_not_before,
       GREATEST(bdr._ts(t.next_launch_not_before) - now(), interval '0') AS until_launch_allowed,
       NULLIF(t.last_request_pid, 0) AS task_last_launch_requestor_pid,
       bdr._ts(t.last_request_time) AS task_last_launch_request_time,
       now() - bdr._ts(t.last_request_time) AS since_last_request,
       t.last_request_approved AS task_last_launch_request_approved,
       t.nrequests AS task_nrequests,
       t.nregistrations AS task_nregistrations,
       NULLIF(t.prev_pid, 0) AS task_prev_pid,
       bdr._ts(t.prev_registered) AS task_prev_registered,
       now() - bdr._ts(t.prev_registered) AS since_prev_registered,
       bdr._ts(t.prev_launched) AS task_prev_launched,
       now() - bdr._ts(t.prev_launched) AS since_prev_launched,
       bdr._ts(t.prev_exited) AS task_prev_exited,
       now() - bdr._ts(t.prev_exited) AS since_prev_exited,
       bdr._ts(t.first_registered) AS task_first_registered,
       now() - bdr._ts(t.first_registered) AS since_first_registered,
       t.failures AS task_consecutive_failures
  FROM bdr._worker_tasks() t
  LEFT JOIN pg_catalog.pg_database d ON d.oid = t.dboid
  LEFT JOIN bdr.subscription s ON s.sub_id = t.subid;

CREATE VIEW bdr.subscription_summary AS
SELECT g.node_group_name,
       s.sub_name,
       o.node_name AS origin_name,
       t.node_name AS target_name,
       s.sub_enabled,
       s.slot_name AS sub_slot_name,
       s.replication_sets AS sub_replication_sets,
       s.forward_origins AS sub_forward_origins,
       s.apply_delay AS sub_apply_delay,
       s.origin_name AS sub_origin_name,
       s.subscription_mode AS bdr_subscription_mode,
       CASE WHEN NOT s.sub_enabled THEN 'disabled'
            WHEN r.connected THEN 'replicating'
            WHEN r.pid IS NOT NULL AND r.pid <> 0 THEN 'connecting'
            ELSE 'down' END AS subscription_status,
       s.nodegroup_id AS node_group_id,
       s.sub_id,
       s.origin_node_id AS origin_id,
       s.target_node_id AS target_id,
       NULLIF(r.recv_lsn, '0/0')::pg_lsn AS receive_lsn,
       NULLIF(r.recv_commit_lsn, '0/0')::pg_lsn AS receive_commit_lsn,
       NULLIF(w.replay_lsn, '0/0')::pg_lsn AS last_xact_replay_lsn,
       NULLIF(r.flush_lsn, '0/0')::pg_lsn AS last_xact_flush_lsn,
       bdr._ts(w.replay_time) AS last_xact_replay_timestamp,
       COALESCE(w.ncommits, 0) AS nxacts_applied
  FROM bdr.subscription s
  JOIN bdr.local_node l ON l.node_id = s.target_node_id
  LEFT JOIN bdr.node o ON o.node_id = s.origin_node_id
  LEFT JOIN bdr.node t ON t.node_id = s.target_node_id
  LEFT JOIN bdr.node_group g ON g.node_group_id = s.nodegroup_id
  LEFT JOIN bdr._worker_status() r ON r.role_name = 'receiver' AND r.subid = s.sub_id
       AND r.dboid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database())
  LEFT JOIN bdr._worker_status() w ON w.role_name = 'writer' AND w.subid = s.sub_id
       AND w.dboid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database());

-- Outgoing replication: the slots peers stream from, with their walsenders.
CREATE VIEW bdr.node_slots AS
SELECT n.dbname AS target_dbname,
       g.node_group_name,
       g.node_group_id,
       lo.node_name AS origin_name,
       n.node_name AS target_name,
       lo.node_id AS origin_id,
       n.node_id AS target_id,
       sl.slot_name AS local_slot_name,
       sl.slot_name,
       false AS is_group_slot,
       false AS is_decoder_slot,
       sl.plugin,
       sl.slot_type,
       sl.datoid,
       sl.database,
       sl.temporary,
       sl.active,
       sl.active_pid,
       sl.xmin,
       sl.catalog_xmin,
       sl.restart_lsn,
       sl.confirmed_flush_lsn,
       sr.usesysid,
       sr.usename,
       sr.application_name,
       sr.client_addr,
       sr.client_hostname,
       sr.client_port,
       sr.backend_start,
       COALESCE(sr.state, 'disconnected') AS state,
       sr.sent_lsn,
       sr.write_lsn,
       sr.flush_lsn,
       sr.replay_lsn,
       sr.write_lag,
       sr.flush_lag,
       sr.replay_lag,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), sr.sent_lsn) AS sent_lag_bytes,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), sr.write_lsn) AS write_lag_bytes,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), COALESCE(sr.flush_lsn, sl.confirmed_flush_lsn)) AS flush_lag_bytes,
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), sr.replay_lsn) AS replay_lag_bytes,
       pg_catalog.pg_size_pretty(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), sr.sent_lsn)) AS sent_lag_size,
       pg_catalog.pg_size_pretty(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), sr.write_lsn)) AS write_lag_size,
       pg_catalog.pg_size_pretty(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), COALESCE(sr.flush_lsn, sl.confirmed_flush_lsn))) AS flush_lag_size,
       pg_catalog.pg_size_pretty(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), sr.replay_lsn)) AS replay_lag_size,
       -- WAL this node keeps for the peer (from the slot's restart_lsn).
       pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), sl.restart_lsn)::bigint AS retained_wal_bytes,
       pg_catalog.pg_size_pretty(pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), sl.restart_lsn)) AS retained_wal_size,
       sl.wal_status,
       sl.safe_wal_size
  FROM bdr.local_node l
  JOIN bdr.node lo ON lo.node_id = l.node_id
  JOIN bdr.node_group g ON g.node_group_id = lo.node_group_id
  JOIN bdr.node n ON n.node_group_id = lo.node_group_id AND n.node_id <> lo.node_id
  JOIN pg_catalog.pg_replication_slots sl
    ON sl.slot_name = bdr._slot_name(current_database(), g.node_group_name, n.node_name)
  LEFT JOIN pg_catalog.pg_stat_replication sr ON sr.pid = sl.active_pid;

CREATE VIEW bdr.worker_errors AS
SELECT g.node_group_name,
       o.node_name AS origin_name,
       o.node_name AS source_name,
       t.node_name AS target_name,
       s.sub_name,
       e.role AS worker_role,
       e.role_name AS worker_role_name,
       e.last_error_pid AS worker_pid,
       bdr._ts(e.last_error_time) AS error_time,
       now() - bdr._ts(e.last_error_time) AS error_age,
       e.last_error AS error_message,
       NULL::text AS error_context_message,
       NULL::oid AS remoterelid
  FROM bdr._worker_status() e
  LEFT JOIN bdr.subscription s ON s.sub_id = e.subid
  LEFT JOIN bdr.node o ON o.node_id = s.origin_node_id
  LEFT JOIN bdr.node t ON t.node_id = s.target_node_id
  LEFT JOIN bdr.node_group g ON g.node_group_id = s.nodegroup_id
 WHERE e.last_error IS NOT NULL
   AND (e.dboid = 0 OR e.dboid = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()));

-- Waits until the bdr slots of this database (or the one named) have
-- confirmed target_lsn (by default the current WAL insert position).
CREATE FUNCTION bdr.wait_slot_confirm_lsn(slot_name text DEFAULT NULL, target_lsn pg_lsn DEFAULT NULL)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    target pg_lsn := COALESCE(target_lsn, bdr._wal_insert_end_lsn()::pg_lsn);
    behind int;
BEGIN
    IF slot_name IS NOT NULL AND NOT EXISTS (
        SELECT 1 FROM pg_catalog.pg_replication_slots s WHERE s.slot_name = wait_slot_confirm_lsn.slot_name) THEN
        RAISE EXCEPTION 'replication slot "%" does not exist', slot_name
            USING ERRCODE = 'undefined_object', HINT = 'See bdr.node_slots for the slots of this node.';
    END IF;
    LOOP
        SELECT count(*) INTO behind
          FROM pg_catalog.pg_replication_slots s
         WHERE s.plugin = 'bdr' AND s.database = current_database()
           AND (wait_slot_confirm_lsn.slot_name IS NULL OR s.slot_name = wait_slot_confirm_lsn.slot_name)
           AND (s.confirmed_flush_lsn IS NULL OR s.confirmed_flush_lsn < target);
        EXIT WHEN behind = 0;
        PERFORM pg_catalog.pg_sleep(0.05);
    END LOOP;
END $$;

-- Pausing and resuming what a node receives. The manager stops or starts the
-- subscription's receiver; a paused peer keeps its WAL for us (its slot).
CREATE FUNCTION bdr._set_subscription_enabled(subscription_name name, enabled boolean) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    n int;
BEGIN
    UPDATE bdr.subscription s SET sub_enabled = enabled
     WHERE (subscription_name IS NULL OR s.sub_name = subscription_name)
       AND s.target_node_id = (SELECT node_id FROM bdr.local_node);
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 AND subscription_name IS NOT NULL THEN
        RAISE EXCEPTION 'subscription "%" does not exist on this node', subscription_name
            USING ERRCODE = 'undefined_object', HINT = 'See bdr.subscription_summary for this node''s subscriptions.';
    END IF;
    PERFORM bdr._wake_manager_at_commit();
END $$;

CREATE FUNCTION bdr.alter_subscription_disable(subscription_name name DEFAULT NULL, immediate boolean DEFAULT false)
RETURNS boolean LANGUAGE sql AS $$
    SELECT bdr._set_subscription_enabled(subscription_name, false); SELECT true $$;

CREATE FUNCTION bdr.alter_subscription_enable(subscription_name name DEFAULT NULL, immediate boolean DEFAULT false)
RETURNS boolean LANGUAGE sql AS $$
    SELECT bdr._set_subscription_enabled(subscription_name, true); SELECT true $$;

REVOKE ALL ON FUNCTION bdr.alter_subscription_disable(name, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.alter_subscription_enable(name, boolean) FROM PUBLIC;

-- UPDATE and DELETE need a replica identity to replicate. A publication of
-- every table makes PostgreSQL itself refuse them on tables without one, on
-- the node where they are made (temporary and unlogged tables are exempt).
-- It is never streamed from; bdr's own output plugin does that.
CREATE PUBLICATION bdr_replica_identity_check FOR ALL TABLES WITH (publish = 'update, delete');

-- Every replicated table gets the trigger that notes deleted keys: the ones
-- that exist now, and new ones as they are created.
CREATE FUNCTION bdr._add_tombstone_trigger(rel regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = rel AND tgname = 'bdr_tombstone') THEN
        EXECUTE format('CREATE TRIGGER bdr_tombstone AFTER DELETE ON %s FOR EACH ROW EXECUTE FUNCTION bdr._tombstone_trigger()', rel);
    END IF;
    -- A key-changing UPDATE deletes the old key (bdr._key_change_trigger).
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = rel AND tgname = 'bdr_tombstone_key') THEN
        EXECUTE format('CREATE TRIGGER bdr_tombstone_key BEFORE UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION bdr._key_change_trigger()', rel);
    END IF;
END $$;

-- Whether a table's rows replicate (bdr._replicates, bdr_core::tables).
CREATE FUNCTION bdr._replicated_table(rel oid) RETURNS boolean
LANGUAGE sql STABLE AS $$
SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel AND bdr._replicates(c.relkind, c.relpersistence, n.nspname))
$$;

-- The tables that carry the tombstone triggers: those whose rows replicate
-- and partitioned tables, whose triggers PostgreSQL clones onto their
-- partitions (so partitions get none of their own).
CREATE FUNCTION bdr._tombstone_table(rel oid) RETURNS boolean
LANGUAGE sql STABLE AS $$
SELECT EXISTS (
    SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = rel AND NOT c.relispartition
       AND bdr._replicates(CASE c.relkind WHEN 'p' THEN 'r' ELSE c.relkind END, c.relpersistence, n.nspname))
$$;

CREATE FUNCTION bdr._on_create_table() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
DECLARE
    obj record;
BEGIN
    FOR obj IN SELECT * FROM pg_catalog.pg_event_trigger_ddl_commands() WHERE object_type = 'table' LOOP
        IF bdr._tombstone_table(obj.objid) THEN
            PERFORM bdr._add_tombstone_trigger(obj.objid::regclass);
        END IF;
    END LOOP;
END $$;

CREATE EVENT TRIGGER bdr_tombstone_on_create ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
    EXECUTE FUNCTION bdr._on_create_table();
-- Also for tables a writer creates when it replays a peer's DDL (writers
-- run with session_replication_role = replica).
ALTER EVENT TRIGGER bdr_tombstone_on_create ENABLE ALWAYS;

SELECT bdr._add_tombstone_trigger(c.oid::regclass)
  FROM pg_catalog.pg_class c WHERE bdr._tombstone_table(c.oid);

-- The trigger notes deletes made by any role, in bdr's own table.
ALTER FUNCTION bdr._tombstone_trigger() SECURITY DEFINER SET search_path = pg_catalog;
ALTER FUNCTION bdr._key_change_trigger() SECURITY DEFINER SET search_path = pg_catalog;

-- Functions BDR 4 users call that this version does not provide yet. They
-- fail loudly instead of pretending to work.
CREATE FUNCTION bdr._not_implemented(function_name text, hint text DEFAULT 'See docs/nodes.md.')
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is not implemented yet', function_name
        USING ERRCODE = 'feature_not_supported', HINT = hint;
END $$;



REVOKE ALL ON FUNCTION bdr.create_node(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.create_node_group(text, text, boolean, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.drop_node(text, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.worker_task_reset_backoff_all() FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.join_node_group(text, text, boolean, boolean, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr._join_register(bigint, text, text, text, bigint, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr._join_activate(bigint) FROM PUBLIC;

-- CREATE EXTENSION fails here, with a hint, if the server is not set up for bdr.
SELECT bdr._check_prerequisites();

-- Conflicts ---------------------------------------------------------------

-- The resolver this node applies to each conflict type.
CREATE VIEW bdr.node_conflict_resolvers AS
SELECT t.conflict_type, COALESCE(c.conflict_resolver, t.default_resolver) AS conflict_resolver
  FROM bdr._conflict_types() t
  LEFT JOIN bdr.node_conflict_resolver_config c ON c.conflict_type = t.conflict_type
 ORDER BY t.ord;

CREATE VIEW bdr.node_log_config AS
SELECT log_name, log_to_file, log_to_table, log_conflict_type, log_conflict_res
  FROM bdr.node_log_config_data;

-- Conflicts without any user data, for monitoring by every role.
CREATE VIEW bdr.conflict_history_summary AS
SELECT nspname, relname, local_time, local_tuple_commit_time, remote_commit_time,
       conflict_type, conflict_resolution
  FROM bdr.conflict_history;
GRANT SELECT ON bdr.conflict_history_summary TO PUBLIC;

-- Apply statistics per subscription, with a counter per conflict type.
CREATE VIEW bdr.stat_subscription AS
SELECT s.sub_name, st.subid,
       st.counters[1] AS nconnect, st.counters[2] AS ncommit, st.counters[3] AS nabort,
       st.counters[4] AS nerror, st.counters[5] AS nskippedtx, st.counters[6] AS ninsert,
       st.counters[7] AS nupdate, st.counters[8] AS ndelete, st.counters[9] AS ntruncate,
       0::bigint AS nddl, st.counters[10] AS ndeadlocks, st.counters[11] AS nretries,
       bdr._ts(NULLIF(st.counters[12], 0)) AS connect_time,
       bdr._ts(NULLIF(st.counters[13], 0)) AS last_disconnect_time,
       CASE WHEN st.start_lsn = 0 THEN NULL ELSE pg_catalog.pg_lsn('0/0') + st.start_lsn END AS start_lsn,
       st.counters[14] AS retries_at_same_lsn, st.counters[15] AS curr_ncommit,
       (SELECT sum(x) FROM pg_catalog.unnest(st.conflicts) x)::bigint AS nconflicts,
       st.conflicts[1] AS ninsert_exists, st.conflicts[2] AS nupdate_differing,
       st.conflicts[3] AS nupdate_origin_change, st.conflicts[4] AS nupdate_missing,
       st.conflicts[5] AS nupdate_recently_deleted, st.conflicts[6] AS nupdate_pkey_exists,
       st.conflicts[7] AS nmultiple_unique_conflicts, st.conflicts[8] AS ndelete_recently_updated,
       st.conflicts[9] AS ndelete_missing, st.conflicts[10] AS ntarget_column_missing,
       st.conflicts[11] AS nsource_column_missing, st.conflicts[12] AS ntarget_table_missing,
       st.conflicts[13] AS napply_error_ddl
  FROM bdr._stat_subscription() st
  JOIN bdr.subscription s ON s.sub_id = st.subid;

-- Tables dropped here are remembered for a day (skip_if_recently_dropped).
CREATE FUNCTION bdr._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
BEGIN
    -- DROP EXTENSION bdr itself
    IF pg_catalog.to_regclass('bdr.dropped_relation') IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO bdr.dropped_relation (nspname, relname, dropped_at)
    SELECT d.schema_name, d.object_name, pg_catalog.now()
      FROM pg_catalog.pg_event_trigger_dropped_objects() d
     WHERE d.object_type = 'table' AND d.schema_name IS NOT NULL
       AND d.schema_name NOT IN ('bdr', 'pg_catalog', 'information_schema')
       AND d.schema_name NOT LIKE 'pg\_%'
    ON CONFLICT (nspname, relname) DO UPDATE SET dropped_at = EXCLUDED.dropped_at;
END $$;

CREATE EVENT TRIGGER bdr_remember_dropped_tables ON sql_drop
    EXECUTE FUNCTION bdr._on_sql_drop();

-- Skipping what a subscription cannot apply: every transaction of the peer
-- that committed at or before skip_upto_lsn is never applied here.
CREATE FUNCTION bdr.alter_subscription_skip_changes_upto(subscription_name name, skip_upto_lsn pg_lsn)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    s bdr.subscription;
    cur pg_lsn;
    deadline timestamptz := pg_catalog.clock_timestamp() + interval '30 seconds';
BEGIN
    SELECT * INTO s FROM bdr.subscription sub WHERE sub.sub_name = subscription_name;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subscription "%" does not exist', subscription_name
            USING ERRCODE = 'undefined_object',
                  HINT = 'See bdr.subscription_summary for the subscriptions of this node.';
    END IF;
    IF s.sub_enabled THEN
        RAISE EXCEPTION 'subscription "%" is enabled', subscription_name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = format('Disable it first with bdr.alter_subscription_disable(%L), and enable it again afterwards.', subscription_name);
    END IF;
    cur := pg_catalog.pg_replication_origin_progress(s.origin_name, true);
    IF cur IS NOT NULL AND cur > skip_upto_lsn THEN
        RAISE NOTICE 'subscription "%" has already applied changes up to %; nothing to skip', subscription_name, cur;
        RETURN;
    END IF;
    -- The writer lets go of the origin once it has stopped.
    LOOP
        BEGIN
            PERFORM pg_catalog.pg_replication_origin_advance(s.origin_name, skip_upto_lsn + 1);
            RETURN;
        EXCEPTION WHEN object_in_use THEN
            IF pg_catalog.clock_timestamp() > deadline THEN
                RAISE;
            END IF;
        END;
        PERFORM pg_catalog.pg_sleep(0.1);
    END LOOP;
END $$;

-- Transactions committed under this origin replicate as local changes of
-- the node (see LOCAL_ORIGIN in src/output_plugin.rs). Origins belong to the
-- whole instance, so it may exist already.
SELECT pg_catalog.pg_replication_origin_create('bdr_local')
 WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = 'bdr_local');

-- The pool of origins local transactions borrow to commit with a timestamp
-- later than a peer's future-dated change (src/hlc.rs; bdr_core::hlc::POOL_SIZE).
SELECT pg_catalog.pg_replication_origin_create(n)
  FROM (SELECT 'bdr_local_' || i AS n FROM pg_catalog.generate_series(1, 4) i) p
 WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = p.n);

-- Drops replication slots and origins of parted nodes (named by the
-- manager), skipping those still in use; returns how many it dropped.
CREATE FUNCTION bdr._drop_parted_artifacts(slots text[], origins text[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer := 0;
    s text;
BEGIN
    FOREACH s IN ARRAY slots LOOP
        BEGIN
            PERFORM pg_catalog.pg_terminate_backend(active_pid)
               FROM pg_catalog.pg_replication_slots WHERE slot_name = s AND active_pid IS NOT NULL;
            IF EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots WHERE slot_name = s AND NOT active) THEN
                PERFORM pg_catalog.pg_drop_replication_slot(s);
                n := n + 1;
            END IF;
        EXCEPTION WHEN object_in_use OR undefined_object THEN
            NULL;
        END;
    END LOOP;
    FOREACH s IN ARRAY origins LOOP
        BEGIN
            IF EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = s) THEN
                PERFORM pg_catalog.pg_replication_origin_drop(s);
                n := n + 1;
            END IF;
        EXCEPTION WHEN object_in_use OR undefined_object THEN
            NULL;
        END;
    END LOOP;
    RETURN n;
END $$;

-- Catch-up of a parted node's last changes from the most advanced member
-- (bdr.part_node with force, the node being down): applies, on this node,
-- one row as that member has it, written by the parted node at ts, unless
-- this node holds a newer version or a newer delete of it. The caller runs
-- it under the bdr_local origin with ts as the commit timestamp, and with
-- the canonical output settings of bdr._key_text.
CREATE FUNCTION bdr._catchup_row(rel regclass, r jsonb, ts timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    pk text[];
    cols text[];
    keycond text;
    cur timestamptz;
    tomb timestamptz;
    hit boolean;
BEGIN
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO pk
      FROM pg_catalog.pg_index i
      JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
     WHERE i.indrelid = rel AND i.indisprimary;
    IF pk IS NULL THEN
        RETURN;
    END IF;
    SELECT array_agg(a.attname::text ORDER BY a.attnum) INTO cols
      FROM pg_catalog.pg_attribute a
     WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '';
    SELECT string_agg(format('t.%I = s.%I', k, k), ' AND ') INTO keycond FROM unnest(pk) k;
    EXECUTE format('SELECT true, pg_catalog.pg_xact_commit_timestamp(t.xmin) FROM ONLY %s t, pg_catalog.jsonb_populate_record(NULL::%s, $1) s WHERE %s FOR UPDATE OF t',
                   rel, rel, keycond)
       INTO hit, cur USING r;
    IF hit THEN
        IF cur IS NOT NULL AND cur >= ts THEN
            RETURN;
        END IF;
        -- An identity column GENERATED ALWAYS cannot be SET (it is part of
        -- the key that found the row).
        EXECUTE format('UPDATE ONLY %s t SET %s FROM pg_catalog.jsonb_populate_record(NULL::%s, $1) s WHERE %s',
                       rel, (SELECT string_agg(format('%I = s.%I', c, c), ', ') FROM unnest(cols) c
                              WHERE c NOT IN (SELECT a.attname FROM pg_catalog.pg_attribute a
                                               WHERE a.attrelid = rel AND a.attidentity = 'a')), rel, keycond)
           USING r;
    ELSE
        EXECUTE format('SELECT pg_catalog.pg_xact_commit_timestamp(tb.xmin) FROM bdr.tombstone tb
                         WHERE tb.relid = %s::regclass AND tb.key_hash = pg_catalog.md5(bdr._key_text(%s::regclass,
                               pg_catalog.jsonb_populate_record(NULL::%s, $1)))',
                       pg_catalog.quote_literal(rel::text), pg_catalog.quote_literal(rel::text), rel)
           INTO tomb USING r;
        IF tomb IS NOT NULL AND tomb >= ts THEN
            RETURN;
        END IF;
        EXECUTE format('INSERT INTO %s (%s) OVERRIDING SYSTEM VALUE SELECT %s FROM pg_catalog.jsonb_populate_record(NULL::%s, $1) s',
                       rel, (SELECT string_agg(format('%I', c), ', ') FROM unnest(cols) c),
                       (SELECT string_agg(format('s.%I', c), ', ') FROM unnest(cols) c), rel)
           USING r;
    END IF;
END $$;

-- The same for a delete the parted node made: the row goes unless this
-- node holds a newer version of it.
CREATE FUNCTION bdr._catchup_delete(rel regclass, key_hash text, ts timestamptz) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DELETE FROM ONLY %s t WHERE pg_catalog.md5(bdr._key_text(%s::regclass, t)) = $1
                      AND COALESCE(pg_catalog.pg_xact_commit_timestamp(t.xmin), ''-infinity'') < $2',
                   rel, pg_catalog.quote_literal(rel::text))
       USING key_hash, ts;
END $$;

-- BDR 4's other name for bdr.get_consensus_status().
CREATE FUNCTION bdr.get_raft_status()
RETURNS TABLE (node_id oid, node_name text, state text, leader_id oid, leader_name text,
               current_term bigint, commit_index bigint, apply_index bigint, last_index bigint,
               snapshot_index bigint, voting_nodes int, voters oid[], protocol_version int,
               enabled boolean)
LANGUAGE sql VOLATILE AS $$ SELECT * FROM bdr.get_consensus_status() $$;
REVOKE ALL ON FUNCTION bdr._consensus_deliver(bytea) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr._consensus_change_voter(bigint, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.consensus_disable() FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.consensus_enable() FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.consensus_kv_store(text, jsonb, jsonb, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.replicate_ddl_command(text, text[], text) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.consensus_snapshot_import(bytea) FROM PUBLIC;

-- Global sequences (src/sequence/, docs/sequences.md).
CREATE FUNCTION bdr.alter_sequence_set_kind(seqoid regclass, seqkind text, start bigint DEFAULT NULL) RETURNS void
LANGUAGE sql VOLATILE AS $$ SELECT bdr._alter_sequence_set_kind($1::oid, $2, $3) $$;

CREATE FUNCTION bdr.seq_nextval(seqid regclass) RETURNS bigint
LANGUAGE sql VOLATILE STRICT AS $$ SELECT bdr._seq_nextval($1::oid) $$;
CREATE FUNCTION bdr.seq_currval(seqid regclass) RETURNS bigint
LANGUAGE sql VOLATILE STRICT AS $$ SELECT bdr._seq_currval($1::oid) $$;
CREATE FUNCTION bdr.seq_lastval() RETURNS bigint
LANGUAGE sql VOLATILE AS $$ SELECT pg_catalog.lastval() $$;

CREATE FUNCTION bdr.extract_timestamp_from_snowflakeid(snowflakeid bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT pg_catalog.to_timestamp(bdr._snowflakeid_ms($1) / 1000.0) $$;
CREATE FUNCTION bdr.timestamp_to_snowflakeid(ts timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT bdr._snowflakeid_of_ms(pg_catalog.floor(pg_catalog.date_part('epoch', $1) * 1000)::bigint) $$;
CREATE FUNCTION bdr.extract_timestamp_from_timeshard(timeshard_seq bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT pg_catalog.to_timestamp(bdr._timeshard_ms($1) / 1000.0) $$;
CREATE FUNCTION bdr.timestamp_to_timeshard(ts timestamptz) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT bdr._timeshard_of_ms(pg_catalog.floor(pg_catalog.date_part('epoch', $1) * 1000)::bigint) $$;

CREATE FUNCTION bdr.gen_ksuuid_v2(ts timestamptz DEFAULT NULL) RETURNS uuid
LANGUAGE sql VOLATILE AS $$ SELECT bdr._ksuuid_v2(pg_catalog.floor(pg_catalog.date_part('epoch', COALESCE($1, pg_catalog.clock_timestamp())) * 1000000)::bigint) $$;
CREATE FUNCTION bdr.extract_timestamp_from_ksuuid_v2(id uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$ SELECT pg_catalog.to_timestamp(bdr._ksuuid_v2_us($1) / 1000000.0) $$;

CREATE VIEW bdr.sequences AS
SELECT n.nspname,
       c.relname,
       CASE k.seqkind WHEN 's' THEN 'snowflakeid' WHEN 't' THEN 'timeshard'
                      WHEN 'g' THEN 'galloc' ELSE 'local' END AS seqkind,
       k.current_start AS chunk_start,
       k.current_end AS chunk_end,
       k.reserved_start,
       k.reserved_end
  FROM pg_catalog.pg_class c
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
  LEFT JOIN bdr.sequence_kind k ON k.seqid = c.oid
 WHERE c.relkind = 'S' AND c.relpersistence <> 't'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'bdr');

CREATE VIEW bdr.sequence_alloc AS
SELECT k.seqid::regclass AS seqid,
       a.chunk_size AS seq_chunk_size,
       a.allocated_up_to AS seq_allocated_up_to,
       a.nallocs AS seq_nallocs,
       bdr._ts(a.last_alloc_us) AS seq_last_alloc
  FROM bdr._sequence_alloc() a
  JOIN bdr.sequence_kind k ON k.alloc_key = a.alloc_key AND k.seqkind = 'g';

GRANT SELECT ON bdr.sequences TO PUBLIC;
REVOKE ALL ON FUNCTION bdr._sequence_alloc() FROM PUBLIC;

-- Global locks (src/globallock.rs, docs/ddl.md).
CREATE VIEW bdr.global_locks AS
SELECT l.origin_node_id,
       l.origin_node_name,
       l.lock_type,
       l.lock_key,
       NULL::regclass AS relation,
       l.pid,
       'locked'::text AS acquire_stage,
       bdr._ts(l.acquired_us) AS global_lock_request_time,
       l.statement
  FROM bdr._global_locks() l
UNION ALL
-- The DML locks this node holds (its own, and those of other nodes that
-- stop writes here); pid 0 once handed over to the writer.
SELECT d.origin_node_id,
       n.node_name::text,
       'dml'::text,
       NULL::text,
       d.relation::regclass,
       d.pid,
       CASE WHEN d.pid = 0 THEN 'held until applied' ELSE 'locked' END,
       bdr._ts(d.acquired_us),
       NULL::text
  FROM bdr._dml_locks() d
  LEFT JOIN bdr.node n ON n.node_id = d.origin_node_id;

CREATE FUNCTION bdr.global_lock_table(relation regclass) RETURNS void
LANGUAGE sql VOLATILE AS $$ SELECT bdr._global_lock_table($1::oid) $$;

REVOKE ALL ON FUNCTION bdr._dml_lock_acquire(text, bigint, bigint, bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr._dml_lock_handover(bigint, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr._progress_marker() FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr._caught_up(text) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr._xid_status(bigint) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr._dml_locks() FROM PUBLIC;
