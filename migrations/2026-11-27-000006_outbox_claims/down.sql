ALTER TABLE outbox
    DROP COLUMN claimed_by,
    DROP COLUMN claimed_until;
