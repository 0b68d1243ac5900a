ALTER TABLE transactions DROP CONSTRAINT transactions_user_idempotency_key;
ALTER TABLE transactions ADD CONSTRAINT transactions_idempotency_key_key UNIQUE (idempotency_key);
