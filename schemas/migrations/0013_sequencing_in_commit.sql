-- A batch of payment recordings moves its own events into the feed in its own transaction (issue 10,
-- ADR 13), instead of answering only after a sequencing pass that follows its commit.
--
-- Called last in the batch's transaction. It takes the advisory lock (held to the commit, so no other
-- move gives ids meanwhile) and moves every pending event this transaction sees, the batch's own with
-- those committed before it, in append order; the NOTIFY goes with the commit. The holders of that lock
-- wait for no row lock and hold it a move and a commit, so the wait for it is short and bounded by
-- p_wait_ms: past that, it returns false having moved nothing, and the batch's writers wait for a pass
-- after their commit, as every other writer does. The wait is in a block of its own, whose failure
-- leaves the batch's transaction as it was; after it, the batch's lock_timeout is back.
--
-- Unlike a pass, a batch holds the lock across a round trip of its client: between this call's answer
-- and dipc's COMMIT. A client that stops there (a frozen process, a lost network) would hold the whole
-- database's sequencing. So the transaction may stay idle only p_idle_ms from then on: past that,
-- PostgreSQL ends the session, the batch rolls back (nothing of it was answered) and the lock is free.
CREATE FUNCTION dipc_sequence_events_in_commit(p_limit integer, p_wait_ms integer, p_idle_ms integer)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    lock_timeout text := current_setting('lock_timeout');
    moved integer := 0;
    step integer;
BEGIN
    BEGIN
        PERFORM set_config('lock_timeout', p_wait_ms || 'ms', true);
        PERFORM pg_advisory_xact_lock(7235437848553746036);  -- dipc_sequence_events' lock
        PERFORM set_config('lock_timeout', lock_timeout, true);
    EXCEPTION WHEN lock_not_available THEN
        RETURN false;
    END;
    PERFORM set_config('idle_in_transaction_session_timeout', p_idle_ms || 'ms', true);
    LOOP
        step := dipc_move_pending_events(p_limit);
        moved := moved + step;
        EXIT WHEN step < p_limit;
    END LOOP;
    IF moved > 0 THEN
        PERFORM pg_notify('dipc_events', '');
    END IF;
    RETURN true;
END;
$$;
