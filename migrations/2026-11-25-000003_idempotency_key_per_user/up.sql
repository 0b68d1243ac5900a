-- Idempotency keys belong to a user: two customers may pick the same key without meeting each other.
ALTER TABLE transactions DROP CONSTRAINT transactions_idempotency_key_key;
ALTER TABLE transactions ADD CONSTRAINT transactions_user_idempotency_key UNIQUE (user_id, idempotency_key);
