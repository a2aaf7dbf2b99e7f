-- The functions a payment notification's read and recording call cost less to run (issue 10): each
-- call of a SQL function that PostgreSQL does not inline starts an executor of its own, per statement
-- of its body. auto_explain under first-time notifications put the recording's call of
-- dipc_payment_context_within at 55 of its 151 us.

-- dipc_code_state is inlined into the statements that call it. 0009 declared it IMMUTABLE, but to_jsonb
-- of a row is STABLE (a timestamptz's text follows the session's TimeZone), and PostgreSQL inlines a
-- SQL function only when its body is no more volatile than the function claims: every call ran as a
-- function of its own, three times per notification (twice in the read, once in the recording).
-- STABLE is what it is: within a statement it returns the same text for the same row.
ALTER FUNCTION dipc_code_state(payment_codes, boolean) STABLE;

-- dipc_payment_context_within (0011) in PL/pgSQL: its statements' plans are kept, set_config is an
-- expression evaluated without an executor, and the two statements a recording alone does not need (the
-- lock_timeout of a batch, the row locks of the batch's codes) are skipped rather than run to do
-- nothing. The same statements, in the same order.
CREATE OR REPLACE FUNCTION dipc_payment_context_within(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_lock_wait_ms integer, p_lock_codes text[],
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
    END IF;
    SELECT * INTO context FROM dipc_payment_context(p_payment_code, p_invoice_number, p_transaction_ref,
                                                    p_amount, p_unnamed_ref);
    code := context.code;
    repeat := context.repeat;
    invoice_paid := context.invoice_paid;
    quoted_amounts := context.quoted_amounts;
END;
$$;

-- dipc_payment_history returns its one row as a set, so that the statements that read it (the read of
-- ADR 11, and dipc_payment_context's) inline it instead of running it as a function of its own:
-- PostgreSQL inlines only set-returning SQL functions in FROM. The body is 0008's.
DROP FUNCTION dipc_payment_history(text, text, text, bigint, text);
CREATE FUNCTION dipc_payment_history(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
RETURNS SETOF record
LANGUAGE sql STABLE ROWS 1 AS $$
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
