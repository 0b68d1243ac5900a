ALTER TABLE notifications
    DROP COLUMN claimed_by,
    DROP COLUMN claimed_until;
