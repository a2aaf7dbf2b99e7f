-- An invoice is paid by a normal payment, or by an exception of it that finance accepted (spec §9:
-- `accepted`, the merchant keeps the money and honours the payment). A finance review found a reusable
-- code's invoice, paid once at a wrong amount and accepted so, paid again at its quoted amount by another
-- store transaction: a normal payment, where it is a second transaction for a paid invoice, a conflict to
-- refund (spec §4 rule 4). A one-shot code accepted so is `paid` already (casework.accepting_pays_code),
-- unless it could no longer be paid (expired, cancelled): its invoice is paid now too, and money taken
-- for it again is a conflict rather than another anomaly. A refunded or dismissed exception pays nothing.
--
-- A resolution takes the code's row lock before it is written (core/casework.py), as a recording does:
-- the recording's second read under that lock (ADR 11) sees a resolution committed before it.
--
-- 0018's function, with that in its second column: the lookup of a normal payment as before (by
-- payments_one_normal_idx), then, when there is none, one of the code's accepted resolutions (a probe of
-- payment_resolutions' key, a table as small as the exceptions). A dipc of before this migration still
-- running while it is replaced calls the same function and gets the new rule.
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
                      AND p.kind = 'normal')
             OR EXISTS (SELECT 1 FROM payment_resolutions r
                          JOIN payments p ON p.payment_code = r.payment_code AND p.id = r.payment_id
                         WHERE r.payment_code = p_payment_code AND r.resolution = 'accepted'
                           AND p.invoice_number = p_invoice_number),
           ARRAY(SELECT DISTINCT i.amount FROM inquiries i
                  WHERE i.payment_code = p_payment_code AND i.invoice_number = p_invoice_number
                    AND i.amount IS NOT NULL
                  ORDER BY i.amount)
$$;
