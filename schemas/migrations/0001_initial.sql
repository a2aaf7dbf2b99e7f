-- dipc schema, version 1.
--
-- Every table that holds per-code data leads its primary or unique keys with payment_code, so the
-- schema can be distributed with Citus by payment_code (co-located) without change.
-- Money is bigint rupiah. Time is timestamptz. Payment codes are text (leading zeros matter).

CREATE TABLE payment_codes (
    payment_code    text        PRIMARY KEY CHECK (payment_code ~ '^[0-9]{1,25}$'),
    client_id       text        NOT NULL CHECK (client_id <> ''),
    channel         text        NOT NULL DEFAULT 'ANY' CHECK (channel IN ('ALFA', 'INDOMARET', 'ANY')),
    invoice_number  text        NOT NULL CHECK (invoice_number ~ '^[A-Za-z0-9_/-]{1,64}$'),
    amount          bigint      NOT NULL CHECK (amount > 0),
    customer_name   text        NOT NULL,
    customer_email  text        NOT NULL DEFAULT '',
    info1           text        NOT NULL DEFAULT '',
    info2           text        NOT NULL DEFAULT '',
    info3           text        NOT NULL DEFAULT '',
    reusable        boolean     NOT NULL DEFAULT false,
    status          text        NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'paid', 'cancelled')),
    expires_at      timestamptz,
    paid_count      integer     NOT NULL DEFAULT 0 CHECK (paid_count >= 0),
    -- Last sequence number minted into an invoice number for a reusable code (spec §3).
    invoice_seq     bigint      NOT NULL DEFAULT 0 CHECK (invoice_seq >= 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    version         integer     NOT NULL DEFAULT 1,
    -- A one-shot code is paid at most once; the notification path relies on this too.
    CHECK (reusable OR paid_count <= 1)
);
-- Keyset listing filtered by status: WHERE status = $1 AND payment_code > $2 ORDER BY payment_code.
CREATE INDEX payment_codes_status_idx ON payment_codes (status, payment_code);

-- Every authenticated inquiry that names a payment code, with the exact response bytes we sent,
-- so a repeated Request-Id gets the identical answer (and never a second invoice number).
CREATE TABLE inquiries (
    payment_code    text        NOT NULL,
    request_id      text        NOT NULL,
    client_id       text        NOT NULL,
    channel         text        NOT NULL,
    body_sha256     bytea       NOT NULL,
    outcome         text        NOT NULL,
    -- Set when the inquiry quoted a bill: the invoice number and amount the customer was shown.
    invoice_number  text,
    amount          bigint,
    http_status     smallint    NOT NULL,
    response_body   bytea       NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_code, request_id)
);
-- A Request-Id reused for another payment code is still a reuse (spec §3: 409 REQUEST_ID_REUSED).
CREATE INDEX inquiries_request_id_idx ON inquiries (request_id);
-- Notifications check that an invoice number was really quoted for the code, and at what amount.
CREATE INDEX inquiries_invoice_idx ON inquiries (payment_code, invoice_number) WHERE invoice_number IS NOT NULL;

-- Inbox: every notification whose signature verified, raw, written in the same transaction as its
-- effect. A 2xx to DOKU means the row is on disk.
CREATE TABLE notifications (
    payment_code        text        NOT NULL,
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    client_id           text        NOT NULL,
    request_id          text        NOT NULL,
    headers             jsonb       NOT NULL,
    body                bytea       NOT NULL,
    transaction_status  text,
    outcome             text        NOT NULL,
    received_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_code, id)
);
CREATE INDEX notifications_received_at_idx ON notifications (received_at);

-- One row per store transaction: (payment_code, invoice_number, transaction_ref) is the identity of a
-- payment, so a retried notification can never record it twice.
CREATE TABLE payments (
    payment_code        text        NOT NULL,
    invoice_number      text        NOT NULL,
    transaction_ref     text        NOT NULL,
    id                  bigint      GENERATED ALWAYS AS IDENTITY,
    kind                text        NOT NULL CHECK (kind IN ('normal', 'conflict', 'anomaly')),
    reason              text,
    amount              bigint      NOT NULL,
    expected_amount     bigint,
    client_id           text        NOT NULL,
    channel             text        NOT NULL,
    agent_id            text,
    agent_store_id      text,
    agent_trx_id        text,
    paid_at             timestamptz,
    notification_id     bigint      NOT NULL,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_code, invoice_number, transaction_ref)
);
-- At most one normal payment per one-shot code and per reusable invoice, in SQL and not only in Python.
CREATE UNIQUE INDEX payments_one_normal_idx ON payments (payment_code, invoice_number) WHERE kind = 'normal';
CREATE INDEX payments_id_idx ON payments (id);
CREATE INDEX payments_kind_id_idx ON payments (kind, id);

-- Outbox: what the merchant's other systems learn, in commit order (ids are allocated under an
-- advisory lock held to commit, so a reader by id never skips a late-committing event).
CREATE TABLE events (
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    type            text        NOT NULL,
    payment_code    text,
    payload         jsonb       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Webhook delivery state per event and subscriber, so deliveries survive restarts and several
-- processes can share the work (FOR UPDATE SKIP LOCKED).
CREATE TABLE webhook_deliveries (
    event_id        bigint      NOT NULL REFERENCES events (id),
    subscriber      text        NOT NULL DEFAULT 'default',
    payment_code    text,
    status          text        NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    last_status     integer,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, subscriber)
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_status_idx ON webhook_deliveries (status, event_id);
