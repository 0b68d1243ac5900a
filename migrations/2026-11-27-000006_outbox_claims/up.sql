-- A relay claims the outbox events it is about to publish (a lease: who, and until when), so billing's
-- replicas never publish the same event at once: a sweep takes only unclaimed rows (and skips rows another
-- sweep is claiming right now, FOR UPDATE SKIP LOCKED); the claim is cleared when the outcome is recorded,
-- and a claim whose holder died simply runs out, after which any replica's sweep takes the event over.
ALTER TABLE outbox
    ADD COLUMN claimed_by    TEXT,
    ADD COLUMN claimed_until TIMESTAMPTZ;
