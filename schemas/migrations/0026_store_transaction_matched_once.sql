-- A payment that DOKU named by its store transaction only is repeated by the notification of that store
-- transaction, once (spec §4 rule 2, §8 rule 3).
--
-- A transaction's reference is its original_request_id, else its AGENT_TRX_ID (qualified by the agent
-- and the store: agent:<agent>/<store>/<trx>). A Check Status answer may leave out original_request_id
-- (spec §8: "some members may be missing"), and the payment it records is then known by its store
-- transaction. DOKU's late notification of the same transaction carries its original_request_id too:
-- a reference of its own, so it was taken for a second transaction, a conflict, and the alert told
-- finance to refund a customer who had paid once. A finance review found it.
--
-- Such a payment, recorded from a Check Status answer (source 'check_status'), is now matched as an
-- unnamed one is (0018): the first notice of the same amount whose store transaction it is (p_agent_ref,
-- the reference the notice would have without its original_request_id; NULL when the notice has no
-- AGENT_TRX_ID, or no other reference) repeats it, and
-- records its own reference in notified_ref (server/store/payments.py, record_repeat, under the
-- payment's row lock). From then on only that reference repeats it: another transaction that shows
-- the same store transaction (a placeholder AGENT_TRX_ID, say) is a conflict, never dropped as a
-- repeat. A payment from DOKU's notification is its own transaction whatever its reference: a notice of
-- the same store transaction number under an original_request_id stays a conflict, as before (a review
-- of this migration found the first version taking it for a repeat). A payment named by
-- original_request_id is not matched by store transaction either.
--
-- New functions with p_agent_ref after p_unnamed_ref; the old ones call them with NULL, so that a dipc
-- of before this migration still running while it is replaced keeps their signatures and 0025's rules,
-- and each rule is written once.
-- The history reads the invoice's payments in one scan, where 0025 had two probes of payments (a repeat,
-- a normal payment) and one of payment_resolutions: for each payment, whether the notice repeats it,
-- and whether it pays the invoice (normal, or an exception finance accepted, whose resolution is looked
-- up only for a payment that is not normal). A first-time notice finds no payment of its invoice, in
-- one index descent. An invoice has few payments: one, or two when the money was taken twice.
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
                                         AND p.notified_ref IS NULL)))), false),
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

CREATE OR REPLACE FUNCTION dipc_payment_history(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
RETURNS SETOF record
LANGUAGE sql STABLE ROWS 1 AS $$
    SELECT * FROM dipc_payment_history(p_payment_code, p_invoice_number, p_transaction_ref, p_amount,
                                       p_unnamed_ref, NULL::text)
$$;

-- 0008's function (the code's row lock, then the history), with p_agent_ref.
CREATE FUNCTION dipc_payment_context(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_agent_ref text,
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    SELECT * INTO code FROM payment_codes c WHERE c.payment_code = p_payment_code FOR UPDATE;

    SELECT h.repeat, h.invoice_paid, h.quoted_amounts INTO repeat, invoice_paid, quoted_amounts
      FROM dipc_payment_history(p_payment_code, p_invoice_number, p_transaction_ref, p_amount,
                                p_unnamed_ref, p_agent_ref) AS h;
END;
$$;

CREATE OR REPLACE FUNCTION dipc_payment_context(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE sql VOLATILE AS $$
    SELECT * FROM dipc_payment_context(p_payment_code, p_invoice_number, p_transaction_ref, p_amount,
                                       p_unnamed_ref, NULL::text);
$$;

-- 0016's function, with p_agent_ref.
CREATE FUNCTION dipc_payment_context_within(
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
        -- One lookup by the key each: a join with the pairs would be planned by the table's size, and a
        -- plan kept from when it was small scans all of it at every batch.
        FOR i IN 1 .. coalesce(cardinality(p_lock_invoices), 0) LOOP
            PERFORM FROM reconciliation
              WHERE payment_code = p_lock_codes[i] AND invoice_number = p_lock_invoices[i]
                FOR UPDATE;
        END LOOP;
    END IF;
    SELECT * INTO context FROM dipc_payment_context(p_payment_code, p_invoice_number, p_transaction_ref,
                                                    p_amount, p_unnamed_ref, p_agent_ref);
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

CREATE OR REPLACE FUNCTION dipc_payment_context_within(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_lock_wait_ms integer, p_lock_codes text[], p_lock_invoices text[],
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE sql VOLATILE AS $$
    SELECT * FROM dipc_payment_context_within(p_payment_code, p_invoice_number, p_transaction_ref, p_amount,
                                              p_unnamed_ref, NULL::text, p_lock_wait_ms, p_lock_codes,
                                              p_lock_invoices);
$$;
