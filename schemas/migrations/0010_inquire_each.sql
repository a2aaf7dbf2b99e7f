-- Inquiries recorded in batches (issue 10, ADR 12): the inquiries that reach one dipc worker while its
-- previous round trip is out are recorded together, by one statement and one commit, each by its own
-- call of dipc_inquire (0005), in the order given. The rules and the answers' bytes stay in dipc_inquire.
--
-- A commit is most of what an inquiry costs PostgreSQL (bench/README.md), so sharing it is the lever.
-- What sharing risks is one inquiry holding up the others, when it waits for a lock (a code held by a
-- long transaction, a lock cycle with another worker's batch). So the batch may wait for locks only
-- until p_lock_wait_ms after it started: each inquiry's lock waits are bounded by what is left of that
-- (lock_timeout), and one that waits past it fails the statement. The batch is then rolled back whole,
-- and dipc records each of its inquiries alone, without that bound (each within its request's budget).
-- dipc passes the inquiries ordered by payment code and Request-Id, so that batches of two workers
-- mostly take the locks they share in one order. `p_bin_channels` holds each inquiry's channels joined
-- by commas (NULL where no BIN fits its code).
CREATE FUNCTION dipc_inquire_each(
    p_payment_codes text[], p_request_ids text[], p_client_ids text[], p_channels text[],
    p_body_sha256s bytea[], p_bin_channels text[], p_ats timestamptz[], p_first_check_s double precision,
    p_lock_wait_ms integer)
RETURNS TABLE (replayed boolean, outcome text, http_status integer, response_body bytea,
               invoice_number text, body_sha256 bytea)
LANGUAGE plpgsql AS $$
DECLARE
    last_wait constant timestamptz := clock_timestamp() + make_interval(secs => p_lock_wait_ms / 1000.0);
BEGIN
    FOR i IN 1 .. cardinality(p_payment_codes) LOOP
        -- Until this statement's commit; at least 1 ms, since a lock_timeout of 0 would mean none.
        PERFORM set_config('lock_timeout',
                           greatest(1, ceil(1000 * extract(epoch FROM last_wait - clock_timestamp())))::int
                           || 'ms', true);
        RETURN QUERY
            SELECT * FROM dipc_inquire(p_payment_codes[i], p_request_ids[i], p_client_ids[i], p_channels[i],
                                       p_body_sha256s[i], string_to_array(p_bin_channels[i], ','), p_ats[i],
                                       p_first_check_s);
    END LOOP;
END;
$$;
