-- A review of 0030 found that the history by the text it kept for workers from before 0029 matched an
-- answer's payment named by its store transaction only by the text alone, as 0026 did. With a "/" in an
-- id that text is ambiguous (0028): store TZ01/7 with transaction 1246 reads as store TZ01 with
-- transaction 7/1246. Workers of 0027 and 0028 took the other store's notification for a repeat of the
-- answer (its money in no payment, and the answer's slot taken), and a worker of 0029, whose own repeat
-- statement reads only ids without "/", decided it again until its deadline (about 6,600 times in 5 s).
--
-- That rule now matches only a payment whose ids hold no "/", as every other rule that reads a store
-- transaction's text does since 0028. 0030's function otherwise.
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
                                          OR (p.transaction_ref = p_agent_ref AND p.source = 'check_status'
                                              AND strpos(concat(p.agent_id, p.agent_store_id,
                                                                p.agent_trx_id), '/') = 0))
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
