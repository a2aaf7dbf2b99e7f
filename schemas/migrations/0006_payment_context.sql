-- What a payment notification is decided on, read in one round trip where it was two (issue 10).
--
-- decide_payment (server/core/payments.py) decides a notice on its code and on what is recorded for the
-- invoice, with the code's row locked: the lock serialises every notification, cancel and change of a
-- code (ADR 4). What is recorded must be read after the lock is held, by a statement whose snapshot
-- includes whatever the lock's previous holder committed; one SQL statement cannot do that (its snapshot
-- is taken before it waits for the lock). In READ COMMITTED each statement of a VOLATILE plpgsql function
-- takes a fresh snapshot, so the SELECT that follows the SELECT ... FOR UPDATE below sees it, as the
-- second statement sent from Python did. The lock is held until the caller's transaction ends.
--
-- No payment rule lives here: this returns the facts, decide_payment decides. `code` is NULL for a code
-- that is not registered (no row to lock; the payment's unique keys guard that case).
--
-- A repeat is this very transaction recorded already: the same transaction reference; and, where one
-- side is a Check Status answer that named no transaction (`p_unnamed_ref`, "check-status:<invoice>"),
-- the same amount for the same invoice: such an answer and DOKU's notification of that payment cannot
-- be told apart by reference, and one payment must not become a conflict that tells finance to refund it
-- (spec §8 rule 3). `quoted_amounts` are the amounts successful inquiries quoted for the invoice.
CREATE FUNCTION dipc_payment_context(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT * INTO code FROM payment_codes c WHERE c.payment_code = p_payment_code FOR UPDATE;

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
                    AND i.amount IS NOT NULL)
      INTO repeat, invoice_paid, quoted_amounts;
END;
$$;
