-- Payment recordings in batches (issue 10, ADR 13): the recordings of one dipc worker that arrive while
-- its previous batch is out are sent together, each its own statement, in one transaction and one
-- commit. As for inquiries (0010), what sharing risks is one recording holding up the others while it
-- waits for its code's row lock, so a batch may wait for locks only until p_lock_wait_ms after its
-- transaction began (now()): before the lock is taken, lock_timeout is set to what is left of that, at
-- least 1 ms, since a lock_timeout of 0 would mean none. A recording that waits past it fails the batch,
-- which dipc then records one by one, without the bound. With p_lock_wait_ms NULL (a recording alone),
-- this is dipc_payment_context (0008).
CREATE FUNCTION dipc_payment_context_within(
    p_payment_code text, p_invoice_number text, p_transaction_ref text, p_amount bigint, p_unnamed_ref text,
    p_lock_wait_ms integer,
    OUT code payment_codes, OUT repeat boolean, OUT invoice_paid boolean, OUT quoted_amounts bigint[])
LANGUAGE sql VOLATILE AS $$
    SELECT set_config('lock_timeout',
                      greatest(1, ceil(1000 * extract(epoch FROM now() - clock_timestamp()) + p_lock_wait_ms))::int
                      || 'ms', true)
     WHERE p_lock_wait_ms IS NOT NULL;
    SELECT * FROM dipc_payment_context(p_payment_code, p_invoice_number, p_transaction_ref, p_amount,
                                       p_unnamed_ref);
$$;
