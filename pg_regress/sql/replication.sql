-- Three databases of one instance as a three-node group: join, replicate
-- every kind of change from every node, converge.
CREATE DATABASE repl_a;
CREATE DATABASE repl_b;
CREATE DATABASE repl_c;

\c repl_a
SET client_min_messages = warning;
CREATE TABLE t (id int PRIMARY KEY, v text, tags text[]);
CREATE TABLE nokey (a int, b text);
CREATE EXTENSION bdr;
SELECT bdr.create_node('a', 'host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_a') IS NOT NULL AS created;
SELECT bdr.create_node_group('rg') IS NOT NULL AS created;
-- Rows that exist before the others join are copied to them.
INSERT INTO t SELECT g, 'before ' || g, ARRAY['x', g::text] FROM generate_series(1, 5) g;

\c repl_b
SET client_min_messages = warning;
-- An empty database: the join copies the schema too (synchronize_structure 'all').
CREATE EXTENSION bdr;
SELECT bdr.create_node('b', 'host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_b') IS NOT NULL AS created;
SELECT bdr.join_node_group('host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_a', 'rg');
\d t

\c repl_c
SET client_min_messages = warning;
CREATE TABLE t (id int PRIMARY KEY, v text, tags text[]);
-- A table the group has is missing here: the join says what to do.
CREATE EXTENSION bdr;
SELECT bdr.create_node('c', 'host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_c') IS NOT NULL AS created;
SELECT bdr.join_node_group('host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_b', 'rg', synchronize_structure := 'none');
-- With tables of its own, the schema cannot be copied.
SELECT bdr.join_node_group('host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_b', 'rg');
CREATE TABLE nokey (a int, b text);
-- Any member can be the join target.
SELECT bdr.join_node_group('host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_b', 'rg', synchronize_structure := 'none');
SET statement_timeout = '60s';
SELECT bdr.wait_for_join_completion();
SELECT node_name, peer_state_name FROM bdr.node_summary ORDER BY 1;
SELECT origin_name, target_name, subscription_status FROM bdr.subscription_summary ORDER BY 1;
SELECT target_name, plugin, state FROM bdr.node_slots ORDER BY 1;

\c repl_a
SET statement_timeout = '60s';
SELECT bdr.wait_for_join_completion();
UPDATE t SET v = 'updated on a' WHERE id = 1;
INSERT INTO nokey VALUES (1, 'no key, inserts replicate');
UPDATE nokey SET b = 'refused';
\c repl_b
SET statement_timeout = '60s';
SELECT bdr.wait_for_join_completion();
DELETE FROM t WHERE id = 2;
INSERT INTO t VALUES (100, 'from b', '{}');
\c repl_c
SET statement_timeout = '60s';
INSERT INTO t VALUES (200, 'from c', NULL);
BEGIN;
SET LOCAL bdr.xact_replication = off;
INSERT INTO t VALUES (300, 'only on c', NULL);
COMMIT;

-- A slot that does not exist is an error, not an endless wait.
\c repl_a
SELECT bdr.wait_slot_confirm_lsn('no_such_slot', NULL);
-- Wait until every node's changes are confirmed by the others, then look.
\c repl_a
SET statement_timeout = '60s';
SELECT bdr.wait_slot_confirm_lsn(NULL, NULL);
\c repl_b
SET statement_timeout = '60s';
SELECT bdr.wait_slot_confirm_lsn(NULL, NULL);
\c repl_c
SET statement_timeout = '60s';
SELECT bdr.wait_slot_confirm_lsn(NULL, NULL);
SELECT * FROM t ORDER BY id;
SELECT * FROM nokey;
\c repl_b
SELECT * FROM t ORDER BY id;
SELECT * FROM nokey;
\c repl_a
SELECT * FROM t ORDER BY id;
SELECT * FROM nokey;
SELECT count(*) AS worker_errors FROM bdr.worker_errors;

