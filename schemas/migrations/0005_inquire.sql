-- The inquiry (spec §3) as one server-side function, so answering one costs one round trip (issue 10).
--
-- The rules of which inquiry a code answers, and the exact bytes of every answer, live here and nowhere
-- else: dipc's Python authenticates the request, calls dipc_inquire, signs and sends what it returns.
-- Everything the answer promises is written in the caller's one transaction, before the answer exists:
-- the audit row with those bytes, a reusable code's minted invoice, and the invoice's reconciliation row.

-- Why a code can or cannot be paid now at a channel by a merchant's customer. The checks run in this
-- order; the first that holds is the answer. `code` is NULL for a code that is not registered;
-- `bin_channels` holds the channels DOKU's BIN rules allow for the code, NULL when no BIN fits it.
CREATE FUNCTION dipc_inquiry_outcome(code payment_codes, client_id text, channel text,
                                     bin_channels text[], at timestamptz)
RETURNS text LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE
        WHEN bin_channels IS NULL THEN 'UNKNOWN_BIN'
        WHEN code.payment_code IS NULL THEN 'NOT_FOUND'
        WHEN code.client_id <> client_id THEN 'OTHER_CLIENT'
        WHEN code.status = 'cancelled' THEN 'CANCELLED'
        WHEN code.status = 'paid' THEN 'ALREADY_PAID'
        WHEN code.expires_at IS NOT NULL AND at >= code.expires_at THEN 'EXPIRED'
        WHEN NOT channel = ANY (bin_channels) OR code.channel NOT IN ('ANY', channel) THEN 'CHANNEL_MISMATCH'
        ELSE 'SUCCESS'
    END
$$;

-- Our answer: the HTTP status and the exact body bytes. DOKU sees one status word per outcome (several
-- outcomes share a word; the finer outcome goes to our logs, metrics and audit row). A successful answer
-- quotes the bill: `invoice_number` is the code's own, or the one minted for a reusable code. The body is
-- compact JSON with members in this order (json_strip_nulls also drops the empty receipt texts).
CREATE FUNCTION dipc_inquiry_answer(outcome text, payment_code text, code payment_codes,
                                    invoice_number text, OUT http_status integer, OUT body bytea)
LANGUAGE sql STABLE AS $$
    SELECT answer.http_status, convert_to(json_strip_nulls(
               CASE WHEN outcome = 'SUCCESS' THEN json_build_object(
                   'order', json_build_object('invoice_number', invoice_number, 'amount', code.amount),
                   'online_to_offline_info', json_build_object(
                       'payment_code', code.payment_code, 'info1', NULLIF(code.info1, ''),
                       'info2', NULLIF(code.info2, ''), 'info3', NULLIF(code.info3, '')),
                   'online_to_offline_inquiry', json_build_object('status', answer.word),
                   'customer', json_build_object('name', code.customer_name, 'email', code.customer_email),
                   'additional_info', '{}'::json)
               ELSE json_build_object(
                   'online_to_offline_info', json_build_object('payment_code', payment_code),
                   'online_to_offline_inquiry', json_build_object('status', answer.word))
               END)::text, 'UTF8')
      FROM (VALUES ('SUCCESS', 'success', 200),
                   ('NOT_FOUND', 'billing_not_found', 404),
                   ('UNKNOWN_BIN', 'billing_not_found', 404),
                   ('OTHER_CLIENT', 'billing_not_found', 404),
                   ('EXPIRED', 'billing_was_expired', 400),
                   ('ALREADY_PAID', 'billing_already_paid', 400),
                   ('CANCELLED', 'decline', 400),
                   ('CHANNEL_MISMATCH', 'decline', 400)) AS answer (outcome, word, http_status)
     WHERE answer.outcome = dipc_inquiry_answer.outcome
$$;

-- Answer an inquiry and record it. A Request-Id seen before (for any code; the same code's record
-- first) is not decided again: its recorded answer comes back with replayed = true, and the caller
-- compares body_sha256 to tell a repeat from a reuse. `at` is the time the rules judge expiry by;
-- a quoted invoice is first checked with DOKU first_check_s after the quote (spec §8).
CREATE FUNCTION dipc_inquire(
    p_payment_code text, p_request_id text, p_client_id text, p_channel text, p_body_sha256 bytea,
    p_bin_channels text[], p_at timestamptz, p_first_check_s double precision,
    OUT replayed boolean, OUT outcome text, OUT http_status integer, OUT response_body bytea,
    OUT invoice_number text, OUT body_sha256 bytea)
LANGUAGE plpgsql AS $$
DECLARE
    code payment_codes;
BEGIN
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
