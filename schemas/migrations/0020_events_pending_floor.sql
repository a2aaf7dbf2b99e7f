-- A sequencing move reads events_pending from a floor, not from its first id (issue 10).
--
-- Every move looks for the oldest pending events through events_pending's primary key. Moves delete
-- from the low end of that index, and while any snapshot older than those deletes is held anywhere in
-- the database (pg_dump, a report, a REPEATABLE READ session left open), PostgreSQL may neither remove
-- the deleted rows nor mark their index entries dead: each move walked every event moved since that
-- snapshot began, under the sequencing lock. Held through a benchmark's notification phase, moving 3
-- events took 20.9 ms and 40,862 heap fetches, and notifications fell from 0.45 to 0.25 x the inquiry
-- rate; the cost grows for as long as the snapshot is held.
--
-- A move now reads only ids above events_pending_floor: every pending id at or below it has been moved
-- or will never commit. Ids are given when an event is appended, not when it commits, so the floor may
-- not simply follow the last id moved: a writer still running may hold a smaller one. The floor instead
-- advances in two steps, by dipc_advance_events_floor, which every server runs in a transaction of its
-- own a few times a second (server/store/outbox.py, floor_forever):
--   1. it notes the last id given so far (N), then takes its own transaction id (X). A writer takes its
--      transaction id before its event's id (dipc_next_pending_event_id), so every writer of an id up
--      to N has a transaction id below X;
--   2. a later run that finds no transaction below X still running (its snapshot's xmin) knows that no
--      id up to N will ever commit again; its snapshot sees those that did, and the floor moves up to
--      N, or to just below the first of them still pending.
-- Only a transaction with a transaction id holds the floor back: a read-only snapshot (pg_dump's) does
-- not. A write transaction open for long does, and moves then read from the floor it left, as before.
--
-- The floor and its next step live in sequences, not in a table: a row updated every run would pile up
-- versions for as long as a snapshot is held, as events_pending does. A sequence is written in place
-- and not rolled back, so each value written must be true on its own: the floor only rises to what the
-- database has committed, the next step is lowered to the floor before its transaction id is replaced,
-- and a crash, which keeps a prefix of the WAL, keeps a prefix of these writes. A dump, though, reads a
-- sequence after its snapshot, so a restored floor may stand above events the dump saw pending:
-- dipc_repair_events_floor, run by every server as it starts, lowers it below them.

-- A writer's transaction id comes before its event's id (step 1 above). Sequences advanced by nextval in
-- another session are seen at once, uncommitted, and this one gives its ids one at a time (no cache).
CREATE FUNCTION dipc_next_pending_event_id() RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN nextval('events_pending_id_seq');
END;
$$;

-- The identity column becomes a plain one with that default, its ids continuing where they were. The
-- table lock keeps writers out meanwhile, so none takes an id from the old sequence after it is read.
LOCK TABLE events_pending IN ACCESS EXCLUSIVE MODE;
DO $$
DECLARE
    last bigint;
    called boolean;
BEGIN
    EXECUTE format('SELECT last_value, is_called FROM %s', pg_get_serial_sequence('events_pending', 'id'))
       INTO last, called;
    ALTER TABLE events_pending ALTER COLUMN id DROP IDENTITY;
    CREATE SEQUENCE events_pending_id_seq CACHE 1 OWNED BY events_pending.id;
    PERFORM setval('events_pending_id_seq', last, called);
END;
$$;
ALTER TABLE events_pending ALTER COLUMN id SET DEFAULT dipc_next_pending_event_id();

-- Owned by the ids' column, so that TRUNCATE events_pending RESTART IDENTITY starts them over with the
-- ids (and a run that finds the ids below its floor, restarted under it, starts it over too).
CREATE SEQUENCE events_pending_floor MINVALUE 0 START 0 OWNED BY events_pending.id;          -- the floor
CREATE SEQUENCE events_pending_floor_next MINVALUE 0 START 0 OWNED BY events_pending.id;     -- N
CREATE SEQUENCE events_pending_floor_next_xid MINVALUE 0 START 0 OWNED BY events_pending.id; -- X

-- As 0012, from the floor up. No pending event is visible at or below it, so the move still takes the
-- oldest committed ones, in the order they were appended.
CREATE OR REPLACE FUNCTION dipc_move_pending_events(p_limit integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    floor bigint := (SELECT last_value FROM events_pending_floor);
    moved integer;
BEGIN
    PERFORM set_config('dipc.sequencing', 'on', true);
    WITH taken AS (
        DELETE FROM events_pending p
         WHERE p.id = ANY (ARRAY(
               SELECT q.id FROM events_pending q WHERE q.id > floor ORDER BY q.id LIMIT p_limit))
        RETURNING p.*
    )
    INSERT INTO events (type, payment_code, payload, created_at)
    SELECT taken.type, taken.payment_code, taken.payload, taken.created_at FROM taken ORDER BY taken.id;
    GET DIAGNOSTICS moved = ROW_COUNT;
    PERFORM set_config('dipc.sequencing', 'off', true);
    RETURN moved;
END;
$$;

-- One run of the two steps above; returns the floor, or null when another run holds the floor's lock.
-- It must begin its transaction (and commit it at once): its transaction id is the X it notes. It runs
-- as the schema's owner, as the repair below does: the serving role may read these sequences (USAGE,
-- SELECT, deploy/postgres/roles.sql) but not set them, so only these two functions move the floor.
CREATE FUNCTION dipc_advance_events_floor() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    floor bigint := (SELECT last_value FROM events_pending_floor);
    next bigint := (SELECT last_value FROM events_pending_floor_next);
    next_xid xid8 := (SELECT last_value FROM events_pending_floor_next_xid)::text::xid8;
    given bigint;
    head bigint;
BEGIN
    IF pg_current_xact_id_if_assigned() IS NOT NULL THEN
        RAISE EXCEPTION 'dipc_advance_events_floor must run first in its own transaction';
    END IF;
    IF NOT pg_try_advisory_xact_lock(7235437848569868146) THEN  -- int8 of 'dipcflor'
        RETURN NULL;
    END IF;
    -- The ids given so far, read before this transaction has an id (writing a sequence would give it
    -- one): their writers' transaction ids are all below the one it takes next.
    SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END INTO given FROM events_pending_id_seq;
    IF given < next THEN  -- the ids started over (RESTART IDENTITY without the floor): so does it
        floor := 0;
        next := 0;
        PERFORM setval('events_pending_floor', 0, true);
        PERFORM setval('events_pending_floor_next', 0, true);
    END IF;
    IF next > floor THEN
        IF pg_snapshot_xmin(pg_current_snapshot()) < next_xid THEN
            RETURN floor;  -- a writer of an id up to N may still be running
        END IF;
        -- Every writer of an id up to N has ended, before this statement's snapshot was taken.
        head := (SELECT min(p.id) FROM events_pending p WHERE p.id > floor);
        floor := least(next, coalesce(head - 1, next));
        PERFORM set_config('synchronous_commit', 'off', true);  -- a crash loses a step, never more
        PERFORM setval('events_pending_floor', floor, true);
        IF floor < next THEN
            RETURN floor;  -- N stays the next step until the events below it are moved
        END IF;
    END IF;
    IF given > floor THEN
        next_xid := pg_current_xact_id();
        PERFORM set_config('synchronous_commit', 'off', true);
        PERFORM setval('events_pending_floor_next', floor, true);
        PERFORM setval('events_pending_floor_next_xid', next_xid::text::bigint, true);
        PERFORM setval('events_pending_floor_next', given, true);
    END IF;
    RETURN floor;
END;
$$;

-- Lower the floor below any event pending at or under it (a restored dump's), and its next step with it.
-- Reads every pending row, so it is run as a server starts, not on the way of each move.
CREATE FUNCTION dipc_repair_events_floor() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    floor bigint;
    head bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(7235437848569868146);
    floor := (SELECT last_value FROM events_pending_floor);
    head := (SELECT min(p.id) FROM events_pending p);
    IF head <= floor THEN
        floor := head - 1;
        PERFORM setval('events_pending_floor', floor, true);
        IF (SELECT last_value FROM events_pending_floor_next) > floor THEN
            PERFORM setval('events_pending_floor_next', floor, true);
        END IF;
    END IF;
    RETURN floor;
END;
$$;