-- The output plugin speaks one protocol version and refuses what it does
-- not understand.
-- (A temporary slot would go with the first error; this one is dropped below.)
SELECT 'init' AS slot FROM pg_create_logical_replication_slot('regress_plugin', 'bdr');
INSERT INTO t VALUES (400, 'decoded', NULL);
SELECT count(*) > 0 AS has_changes FROM pg_logical_slot_peek_binary_changes('regress_plugin', NULL, NULL, 'proto_version', '1');
SELECT count(*) FROM pg_logical_slot_peek_binary_changes('regress_plugin', NULL, NULL, 'proto_version', '2');
SELECT count(*) FROM pg_logical_slot_peek_binary_changes('regress_plugin', NULL, NULL, 'proto_version', '1', 'colour', 'blue');
SELECT count(*) FROM pg_logical_slot_peek_binary_changes('regress_plugin', NULL, NULL);
SELECT pg_drop_replication_slot('regress_plugin');

-- A joining node must start empty.
CREATE DATABASE repl_d;
\c repl_d
SET client_min_messages = warning;
CREATE TABLE t (id int PRIMARY KEY, v text, tags text[]);
CREATE TABLE nokey (a int, b text);
INSERT INTO t VALUES (1, 'already here', NULL);
CREATE EXTENSION bdr;
SELECT bdr.create_node('d', 'host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_d') IS NOT NULL AS created;
SELECT bdr.join_node_group('host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_a', 'rg', synchronize_structure := 'none');
-- So must a node's name be new to the group.
DELETE FROM t;
SELECT bdr.drop_node('d');
SELECT bdr.create_node('b', 'host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_d') IS NOT NULL AS created;
SELECT bdr.join_node_group('host=127.0.0.1 port=' || current_setting('port') || ' dbname=repl_a', 'rg', synchronize_structure := 'none');

-- Any role may write replicated tables: deletes are noted through bdr's
-- trigger, which runs with the extension owner's rights.
\c repl_a
CREATE ROLE regress_app LOGIN;
GRANT SELECT, INSERT, UPDATE, DELETE ON t TO regress_app;
GRANT CREATE ON SCHEMA public TO regress_app;
SET ROLE regress_app;
DELETE FROM t WHERE id = 400;
CREATE TABLE app_owned (id int PRIMARY KEY);
RESET ROLE;
SELECT count(*) AS tombstones_for_t FROM bdr.tombstone WHERE relid = 't'::regclass;
SELECT tgname FROM pg_trigger WHERE tgrelid = 'app_owned'::regclass;
DROP TABLE app_owned;

-- Pausing a subscription: the node stops receiving from that peer, and
-- catches up when it is enabled again.
\c repl_c
SELECT bdr.alter_subscription_disable('no_such_subscription');
SELECT bdr.alter_subscription_disable(sub_name) FROM bdr.subscription_summary WHERE origin_name = 'a';
SELECT origin_name, sub_enabled, subscription_status FROM bdr.subscription_summary ORDER BY 1;
-- The manager stops the receiver within a moment; wait for that.
\i helpers/wait_until.sql
SELECT pg_temp.wait_until($$SELECT NOT EXISTS (SELECT 1 FROM pg_stat_activity a
    JOIN bdr.worker_tasks w ON w.task_pid = a.pid
    WHERE w.task_key_worker_role_name = 'receiver' AND w.sub_name LIKE '%\_a\_c')$$, 'the receiver to stop');
\c repl_a
INSERT INTO t VALUES (500, 'while c paused', NULL);
\c repl_c
SELECT count(*) AS seen_while_paused FROM t WHERE id = 500;
SELECT bdr.alter_subscription_enable();
\c repl_a
SET statement_timeout = '60s';
SELECT bdr.wait_slot_confirm_lsn(NULL, NULL);
\c repl_c
SELECT v FROM t WHERE id = 500;
SELECT origin_name, sub_enabled FROM bdr.subscription_summary ORDER BY 1;
