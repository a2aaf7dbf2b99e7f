-- A review of 0027 found that a store transaction's reference is ambiguous: it joins the agent, store and
-- transaction ids with "/" and escapes nothing, so store TZ01/7 with transaction 1246 and store TZ01
-- with transaction 7/1246 are two store transactions with one text. 0027 matched a notification's
-- payment by that text, and a Check Status answer of the other store's transaction was dropped as a
-- repeat: money taken and in no payment.
--
-- The match is now one function, used by the history below and by the repeat's inbox statement
-- (server/store/payments.py, _RECORD_REPEAT), and only a payment whose ids hold no "/" is matched by its
-- text: its text then names one store transaction, and so does any text equal to it. An answer of a
-- store transaction whose ids hold a "/" stays a conflict beside the notification's payment (visible,
-- for finance to close), as before 0027.
CREATE FUNCTION dipc_answer_repeats(p payments, p_transaction_ref text, p_amount bigint, p_agent_ref text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_agent_ref = p_transaction_ref
       AND p.amount = p_amount
       AND strpos(concat(p.agent_id, p.agent_store_id, p.agent_trx_id), '/') = 0
       AND dipc_agent_reference(p.agent_id, p.agent_store_id, p.agent_trx_id) = p_agent_ref
$$;

-- 0027's function, with that match.
CREATE OR REPLACE FUNCTION dipc_payment_history(
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
                                         AND p.notified_ref IS NULL)))
                            OR dipc_answer_repeats(p, p_transaction_ref, p_amount, p_agent_ref)), false),
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
