ALTER TABLE notifications
    ADD CONSTRAINT notifications_order_id_fkey FOREIGN KEY (order_id) REFERENCES transactions (id);
REVOKE ALL ON users, sessions FROM tracehop_users;
REVOKE ALL ON transactions, outbox FROM tracehop_billing;
REVOKE ALL ON notifications FROM tracehop_notifications;
DO $$
DECLARE
    service TEXT;
BEGIN
    FOREACH service IN ARRAY ARRAY['tracehop_users', 'tracehop_billing', 'tracehop_notifications'] LOOP
        EXECUTE format('REVOKE ALL ON SCHEMA public FROM %I', service);
        EXECUTE format('REVOKE ALL ON DATABASE %I FROM %I', current_database(), service);
    END LOOP;
END
$$;
-- The roles stay: other databases on this server may still use them.
