-- Events get their feed ids after their transaction commits, not before (ADR 3, revised; issue 10).
--
-- A transaction that reports a change appends its event to events_pending: no lock, nothing serialised.
-- dipc_sequence_events then moves what has committed into events, in the order it was appended, giving
-- the feed ids as it goes. Only this function inserts into events, under the advisory lock that
-- appends took before (the same key, so servers of the previous version can run beside it during an
-- upgrade), so event ids still become visible in id order: a consumer that keeps the last id it saw
-- never steps over one. The writers' commits no longer wait on each other's WAL flush.
--
-- Causal order is kept: an event whose transaction waited for another's row lock (or started after it
-- committed) was appended after that one committed, so it has the larger pending id, and any snapshot
-- that sees it sees the other too.

-- The shape of events (its own identity: the order of appending), with no reader but the sequencing.
CREATE TABLE events_pending (LIKE events INCLUDING ALL);

-- Move up to p_limit committed pending events into the feed, oldest first; return how many moved.
-- In READ COMMITTED each statement of a VOLATILE plpgsql function takes a fresh snapshot, so the move
-- sees everything committed before the lock was granted, a previous sequencer's move included.
CREATE FUNCTION dipc_sequence_events(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    moved integer;
BEGIN
    PERFORM pg_advisory_xact_lock(7235437848553746036);  -- int8 of 'dipcevnt', as store/outbox.py had
    WITH taken AS (
        DELETE FROM events_pending p
         WHERE p.id IN (SELECT q.id FROM events_pending q ORDER BY q.id LIMIT p_limit)
        RETURNING p.*
    )
    INSERT INTO events (type, payment_code, payload, created_at)
    SELECT taken.type, taken.payment_code, taken.payload, taken.created_at FROM taken ORDER BY taken.id;
    GET DIAGNOSTICS moved = ROW_COUNT;
    IF moved > 0 THEN
        PERFORM pg_notify('dipc_events', '');  -- wakes long-polls and forwarders once this commits
    END IF;
    RETURN moved;
END;
$$;
