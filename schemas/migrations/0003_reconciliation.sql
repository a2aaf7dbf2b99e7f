-- Reconciliation with DOKU's Check Status (spec §8): every invoice an inquiry quoted and that has no
-- payment yet is checked on a schedule, so a customer who paid is never missed when DOKU's notifications
-- are lost.

-- Where what DOKU told us came from: its notification (POSTed to us) or its answer to our Check Status.
-- The inbox keeps both raw; a payment says which one recorded it.
ALTER TABLE notifications ADD COLUMN source text NOT NULL DEFAULT 'notification'
    CHECK (source IN ('notification', 'check_status'));
ALTER TABLE payments ADD COLUMN source text NOT NULL DEFAULT 'notification'
    CHECK (source IN ('notification', 'check_status'));

-- One row per quoted invoice. Written by the inquiry that quotes it (in the statement that records the
-- inquiry), closed by the transaction that records a payment for it, checked by the reconcilers.
CREATE TABLE reconciliation (
    payment_code     text        NOT NULL,
    invoice_number   text        NOT NULL,
    client_id        text        NOT NULL,
    channel          text        NOT NULL,
    amount           bigint      NOT NULL,  -- as quoted
    state            text        NOT NULL DEFAULT 'pending'
                                 CHECK (state IN ('pending', 'paid', 'expired', 'gave_up')),
    first_quoted_at  timestamptz NOT NULL DEFAULT now(),
    attempts         integer     NOT NULL DEFAULT 0,
    -- When a pending invoice is checked next; NULL once its state is final.
    next_check_at    timestamptz,
    -- A reconciler that claimed the row owns it until lease_until; lease_token says which claim.
    lease_until      timestamptz,
    lease_token      uuid,
    last_checked_at  timestamptz,
    last_result      text,
    last_detail      text,
    -- Once paid: the payment that settled the invoice, and where it came from.
    payment_id       bigint,
    settled_by       text        CHECK (settled_by IN ('notification', 'check_status')),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_code, invoice_number),
    CHECK ((state = 'pending') = (next_check_at IS NOT NULL))
);
-- What is due: WHERE state = 'pending' AND next_check_at <= now() ORDER BY next_check_at.
CREATE INDEX reconciliation_due_idx ON reconciliation (next_check_at) WHERE state = 'pending';
-- Keyset listing by state, oldest quote first.
CREATE INDEX reconciliation_state_idx ON reconciliation (state, first_quoted_at, payment_code, invoice_number);
-- A check by hand names the invoice only (DOKU's Check Status is by invoice number).
CREATE INDEX reconciliation_invoice_idx ON reconciliation (invoice_number);

-- The rate budget every reconciler shares (a token bucket in one row), so DIPC_RECONCILE_RPS bounds
-- the calls to DOKU of all processes and replicas together, and a 429 or 5xx slows all of them.
CREATE TABLE reconciliation_rate (
    id           boolean          PRIMARY KEY DEFAULT true CHECK (id),
    tokens       double precision NOT NULL DEFAULT 0,
    refilled_at  timestamptz      NOT NULL DEFAULT now()
);
INSERT INTO reconciliation_rate DEFAULT VALUES;

-- Invoices quoted in the last three days (the default schedule's span) before this migration and still
-- without a payment are checked once soon, then follow the schedule from their first quote.
INSERT INTO reconciliation (payment_code, invoice_number, client_id, channel, amount, first_quoted_at,
                            next_check_at)
SELECT i.payment_code, i.invoice_number, min(i.client_id), min(i.channel),
       (array_agg(i.amount ORDER BY i.received_at))[1], min(i.received_at), now()
  FROM inquiries i
 WHERE i.invoice_number IS NOT NULL
   AND i.received_at > now() - interval '3 days'
   AND NOT EXISTS (SELECT 1 FROM payments p
                    WHERE p.payment_code = i.payment_code AND p.invoice_number = i.invoice_number)
 GROUP BY i.payment_code, i.invoice_number;
