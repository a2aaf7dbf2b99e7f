-- Payment recordings in batches (issue 10, ADR 13): the recordings of one dipc worker that arrive while
-- its previous batch is out are sent together, each its own statement, in one transaction and one
-- commit.
--
-- What sharing risks is one recording holding up the others while it waits for a lock, so a batch may
-- wait for locks only until p_lock_wait_ms after its transaction began (now(), the same for every
-- statement of the batch): before each recording, lock_timeout is set to what is left of that, at least
-- 1 ms, since a lock_timeout of 0 would mean none. A recording that waits past it fails the batch, which
-- dipc then records one by one, without the bound.
--
-- The batch's first recording takes the row locks of every code in the batch (p_lock_codes), in code
-- order, before any recording takes its ids: a recording that had taken its payment's id and then
-- waited for the next one's code would commit that id after other workers' larger ones, behind a
-- reader paging /v1/payments by id (ADR 11). The others pass NULL. With p_lock_wait_ms and p_lock_codes
-- NULL (a recording alone), this is dipc_payment_context (0008).
CREATE FUNCTION dipc_payment_context_within(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_lock_wait_ms integer, p_lock_codes text[],
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE sql VOLATILE AS $$
    SELECT set_config('lock_timeout',
                      greatest(1, ceil(1000 * extract(epoch FROM now() - clock_timestamp()) + p_lock_wait_ms))::int
                      || 'ms', true)
     WHERE p_lock_wait_ms IS NOT NULL;
    SELECT FROM payment_codes WHERE payment_code = ANY (p_lock_codes) ORDER BY payment_code FOR UPDATE;
    SELECT * FROM dipc_payment_context(p_payment_code, p_invoice_number, p_transaction_ref, p_amount,
                                       p_unnamed_ref);
$$;
