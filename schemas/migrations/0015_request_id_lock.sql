-- A Request-Id used for two payment codes at once is answered once (spec §3: the second is refused,
-- 409 REQUEST_ID_REUSED). dipc_inquire (0005) looks for the Request-Id's record and, finding none,
-- decides and records: two inquiries under one Request-Id for two codes, each in a transaction the
-- other could not see yet, both found none and both quoted a bill. Now each first takes a lock on its
-- Request-Id, held to its commit, so the second looks only once the first has committed (and finds its
-- record) or rolled back. Copies of one inquiry for one code were already answered once (the twin
-- branch below); they now wait for each other the same way. The rest of the function is 0005's.
--
-- The lock is transaction-level advisory, in a key space of its own (the two-key form, class below),
-- keyed by hashtext of the Request-Id: two Request-Ids that share a hash only wait for each other's
-- commit. Within a batch (dipc_inquire_each) the wait is bounded by what is left of the batch's lock
-- bound, like its other lock waits; past that the batch is recorded alone.
CREATE OR REPLACE FUNCTION dipc_inquire(
    p_payment_code text, p_request_id text, p_client_id text, p_channel text, p_body_sha256 bytea,
    p_bin_channels text[], p_at timestamptz, p_first_check_s double precision,
    OUT replayed boolean, OUT outcome text, OUT http_status integer, OUT response_body bytea,
    OUT invoice_number text, OUT body_sha256 bytea)
LANGUAGE plpgsql AS $$
DECLARE
    code payment_codes;
BEGIN
    PERFORM pg_advisory_xact_lock(1684631665, hashtext(p_request_id));  -- class: int4 of 'dipq'
    replayed := true;
    SELECT i.outcome, i.http_status, i.response_body, i.invoice_number, i.body_sha256
      INTO outcome, http_status, response_body, invoice_number, body_sha256
      FROM inquiries i
     WHERE i.request_id = p_request_id
     ORDER BY i.payment_code = p_payment_code DESC
     LIMIT 1;
    IF FOUND THEN
        RETURN;
    END IF;

    replayed := false;
    body_sha256 := p_body_sha256;
    SELECT * INTO code FROM payment_codes c WHERE c.payment_code = p_payment_code;
    outcome := dipc_inquiry_outcome(code, p_client_id, p_channel, p_bin_channels, p_at);
    IF outcome = 'SUCCESS' AND code.reusable THEN
        -- Each successful inquiry of a reusable code mints its own invoice, "<invoice>-<sequence>". The
        -- row lock of this UPDATE returns the code as it is now: a cancel or an edit that committed
        -- since our read is decided on (a sequence taken for nothing leaves a gap, never a duplicate).
        UPDATE payment_codes c SET invoice_seq = c.invoice_seq + 1
         WHERE c.payment_code = p_payment_code AND c.status = 'active'
        RETURNING * INTO code;
        IF NOT FOUND THEN
            SELECT * INTO code FROM payment_codes c WHERE c.payment_code = p_payment_code;
        END IF;
        outcome := dipc_inquiry_outcome(code, p_client_id, p_channel, p_bin_channels, p_at);
    END IF;
    IF outcome = 'SUCCESS' THEN
        invoice_number := CASE WHEN code.reusable THEN code.invoice_number || '-' || code.invoice_seq
                               ELSE code.invoice_number END;
    END IF;
    SELECT answer.http_status, answer.body INTO http_status, response_body
      FROM dipc_inquiry_answer(outcome, p_payment_code, code, invoice_number) AS answer;

    INSERT INTO inquiries (payment_code, request_id, client_id, channel, body_sha256, outcome,
                           invoice_number, amount, http_status, response_body)
    VALUES (p_payment_code, p_request_id, p_client_id, p_channel, p_body_sha256, outcome,
            invoice_number, CASE WHEN outcome = 'SUCCESS' THEN code.amount END, http_status, response_body)
    ON CONFLICT ON CONSTRAINT inquiries_pkey DO NOTHING;
    IF NOT FOUND THEN
        -- A twin with the same Request-Id was recorded while we worked: answer what it answered, so one
        -- Request-Id never yields two invoice numbers. (Each statement here sees what has committed.)
        replayed := true;
        SELECT i.outcome, i.http_status, i.response_body, i.invoice_number, i.body_sha256
          INTO outcome, http_status, response_body, invoice_number, body_sha256
          FROM inquiries i
         WHERE i.payment_code = p_payment_code AND i.request_id = p_request_id;
        RETURN;
    END IF;

    IF invoice_number IS NOT NULL THEN
        -- A quoted invoice is reconciled until it is paid (spec §8). A quote of an invoice whose
        -- reconciliation had ended (given up, expired, settled by an anomaly only) means the customer may
        -- pay it now: it starts again. Not one paid by a normal payment: only an inquiry that decided
        -- before that payment committed can quote it, and reopening would drop its settlement.
        INSERT INTO reconciliation AS r (payment_code, invoice_number, client_id, channel, amount,
                                         next_check_at)
        VALUES (p_payment_code, invoice_number, p_client_id, p_channel, code.amount,
                now() + make_interval(secs => p_first_check_s))
        ON CONFLICT ON CONSTRAINT reconciliation_pkey DO UPDATE
           SET state = 'pending', attempts = 0, first_quoted_at = now(), amount = EXCLUDED.amount,
               next_check_at = EXCLUDED.next_check_at, payment_id = NULL, settled_by = NULL,
               updated_at = now()
         WHERE r.state <> 'pending'
           AND NOT (r.state = 'paid'
                    AND EXISTS (SELECT 1 FROM payments p
                                 WHERE p.payment_code = r.payment_code
                                   AND p.invoice_number = r.invoice_number
                                   AND p.kind = 'normal'));
    END IF;
END;
$$;
