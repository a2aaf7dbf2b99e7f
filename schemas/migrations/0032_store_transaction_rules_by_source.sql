-- A false conflict that a review of 0030 found, an alert telling finance to refund a customer who had
-- paid once. The rules told a Check Status answer from a notification by p_agent_ref: equal to the
-- notice's own reference for an answer named by its store transaction only; any other value (or NULL)
-- for the rest. A notification named by its store transaction only (no original_request_id: spec §4 rule
-- 2) has that reference too, so it was given no p_agent_ref at all. It therefore did not repeat the
-- payment of its own Check Status answer recorded first under fewer ids (agent://1246 against
-- agent:ALFAMART/TZ01/1246), as a notification with an original_request_id does (0029): it was a
-- conflict.
--
-- The notice's source now says which rule is its own ('check_status' for an answer, as the payment's and
-- the inbox row's source column says), and a notification gets its store transaction's reference in
-- p_agent_ref however it is named. An answer named by its store transaction only repeats a payment of
-- that store transaction and amount, and matches nothing (0027, 0029); every other notice repeats an
-- answer's payment named so, of its amount and store transaction, that no notification is matched with
-- yet, and is matched with it (server/store/payments.py, _RECORD_REPEAT), as a notification with an
-- original_request_id was. The history and that statement use the same functions.
--
-- Left as it was, found by the same review: a second SUCCESS answer for an invoice (the reconciler asks
-- no more once an invoice is paid, so only a race it does not cover records one), named by its store
-- transaction, repeats a first that named no transaction (check-status:<invoice>, 0018) and takes the
-- notification's place on its payment; DOKU's notification, with its original_request_id, is then a
-- conflict. Leaving the place free would make the first notification of that amount a repeat whatever
-- its store transaction, another store's too: money dropped, where a conflict is only money to look at.
--
-- As 0030 did, the functions a dipc from before this migration calls keep their rules: new ones, named
-- _by_source, take the source after p_agent_ref, and only a dipc from this migration on calls them.
CREATE FUNCTION dipc_answer_named_by_store_transaction(p_transaction_ref text, p_agent_ref text, p_source text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_source = 'check_status' AND p_agent_ref = p_transaction_ref
$$;

-- 0029's answer's rule, for an answer only.
CREATE FUNCTION dipc_answer_repeats(p payments, p_transaction_ref text, p_amount bigint, p_agent_ref text,
                                    p_source text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT dipc_answer_named_by_store_transaction(p_transaction_ref, p_agent_ref, p_source)
       AND p.amount = p_amount
       AND dipc_same_store_transaction(p, p_agent_ref)
$$;

-- 0029's notification's rule, for every notice but such an answer, a notification whose reference is
-- its store transaction's included.
CREATE FUNCTION dipc_notification_repeats_answer(p payments, p_transaction_ref text, p_amount bigint,
                                                 p_agent_ref text, p_source text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT NOT coalesce(dipc_answer_named_by_store_transaction(p_transaction_ref, p_agent_ref, p_source), false)
       AND p.amount = p_amount
       AND p.source = 'check_status'
       AND p.notified_ref IS NULL
       AND p.transaction_ref = dipc_agent_reference(p.agent_id, p.agent_store_id, p.agent_trx_id)
       AND dipc_same_store_transaction(p, p_agent_ref)
$$;

-- 0018's rule: a payment an answer recorded without naming its transaction, of the notice's amount, that
-- no notification is matched with yet. The notice takes its place.
CREATE FUNCTION dipc_repeats_unnamed_answer(p payments, p_amount bigint, p_unnamed_ref text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p.transaction_ref = p_unnamed_ref AND p.amount = p_amount AND p.notified_ref IS NULL
$$;

-- 0029's history (dipc_payment_history_by_ids), with the rules by the source.
CREATE FUNCTION dipc_payment_history_by_source(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_agent_ref text, p_source text,
    OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
RETURNS SETOF record
LANGUAGE sql STABLE ROWS 1 AS $$
    SELECT coalesce(bool_or(p.transaction_ref = p_transaction_ref
                            OR p.notified_ref = p_transaction_ref
                            OR (p.amount = p_amount AND p_transaction_ref = p_unnamed_ref)
                            OR dipc_repeats_unnamed_answer(p, p_amount, p_unnamed_ref)
                            OR dipc_notification_repeats_answer(p, p_transaction_ref, p_amount, p_agent_ref,
                                                                p_source)
                            OR dipc_answer_repeats(p, p_transaction_ref, p_amount, p_agent_ref, p_source)),
                    false),
           coalesce(bool_or(p.kind = 'normal'
                            OR EXISTS (SELECT 1 FROM payment_resolutions r
                                        WHERE r.payment_code = p.payment_code AND r.payment_id = p.id
                                          AND r.resolution = 'accepted')), false),
           ARRAY(SELECT DISTINCT i.amount FROM inquiries i
                  WHERE i.payment_code = p_payment_code AND i.invoice_number = p_invoice_number
                    AND i.amount IS NOT NULL
                  ORDER BY i.amount)
      FROM payments p
     WHERE p.payment_code = p_payment_code AND p.invoice_number = p_invoice_number
$$;

-- 0030's dipc_payment_context_by_ids, reading the history by the source.
CREATE FUNCTION dipc_payment_context_by_source(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_agent_ref text, p_source text,
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT * INTO code FROM payment_codes c WHERE c.payment_code = p_payment_code FOR UPDATE;

    SELECT h.repeat, h.invoice_paid, h.quoted_amounts INTO repeat, invoice_paid, quoted_amounts
      FROM dipc_payment_history_by_source(p_payment_code, p_invoice_number, p_transaction_ref, p_amount,
                                          p_unnamed_ref, p_agent_ref, p_source) AS h;
END;
$$;

-- 0030's dipc_payment_context_within_by_ids, reading the history by the source.
CREATE FUNCTION dipc_payment_context_within_by_source(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_agent_ref text, p_source text, p_lock_wait_ms integer, p_lock_codes text[], p_lock_invoices text[],
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    context record;
BEGIN
    IF p_lock_wait_ms IS NOT NULL THEN
        PERFORM set_config('lock_timeout',
                           greatest(1, ceil(1000 * extract(epoch FROM now() - clock_timestamp())
                                            + p_lock_wait_ms))::int || 'ms',
                           true);
    END IF;
    IF p_lock_codes IS NOT NULL THEN
        PERFORM FROM payment_codes WHERE payment_code = ANY (p_lock_codes) ORDER BY payment_code FOR UPDATE;
        FOR i IN 1 .. coalesce(cardinality(p_lock_invoices), 0) LOOP
            PERFORM FROM reconciliation
              WHERE payment_code = p_lock_codes[i] AND invoice_number = p_lock_invoices[i]
                FOR UPDATE;
        END LOOP;
    END IF;
    SELECT * INTO context FROM dipc_payment_context_by_source(p_payment_code, p_invoice_number,
                                                              p_transaction_ref, p_amount, p_unnamed_ref,
                                                              p_agent_ref, p_source);
    IF p_lock_wait_ms IS NULL THEN
        PERFORM FROM reconciliation
          WHERE payment_code = p_payment_code AND invoice_number = p_invoice_number
            FOR UPDATE;
    END IF;
    code := context.code;
    repeat := context.repeat;
    invoice_paid := context.invoice_paid;
    quoted_amounts := context.quoted_amounts;
END;
$$;
