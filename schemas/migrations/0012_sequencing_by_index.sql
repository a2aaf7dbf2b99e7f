-- A sequencing pass finds the events it moves through events_pending's primary key (issue 10).
--
-- Under load, passes delete pending events far faster than autovacuum (a minute apart by default)
-- reclaims them. 0007's move named its events with `id IN (subquery)`, which the planner, told by the
-- last ANALYZE that the table holds thousands of rows, ran as a hash join over a scan of the whole
-- table: every pass read every event moved since the last vacuum. Under first-time notifications the
-- passes took a fifth of the database's statement time (pg_stat_statements: 73-84 us per event moved,
-- 19 us after this). The ids are now gathered first, in id order, through the index, and the rows are
-- deleted by those ids through it too; what a pass reads no longer grows with what passes before it
-- deleted.
--
-- Otherwise as 0007: the caller holds the advisory lock, each statement takes a fresh snapshot, and
-- dipc.sequencing marks the insert as the sequencing's own for events_sequence_pending_first.
CREATE OR REPLACE FUNCTION dipc_move_pending_events(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    moved integer;
BEGIN
    PERFORM set_config('dipc.sequencing', 'on', true);
    WITH taken AS (
        DELETE FROM events_pending p
         WHERE p.id = ANY (ARRAY(SELECT q.id FROM events_pending q ORDER BY q.id LIMIT p_limit))
        RETURNING p.*
    )
    INSERT INTO events (type, payment_code, payload, created_at)
    SELECT taken.type, taken.payment_code, taken.payload, taken.created_at FROM taken ORDER BY taken.id;
    GET DIAGNOSTICS moved = ROW_COUNT;
    PERFORM set_config('dipc.sequencing', 'off', true);
    RETURN moved;
END;
$$;
