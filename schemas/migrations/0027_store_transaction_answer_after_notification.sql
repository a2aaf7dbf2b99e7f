-- A Check Status answer that names its transaction by the store's AGENT_TRX_ID only repeats the payment
-- of that store transaction recorded from DOKU's notification first (spec §4 rule 2, §8 rule 3).
--
-- 0026 matched the order in which the answer is recorded first. The other order happens when the
-- notification lands while DOKU is answering the invoice's Check Status: the answer, recorded after it,
-- found the invoice paid under the notification's original_request_id, and became an ALREADY_PAID
-- conflict, whose alert told finance to refund a customer who had paid once.
--
-- Such a notice comes with p_agent_ref equal to its own reference (server/core/notifications.py,
-- _agent_ref: only a Check Status answer named by its store transaction only is passed so). It repeats a
-- payment of the same amount whose own store transaction, as its agent, store and transaction ids give
-- it, is that reference. A notification is its own transaction whatever its store transaction says, so
-- a notification never gets here: a later notice of the same store transaction under another
-- original_request_id stays a conflict (0026). Nothing is matched or written on the payment: the answer
-- is a report of the transaction the payment already is.
--
-- dipc_agent_reference is conventions.agent_reference of server/doku/conventions.py, for a payment's
-- columns; tests/integration/test_reconciliation.py holds the two to the same text.
CREATE FUNCTION dipc_agent_reference(p_agent_id text, p_agent_store_id text, p_agent_trx_id text)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 'agent:' || coalesce(p_agent_id, '') || '/' || coalesce(p_agent_store_id, '') || '/'
           || nullif(p_agent_trx_id, '')
$$;

-- 0026's function, with that as the last way a notice repeats a payment.
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
                                         AND p.notified_ref IS NULL)
                                     OR (p_agent_ref = p_transaction_ref
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
