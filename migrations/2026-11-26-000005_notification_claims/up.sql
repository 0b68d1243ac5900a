-- A delivery claims an order's notification before it sends (a lease: who, and until when), so two
-- deliveries of one order (a redelivery, another replica) never send at once; the claim is cleared when the
-- outcome is recorded, and a claim whose holder died simply runs out.
ALTER TABLE notifications
    ADD COLUMN claimed_by    TEXT,
    ADD COLUMN claimed_until TIMESTAMPTZ;
