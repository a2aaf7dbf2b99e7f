-- What of a code a payment to be counted is compared on (ADR 11, issue 10).
--
-- The recording statement counts a normal payment relative to the row as it is then, and writes what the
-- count left into the event; so a payment to be counted is compared on the code without what counting
-- moves (the count, the version, the time of change), and payments of one reusable code at the same
-- moment do not make each other decide again. Without `counting`, as dipc_code_state(code) of 0008,
-- which this replaces: all of the code but the invoice sequence. NULL for no code (plpgsql's empty row
-- too).
CREATE FUNCTION dipc_code_state(code payment_codes, counting boolean) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN code.payment_code IS NOT NULL THEN
               CASE WHEN counting THEN to_jsonb(code) - '{invoice_seq,paid_count,version,updated_at}'::text[]
                    ELSE to_jsonb(code) - 'invoice_seq' END::text
           END
$$;

DROP FUNCTION dipc_code_state(payment_codes);
