-- Inquiries recorded in batches (issue 10): the inquiries that reach one dipc worker while its previous
-- round trip is out are recorded together, by one statement and one commit, each by its own call of
-- dipc_inquire (0005), in the order given. The rules and the answers' bytes stay in dipc_inquire alone.
--
-- A commit is most of what an inquiry costs PostgreSQL (bench/README.md: about half of its CPU), so
-- sharing it is the lever. What sharing risks is one inquiry holding up the others: one that waits
-- for a lock longer than p_lock_timeout_ms (a code held by a long transaction) fails the statement, the
-- batch is rolled back whole, and dipc records each of its inquiries alone, as before this migration.
-- dipc passes the inquiries ordered by payment code and Request-Id, so that two batches take the locks
-- they share in the same order and cannot deadlock. `p_bin_channels` holds each inquiry's channels
-- joined by commas (NULL where no BIN fits its code).
CREATE FUNCTION dipc_inquire_each(
    p_payment_codes text[], p_request_ids text[], p_client_ids text[], p_channels text[],
    p_body_sha256s bytea[], p_bin_channels text[], p_ats timestamptz[], p_first_check_s double precision,
    p_lock_timeout_ms integer)
RETURNS TABLE (replayed boolean, outcome text, http_status integer, response_body bytea,
               invoice_number text, body_sha256 bytea)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);  -- until this statement's commit
    FOR i IN 1 .. cardinality(p_payment_codes) LOOP
        RETURN QUERY
            SELECT * FROM dipc_inquire(p_payment_codes[i], p_request_ids[i], p_client_ids[i], p_channels[i],
                                       p_body_sha256s[i], string_to_array(p_bin_channels[i], ','), p_ats[i],
                                       p_first_check_s);
    END LOOP;
END;
$$;
