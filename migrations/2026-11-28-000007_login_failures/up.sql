-- Failed logins, counted where every replica of users sees them: per account (`account:<e-mail>`) and per
-- client address (`address:<ip>`), each over a fixed window that ends at `window_ends`. Counted in a
-- replica's memory, two replicas let an attacker try twice as many passwords as the limit says. Rows whose
-- window has ended are deleted by users' retention.
CREATE TABLE login_failures (
    key         TEXT PRIMARY KEY,
    window_ends TIMESTAMPTZ NOT NULL,
    failures    INTEGER NOT NULL
);

GRANT SELECT, INSERT, UPDATE, DELETE ON login_failures TO tracehop_users;
