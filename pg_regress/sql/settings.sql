-- Every bdr setting, as pg_settings shows it.
SELECT name, setting, unit, vartype, context, min_val, max_val
  FROM pg_settings WHERE name LIKE 'bdr.%' ORDER BY name;

-- Enum settings list their values in the error.
SET bdr.ddl_locking = 'sometimes';
SET bdr.maximum_clock_skew_action = 'explode';
-- Out of range.
SET bdr.global_lock_timeout = -1;
SET bdr.lag_control_min_conforming_nodes = 0;
-- The prefix is reserved.
SET bdr.no_such_setting = 1;
-- Server-start settings.
SET bdr.global_lock_max_locks = 10;
-- Aliases.
SET bdr.enable_camo = true;
SHOW bdr.enable_camo;
RESET bdr.enable_camo;
SET bdr.ddl_locking = 'all';
SHOW bdr.ddl_locking;
RESET bdr.ddl_locking;

-- bdr.xact_replication only with SET LOCAL.
SET bdr.xact_replication = off;
BEGIN;
SET LOCAL bdr.xact_replication = off;
SHOW bdr.xact_replication;
COMMIT;
SHOW bdr.xact_replication;

-- A setting whose feature is not there yet warns.
SET client_min_messages = warning;
SET bdr.crdt_raw_value = on;
RESET bdr.crdt_raw_value;
