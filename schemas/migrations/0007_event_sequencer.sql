-- Events get their feed ids after their transaction commits, not before (ADR 3, revised; issue 10).
--
-- A transaction that reports a change appends its event to events_pending: no lock, nothing serialised.
-- dipc_sequence_events then moves what has committed into events, in the order it was appended, giving
-- the feed ids as it goes, under the advisory lock appends took before. Event ids still become visible
-- in id order: a consumer that keeps the last id it saw never steps over one. The writers' commits no
-- longer wait on each other's WAL flush.
--
-- Causal order is kept: an event whose transaction waited for another's row lock (or started after it
-- committed) was appended after that one committed, so it has the larger pending id, and any snapshot
-- that sees it sees the other too.

-- The shape of events (its own identity: the order of appending), with no reader but the sequencing.
CREATE TABLE events_pending (LIKE events INCLUDING ALL);

-- Move up to p_limit committed pending events into the feed, oldest first; return how many moved. The
-- caller holds the advisory lock. In READ COMMITTED each statement of a VOLATILE plpgsql function takes
-- a fresh snapshot, so the move sees everything committed before the lock was granted, a previous
-- sequencer's move included. dipc.sequencing marks the insert as ours for the trigger below.
CREATE FUNCTION dipc_move_pending_events(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    moved integer;
BEGIN
    PERFORM set_config('dipc.sequencing', 'on', true);
    WITH taken AS (
        DELETE FROM events_pending p
         WHERE p.id IN (SELECT q.id FROM events_pending q ORDER BY q.id LIMIT p_limit)
        RETURNING p.*
    )
    INSERT INTO events (type, payment_code, payload, created_at)
    SELECT taken.type, taken.payment_code, taken.payload, taken.created_at FROM taken ORDER BY taken.id;
    GET DIAGNOSTICS moved = ROW_COUNT;
    PERFORM set_config('dipc.sequencing', 'off', true);
    RETURN moved;
END;
$$;

-- One sequencing statement: the lock, the move, and the NOTIFY that wakes long-polls and webhook
-- forwarders once this commits.
CREATE FUNCTION dipc_sequence_events(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    moved integer;
BEGIN
    PERFORM pg_advisory_xact_lock(7235437848553746036);  -- int8 of 'dipcevnt', the key writers took before
    moved := dipc_move_pending_events(p_limit);
    IF moved > 0 THEN
        PERFORM pg_notify('dipc_events', '');
    END IF;
    RETURN moved;
END;
$$;

-- Any other insert into events comes from a server of the version before this one (during an upgrade,
-- or after a rollback): it first moves what is pending, under the lock that writer takes anyway (the
-- same session may take it twice). Events committed before it therefore still get the smaller ids,
-- and none is left pending with nobody to move it.
CREATE FUNCTION dipc_events_sequence_pending_first() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('dipc.sequencing', true) IS DISTINCT FROM 'on' THEN
        PERFORM pg_advisory_xact_lock(7235437848553746036);
        LOOP
            EXIT WHEN dipc_move_pending_events(1000) < 1000;
        END LOOP;
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER events_sequence_pending_first BEFORE INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION dipc_events_sequence_pending_first();
