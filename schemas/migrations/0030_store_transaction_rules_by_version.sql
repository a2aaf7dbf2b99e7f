-- A review of 0029 found that a dipc from before it, still serving while a deploy replaces it, could
-- spin. Such a worker reads the history with dipc_payment_history and records a repeat with its own
-- statement, which finds the payment by the reference's text. 0029 gave dipc_payment_history its rules
-- by the ids: a notification of an answer named by fewer ids (agent://1246 against
-- ALFAMART/TZ01/1246), or by more, was a repeat to the history and none to the old statement. The old
-- worker decided it again about 6,000 times in 5 s, taking the code's row lock each time, and answered
-- 503. 0029's comment said that only the first of those cases would, and that it would merely wait.
--
-- The functions a dipc before 0029 calls keep the rules by the text, so that its history and its
-- statement agree again: it records such a notice as a conflict, as it did before 0029. The rules by the
-- ids (0029) are read through functions of their own, which only a dipc from this migration on calls
-- (server/store/payments.py): dipc_payment_history_by_ids, and the two that take the code's row lock and
-- read it, dipc_payment_context_by_ids and dipc_payment_context_within_by_ids. A dipc of 0029 (whose
-- statement finds by the ids, at least what the text finds) records what the text rules say.

-- The history by the ids: 0029's dipc_payment_history, under its own name.
ALTER FUNCTION dipc_payment_history(text, text, text, bigint, text, text)
    RENAME TO dipc_payment_history_by_ids;

-- The history by the text, for a dipc from before 0029: 0028's function, its answer's rule written out
-- by the text as 0028's dipc_answer_repeats had it (0029 changed that function to the ids).
CREATE FUNCTION dipc_payment_history(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_agent_ref text,
    OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
RETURNS SETOF record
LANGUAGE sql STABLE ROWS 1 AS $$
    SELECT coalesce(bool_or(p.transaction_ref = p_transaction_ref
                            OR p.notified_ref = p_transaction_ref
                            OR (p.amount = p_amount
                                AND (p_transaction_ref = p_unnamed_ref
                                     OR ((p.transaction_ref = p_unnamed_ref
                                          OR (p.transaction_ref = p_agent_ref AND p.source = 'check_status'))
                                         AND p.notified_ref IS NULL)
                                     OR (p_agent_ref = p_transaction_ref
                                         AND strpos(concat(p.agent_id, p.agent_store_id, p.agent_trx_id), '/') = 0
                                         AND dipc_agent_reference(p.agent_id, p.agent_store_id, p.agent_trx_id)
                                             = p_agent_ref)))), false),
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

-- 0026's dipc_payment_context, reading the history by the ids.
CREATE FUNCTION dipc_payment_context_by_ids(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_agent_ref text,
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT * INTO code FROM payment_codes c WHERE c.payment_code = p_payment_code FOR UPDATE;

    SELECT h.repeat, h.invoice_paid, h.quoted_amounts INTO repeat, invoice_paid, quoted_amounts
      FROM dipc_payment_history_by_ids(p_payment_code, p_invoice_number, p_transaction_ref, p_amount,
                                       p_unnamed_ref, p_agent_ref) AS h;
END;
$$;

-- 0026's dipc_payment_context_within, reading the history by the ids.
CREATE FUNCTION dipc_payment_context_within_by_ids(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_agent_ref text, p_lock_wait_ms integer, p_lock_codes text[], p_lock_invoices text[],
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
    SELECT * INTO context FROM dipc_payment_context_by_ids(p_payment_code, p_invoice_number,
                                                           p_transaction_ref, p_amount, p_unnamed_ref,
                                                           p_agent_ref);
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
