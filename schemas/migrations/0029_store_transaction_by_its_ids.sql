-- A Check Status answer may leave out AGENT_ID and AGENT_STORE_ID too, and name the transaction by its
-- AGENT_TRX_ID alone (spec §8: some members may be missing): agent://1246. A review of 0027 found that
-- such an answer and DOKU's notification of the same transaction (agent:ALFAMART/TZ01/1246, and its
-- original_request_id) never met, in either order: the one recorded second was an ALREADY_PAID
-- conflict, whose alert told finance to refund a customer who had paid once.
--
-- Two namings of a store transaction now name the same one when they agree on every id both give, the
-- transaction's number always among them (dipc_same_store_transaction). As 0028 requires, only ids
-- without "/" are read so: a reference then splits into its three ids. The rules that use it are 0026's
-- and 0027's, otherwise as they were:
-- - a notification (its own reference is its original_request_id, p_agent_ref its store transaction's)
--   repeats a payment that a Check Status answer recorded by its store transaction only, of the same
--   amount, that no notification is matched with yet; it is matched with it (notified_ref, in
--   server/store/payments.py's _RECORD_REPEAT), so another transaction of that store number is a
--   conflict;
-- - a Check Status answer named by its store transaction only (p_agent_ref = its own reference) repeats
--   any payment of that store transaction and amount, and matches nothing.
-- A payment's transaction_ref equal to dipc_agent_reference of its ids says it was named by its store
-- transaction only.
--
-- While a deploy replaces the workers, one from before this migration finds, through the history, that
-- such a notification repeats an answer named by the store transaction's number alone, and its own
-- repeat statement does not: it decides again until its deadline, and answers 503; DOKU retries, and a
-- new worker records it. Every other notice is recorded by both as before.
CREATE FUNCTION dipc_same_store_transaction(p payments, p_agent_ref text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT left(p_agent_ref, 6) = 'agent:'
       AND cardinality(ids) = 3
       AND ids[3] <> ''
       AND strpos(concat(p.agent_id, p.agent_store_id, p.agent_trx_id), '/') = 0
       AND p.agent_trx_id = ids[3]
       AND (ids[1] = '' OR coalesce(p.agent_id, '') = '' OR p.agent_id = ids[1])
       AND (ids[2] = '' OR coalesce(p.agent_store_id, '') = '' OR p.agent_store_id = ids[2])
      FROM (SELECT string_to_array(substr(p_agent_ref, 7), '/') AS ids) AS named
$$;

-- 0028's function: the answer's rule by the ids.
CREATE OR REPLACE FUNCTION dipc_answer_repeats(p payments, p_transaction_ref text, p_amount bigint,
                                               p_agent_ref text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_agent_ref = p_transaction_ref
       AND p.amount = p_amount
       AND dipc_same_store_transaction(p, p_agent_ref)
$$;

-- The notification's rule of 0026, for the history below and for _RECORD_REPEAT's match.
CREATE FUNCTION dipc_notification_repeats_answer(p payments, p_transaction_ref text, p_amount bigint,
                                                 p_agent_ref text)
RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT p_agent_ref <> p_transaction_ref
       AND p.amount = p_amount
       AND p.source = 'check_status'
       AND p.notified_ref IS NULL
       AND p.transaction_ref = dipc_agent_reference(p.agent_id, p.agent_store_id, p.agent_trx_id)
       AND dipc_same_store_transaction(p, p_agent_ref)
$$;

-- 0028's function, with 0026's store transaction clause by the ids.
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
                                     OR (p.transaction_ref = p_unnamed_ref AND p.notified_ref IS NULL)))
                            OR dipc_notification_repeats_answer(p, p_transaction_ref, p_amount, p_agent_ref)
                            OR dipc_answer_repeats(p, p_transaction_ref, p_amount, p_agent_ref)), false),
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
