DROP TABLE notifications;
DROP TABLE outbox;
DROP TABLE transactions;
