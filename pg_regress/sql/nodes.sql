-- Two databases of one instance as two BDR nodes.
SELECT bdr.bdr_version_num() = (split_part(bdr.bdr_version(), '.', 1)::int * 10000
                              + split_part(bdr.bdr_version(), '.', 2)::int * 100
                              + split_part(bdr.bdr_version(), '.', 3)::int) AS version_ok;

-- Bad input.
SELECT bdr.create_node('Node One', 'dbname=regression');
SELECT bdr.create_node('node1', '');
SELECT bdr.create_node('node1', 'host=localhost dbnme=x');
SELECT bdr.create_node_group('g');
SELECT bdr.drop_node('nobody');

SELECT bdr.create_node('node1', 'host=127.0.0.1 dbname=' || current_database());
SELECT bdr.create_node('node1b', 'dbname=x');
SELECT bdr.create_node_group('regress_group');
SELECT bdr.create_node_group('regress_group');
SELECT node_name, node_group_name, peer_state_name, peer_target_state_name, node_seq_id
  FROM bdr.node_summary;

CREATE DATABASE regression_node2;
\c regression_node2
SET client_min_messages = warning;
\i helpers/wait_until.sql

CREATE EXTENSION bdr;
SELECT bdr.create_node('node2', 'host=127.0.0.1 dbname=regression_node2') IS NOT NULL AS created;
SELECT node_name, node_group_name, peer_state_name FROM bdr.local_node_summary;
-- Joining checks its target: a wrong group name, an unreachable node.
SELECT bdr.join_node_group('host=127.0.0.1 port=' || current_setting('port') || ' dbname=regression', 'other_group');
SELECT bdr.join_node_group('host=127.0.0.1 port=1 dbname=regression', 'regress_group');

-- Both databases get a manager.
SELECT pg_temp.wait_until($$SELECT count(*) = 2 FROM bdr.worker_tasks
    WHERE task_key_worker_role_name = 'manager' AND task_pid IS NOT NULL
      AND datname IN ('regression', 'regression_node2')$$, 'both managers');
SELECT datname, task_key_worker_role_name, task_pid IS NOT NULL AS running
  FROM bdr.worker_tasks WHERE datname IN ('regression', 'regression_node2') ORDER BY datname;

-- Dropping the node stops its manager, so the database can be dropped.
SELECT bdr.drop_node('node2');
SELECT pg_temp.wait_until($$SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity
    WHERE backend_type = 'bdr manager' AND datname = 'regression_node2')$$, 'the manager to stop');
\c regression
SET client_min_messages = warning;
DROP DATABASE regression_node2;
SELECT bdr.drop_node('node1');
SELECT count(*) AS nodes_left FROM bdr.node;
