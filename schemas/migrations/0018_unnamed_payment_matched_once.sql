-- A Check Status answer that names no transaction is recorded as the payment 'check-status:<invoice>'
-- (spec §8 rule 3). DOKU's notification of that payment, when it comes late, names the store transaction
-- and cannot be matched by reference, so one of the same amount for the same invoice is taken as that
-- payment: a repeat (ADR 6). Until this migration every later one was, for ever: when two counters took
-- the money for one invoice, the second store transaction became a repeat too, in no payment and in no
-- exception. A finance review found it.
--
-- The unnamed payment is one store transaction. The first notification matched with it records its
-- reference here, in the statement that stores it as a repeat (server/store/payments.py, record_repeat,
-- which takes the payment's row lock: of two racing for it, one is matched and the other decided again).
-- From then on only that reference repeats it; any other transaction of the invoice is a payment of its
-- own, a conflict for refund. NULL: not an unnamed payment, or none matched with it yet. No default: no
-- table rewrite, and the recording's INSERT does not name the column.
--
-- A dipc of before this migration still running while it is replaced reads the new history (the
-- function below keeps its signature) but stores its repeats without matching them: a notification it
-- takes for the unnamed payment's leaves the payment unmatched, as every one did before.
ALTER TABLE payments ADD COLUMN notified_ref text;

-- 0014's function (inlined into the read and into dipc_payment_context), with the rule above: a payment
-- is repeated by its own reference, by the notification matched with it, or by amount only where the
-- notice is an unnamed answer, or the payment an unnamed one that no notification is matched with yet.
CREATE OR REPLACE FUNCTION dipc_payment_history(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
RETURNS SETOF record
LANGUAGE sql STABLE ROWS 1 AS $$
    SELECT EXISTS (SELECT 1 FROM payments p
                    WHERE p.payment_code = p_payment_code AND p.invoice_number = p_invoice_number
                      AND (p.transaction_ref = p_transaction_ref
                           OR p.notified_ref = p_transaction_ref
                           OR (p.amount = p_amount
                               AND (p_transaction_ref = p_unnamed_ref
                                    OR (p.transaction_ref = p_unnamed_ref AND p.notified_ref IS NULL))))),
           EXISTS (SELECT 1 FROM payments p
                    WHERE p.payment_code = p_payment_code AND p.invoice_number = p_invoice_number
                      AND p.kind = 'normal'),
           ARRAY(SELECT DISTINCT i.amount FROM inquiries i
                  WHERE i.payment_code = p_payment_code AND i.invoice_number = p_invoice_number
                    AND i.amount IS NOT NULL
                  ORDER BY i.amount)
$$;
