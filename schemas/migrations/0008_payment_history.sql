-- What is recorded for a notice's invoice, readable without the code's row lock (issue 10, ADR 11).
--
-- A notification is decided on facts read with no lock and no transaction, then recorded by one
-- statement that takes the code's row lock, reads the facts again (dipc_payment_context) and writes only
-- if they are what the decision was made on. Both reads use the two functions below, so they cannot
-- differ in what they compare.

-- What of a code a payment is decided on and reports: all of it but the invoice sequence, which every
-- successful inquiry of a reusable code moves (a notification must not wait for a quiet moment). NULL
-- for no code (plpgsql's empty row too).
CREATE FUNCTION dipc_code_state(code payment_codes) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN code.payment_code IS NOT NULL THEN (to_jsonb(code) - 'invoice_seq')::text END
$$;

-- What is recorded for an invoice. The amounts come sorted, so that two reads of the same facts compare
-- equal.
CREATE FUNCTION dipc_payment_history(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (SELECT 1 FROM payments p
                    WHERE p.payment_code = p_payment_code AND p.invoice_number = p_invoice_number
                      AND (p.transaction_ref = p_transaction_ref
                           OR (p.amount = p_amount
                               AND (p_transaction_ref = p_unnamed_ref OR p.transaction_ref = p_unnamed_ref)))),
           EXISTS (SELECT 1 FROM payments p
                    WHERE p.payment_code = p_payment_code AND p.invoice_number = p_invoice_number
                      AND p.kind = 'normal'),
           ARRAY(SELECT DISTINCT i.amount FROM inquiries i
                  WHERE i.payment_code = p_payment_code AND i.invoice_number = p_invoice_number
                    AND i.amount IS NOT NULL
                  ORDER BY i.amount)
$$;

-- As in 0006: the code's row lock, then the history in a statement of its own (a fresh snapshot, which
-- sees what the lock's previous holder committed).
CREATE OR REPLACE FUNCTION dipc_payment_context(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT * INTO code FROM payment_codes c WHERE c.payment_code = p_payment_code FOR UPDATE;

    SELECT h.repeat, h.invoice_paid, h.quoted_amounts INTO repeat, invoice_paid, quoted_amounts
      FROM dipc_payment_history(p_payment_code, p_invoice_number, p_transaction_ref, p_amount,
                                p_unnamed_ref) AS h;
END;
$$;
