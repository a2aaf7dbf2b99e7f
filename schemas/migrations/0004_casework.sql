-- Casework (spec §9) and the audit trail's indexes.
--
-- Every conflict or anomaly payment is an exception, open until it has a resolution here. A resolution
-- is written once and is final: the trigger below refuses UPDATE and DELETE for everyone, so "never
-- edited or deleted" holds in SQL, not only in Python. (TRUNCATE fires no row trigger; tests use it.)

-- The payment a resolution closes, by a key that leads with payment_code (co-location under Citus).
CREATE UNIQUE INDEX payments_code_id_idx ON payments (payment_code, id);

CREATE TABLE payment_resolutions (
    payment_code    text        NOT NULL,
    payment_id      bigint      NOT NULL,
    resolution      text        NOT NULL CHECK (resolution IN ('refunded', 'accepted', 'dismissed')),
    resolved_by     text        NOT NULL CHECK (resolved_by <> ''),
    note            text        NOT NULL,
    reference       text,
    -- Whether this resolution marked the payment's code paid (an accepted anomaly of a payable code).
    code_paid       boolean     NOT NULL DEFAULT false,
    resolved_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (payment_code, payment_id),
    FOREIGN KEY (payment_code, payment_id) REFERENCES payments (payment_code, id)
);

CREATE FUNCTION payment_resolutions_are_final() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'payment resolutions are final: % of payment_resolutions is refused', TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$;

CREATE TRIGGER payment_resolutions_final
    BEFORE UPDATE OR DELETE ON payment_resolutions
    FOR EACH ROW EXECUTE FUNCTION payment_resolutions_are_final();

-- The exception queue in payment-id order; only exceptions are in it, so it stays small.
CREATE INDEX payments_exceptions_idx ON payments (id) WHERE kind <> 'normal';

-- The payment a notification made (GET /v1/notifications joins on it).
CREATE INDEX payments_notification_idx ON payments (payment_code, notification_id);

-- Keyset pagination of the audit trail. inquiries is written on the hot path: one btree, no more.
-- Migrations run in a transaction, so these are plain CREATE INDEX: while one builds, writes to its
-- table wait. On a large inquiries table (months of traffic) apply this migration in a quiet hour, or
-- `dipc prune --inquiries N` first; the index also serves prune's received_at scan.
CREATE INDEX inquiries_received_idx ON inquiries (received_at, payment_code, request_id);
-- The inbox in id order across all codes.
CREATE INDEX notifications_id_idx ON notifications (id);
