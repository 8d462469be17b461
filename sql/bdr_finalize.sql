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

-- Functions BDR 4 users call that this version does not provide yet. They
-- fail loudly instead of pretending to work.
CREATE FUNCTION bdr._not_implemented(function_name text, hint text DEFAULT 'See docs/nodes.md.')
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is not implemented yet', function_name
        USING ERRCODE = 'feature_not_supported', HINT = hint;
END $$;

CREATE FUNCTION bdr.join_node_group(join_target_dsn text, node_group_name text DEFAULT NULL,
    pause_in_standby boolean DEFAULT false, wait_for_completion boolean DEFAULT true,
    synchronize_structure text DEFAULT 'all') RETURNS void
LANGUAGE sql AS $$ SELECT bdr._not_implemented('bdr.join_node_group',
    'This version of bdr manages single-node groups only; see docs/nodes.md.') $$;

CREATE FUNCTION bdr.wait_for_join_completion(verbose_progress boolean DEFAULT false) RETURNS void
LANGUAGE sql AS $$ SELECT bdr._not_implemented('bdr.wait_for_join_completion') $$;

CREATE FUNCTION bdr.part_node(node_name text, wait_for_completion boolean DEFAULT true,
    force boolean DEFAULT false) RETURNS void
LANGUAGE sql AS $$ SELECT bdr._not_implemented('bdr.part_node') $$;

CREATE FUNCTION bdr.alter_node_interface(node_name text, interface_dsn text) RETURNS void
LANGUAGE sql AS $$ SELECT bdr._not_implemented('bdr.alter_node_interface') $$;

REVOKE ALL ON FUNCTION bdr.create_node(text, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.create_node_group(text, text, boolean, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.drop_node(text, boolean, boolean) FROM PUBLIC;
REVOKE ALL ON FUNCTION bdr.worker_task_reset_backoff_all() FROM PUBLIC;

-- CREATE EXTENSION fails here, with a hint, if the server is not set up for bdr.
SELECT bdr._check_prerequisites();
