-- Polls a condition with a deadline; the tests below wait on workers with it.
CREATE FUNCTION pg_temp.wait_until(condition text, what text) RETURNS void LANGUAGE plpgsql AS $$
DECLARE deadline timestamptz := clock_timestamp() + interval '60 seconds';
DECLARE ok boolean;
BEGIN
    LOOP
        EXECUTE condition INTO ok;
        EXIT WHEN ok;
        IF clock_timestamp() > deadline THEN RAISE EXCEPTION 'timed out waiting for %', what; END IF;
        PERFORM pg_sleep(0.1);  -- the poll interval
    END LOOP;
END $$;
