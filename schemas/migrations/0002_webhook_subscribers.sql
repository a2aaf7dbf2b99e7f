-- Webhook subscribers: where each one's stream of deliveries starts, so a newly configured webhook
-- receives the events from then on (the feed serves the history).

CREATE TABLE webhook_subscribers (
    subscriber      text        PRIMARY KEY,
    url             text        NOT NULL,
    started_after   bigint      NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- In order per code: a delivery is due only when no earlier delivery of the same code is undelivered.
CREATE INDEX webhook_deliveries_undelivered_idx ON webhook_deliveries (subscriber, payment_code, event_id)
    WHERE status <> 'delivered';

-- Where a subscriber's stream has reached: max(event_id) per subscriber.
CREATE INDEX webhook_deliveries_subscriber_idx ON webhook_deliveries (subscriber, event_id);
