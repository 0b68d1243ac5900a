-- Least privilege: one PostgreSQL role per service, with rights on its own tables only. Migrations run as
-- the owner (whoever DATABASE_URL names for `diesel migration run` / `stack migrate`); the services log in
-- as these roles. Roles belong to the whole server, so they are made only when missing (several databases
-- on one server share them). They get no password here: `stack migrate` sets one from
-- POSTGRES_{USERS,BILLING,NOTIFICATIONS}_PASSWORD when given (docker compose), and a local server with
-- trust authentication needs none.
DO $$
DECLARE
    service TEXT;
BEGIN
    FOREACH service IN ARRAY ARRAY['tracehop_users', 'tracehop_billing', 'tracehop_notifications'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = service) THEN
            EXECUTE format('CREATE ROLE %I LOGIN', service);
        END IF;
        EXECUTE format('GRANT CONNECT ON DATABASE %I TO %I', current_database(), service);
        EXECUTE format('GRANT USAGE ON SCHEMA public TO %I', service);
    END LOOP;
END
$$;

-- Each service's own tables, and nothing else.
GRANT SELECT, INSERT, UPDATE, DELETE ON users, sessions TO tracehop_users;
GRANT SELECT, INSERT, UPDATE, DELETE ON transactions, outbox TO tracehop_billing;
GRANT SELECT, INSERT, UPDATE, DELETE ON notifications TO tracehop_notifications;

-- The notification row belongs to notifications: it makes the row from the order.completed event, so it no
-- longer points into billing's table.
ALTER TABLE notifications DROP CONSTRAINT notifications_order_id_fkey;
