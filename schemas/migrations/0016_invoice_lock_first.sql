-- A recording waits for its invoice's reconciliation row before it takes its ids, as it does for its
-- code's row (ADR 11, "Ids follow commit order"; ADR 13, "Locks first"). The recording settles that
-- row (reconciliation.settle_statement), an UPDATE that PostgreSQL runs at the end of the statement,
-- after the ids: whoever held the row (an inquiry's batch that quoted the invoice and waits for another
-- lock, for up to its 100 ms; a reconciler; a long transaction of an operator) made the recording wait
-- with its ids taken, and commit them below the cursor of a reader paging /v1/payments, the exception
-- queue or the inbox by id, who never saw that payment. A review found it.
--
-- So a batch's first recording also locks the reconciliation rows of every invoice in the batch
-- (p_lock_codes and p_lock_invoices, pairs sorted by code, then invoice), after the codes' rows, the
-- order in which a write alone takes a code's row and its invoice's (an inquiry's batch may take one
-- code's invoice before another code's row; the batches' 100 ms bound ends such a cycle). A recording
-- alone (p_lock_wait_ms NULL) locks its own after its code's (dipc_payment_context). A row that does not exist yet (an inquiry
-- still inserting it) is not waited for: the settling UPDATE does not see it either.
CREATE FUNCTION dipc_payment_context_within(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_lock_wait_ms integer, p_lock_codes text[], p_lock_invoices text[],
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
        -- One lookup by the key each: a join with the pairs would be planned by the table's size, and a
        -- plan kept from when it was small scans all of it at every batch.
        FOR i IN 1 .. coalesce(cardinality(p_lock_invoices), 0) LOOP
            PERFORM FROM reconciliation
              WHERE payment_code = p_lock_codes[i] AND invoice_number = p_lock_invoices[i]
                FOR UPDATE;
        END LOOP;
    END IF;
    SELECT * INTO context FROM dipc_payment_context(p_payment_code, p_invoice_number, p_transaction_ref,
                                                    p_amount, p_unnamed_ref);
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

-- The function of 0014, for a dipc of before this migration still running while it is replaced: the
-- same, without the invoices of a batch (its batches lock as they did; its recordings alone wait for
-- their invoice's row first, like the new ones).
CREATE OR REPLACE FUNCTION dipc_payment_context_within(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_lock_wait_ms integer, p_lock_codes text[],
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE sql VOLATILE AS $$
    SELECT * FROM dipc_payment_context_within(p_payment_code, p_invoice_number, p_transaction_ref, p_amount,
                                              p_unnamed_ref, p_lock_wait_ms, p_lock_codes, NULL::text[]);
$$;
