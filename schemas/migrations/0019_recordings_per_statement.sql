-- A batch of payment recordings in one statement per round rather than one per recording (ADR 13,
-- revised 2026-11-28). PostgreSQL starts and ends an executor for every statement, over the five tables
-- a recording writes and their seventeen indexes, and rebuilds those tables' CHECK constraints from
-- their stored text each time: about half of what a one-shot notification costs it. The recording
-- statement (server/store/payments.py, _RECORD) now takes its recordings as an array of this type and
-- records each as before, with its own read of the code and the invoice within the code's row lock and
-- its own check of what it was decided on. A round holds at most one recording of a code: what one
-- recording's facts are (its code's row, its invoice's payments and quotes) no other in its round
-- writes; a code's next recording goes in the next round, which sees the one before.
--
-- The fields, in the order server/store/payments.py's _recording gives them: the notification as the
-- inbox stores it (inbox.values; its headers as jsonb text, since asyncpg encodes a composite in binary
-- only), the payment, its event (the document as jsonb text, without the ids) and what the payment was
-- decided on. A dipc of before this migration, still running while it is replaced, does not use it.
CREATE TYPE dipc_recording AS (
    payment_code        text,
    notified_client_id  text,
    request_id          text,
    headers             text,
    body                bytea,
    transaction_status  text,
    outcome             text,
    source              text,
    invoice_number      text,
    transaction_ref     text,
    kind                text,
    reason              text,
    amount              bigint,
    expected_amount     bigint,
    client_id           text,
    channel             text,
    agent_id            text,
    agent_store_id      text,
    agent_trx_id        text,
    paid_at             timestamptz,
    recorded_at         timestamptz,
    event_type          text,
    event               text,
    unnamed_ref         text,
    decided_state       text,
    invoice_paid        boolean,
    quoted_amounts      bigint[],
    counting            boolean
);
