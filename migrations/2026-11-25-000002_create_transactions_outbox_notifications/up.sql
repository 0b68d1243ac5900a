-- One row per order: the charge and its state (billing-service).
CREATE TABLE transactions (
    id                  UUID PRIMARY KEY,
    user_id             UUID NOT NULL,
    email               TEXT NOT NULL,
    -- Integer minor units (cents); never floating point.
    amount_minor        BIGINT NOT NULL CHECK (amount_minor > 0),
    currency            TEXT NOT NULL,
    status              TEXT NOT NULL CHECK (status IN ('pending', 'charged')),
    charge_id           TEXT,
    -- The client's Idempotency-Key (or one the gateway made up): one charge per key, ever.
    idempotency_key     TEXT NOT NULL UNIQUE,
    -- SHA-256 of what was asked (user, amount, currency): the same key with another body is refused.
    request_fingerprint TEXT NOT NULL,
    trace_id            TEXT NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX transactions_user_id ON transactions (user_id);

-- Transactional outbox: written in the same database transaction as the charge, relayed to JetStream later.
CREATE TABLE outbox (
    id            UUID PRIMARY KEY,
    subject       TEXT NOT NULL,
    payload       TEXT NOT NULL,
    -- W3C trace context of the charge (JSON object), so a late relay still joins the checkout trace.
    trace_context TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at  TIMESTAMPTZ,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT
);

CREATE INDEX outbox_unpublished ON outbox (created_at) WHERE published_at IS NULL;

-- Confirmation e-mails (notification-service); created as 'pending' with the charge.
CREATE TABLE notifications (
    order_id   UUID PRIMARY KEY REFERENCES transactions (id),
    email      TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'failed')),
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    sent_at    TIMESTAMPTZ,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
