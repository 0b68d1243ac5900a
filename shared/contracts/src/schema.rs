//! Diesel table definitions for `migrations/` (what `diesel print-schema` prints), shared so that every
//! service reads the same columns.

/// The database every service and `stack` use when `DATABASE_URL` is not set.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tracehop";

diesel::table! {
    users (id) {
        id -> Uuid,
        email -> Text,
        name -> Text,
        password_hash -> Text,
        created_at -> Timestamptz,
    }
}

diesel::table! {
    sessions (token_hash) {
        token_hash -> Text,
        user_id -> Uuid,
        created_at -> Timestamptz,
        expires_at -> Timestamptz,
    }
}

diesel::table! {
    login_failures (key) {
        key -> Text,
        window_ends -> Timestamptz,
        failures -> Int4,
    }
}

diesel::table! {
    transactions (id) {
        id -> Uuid,
        user_id -> Uuid,
        email -> Text,
        amount_minor -> Int8,
        currency -> Text,
        status -> Text,
        charge_id -> Nullable<Text>,
        idempotency_key -> Text,
        request_fingerprint -> Text,
        trace_id -> Text,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    outbox (id) {
        id -> Uuid,
        subject -> Text,
        payload -> Text,
        trace_context -> Text,
        created_at -> Timestamptz,
        published_at -> Nullable<Timestamptz>,
        attempts -> Int4,
        last_error -> Nullable<Text>,
        claimed_by -> Nullable<Text>,
        claimed_until -> Nullable<Timestamptz>,
    }
}

diesel::table! {
    notifications (order_id) {
        order_id -> Uuid,
        email -> Text,
        status -> Text,
        attempts -> Int4,
        last_error -> Nullable<Text>,
        sent_at -> Nullable<Timestamptz>,
        updated_at -> Timestamptz,
        claimed_by -> Nullable<Text>,
        claimed_until -> Nullable<Timestamptz>,
    }
}

diesel::joinable!(sessions -> users (user_id));

diesel::allow_tables_to_appear_in_same_query!(
    users,
    sessions,
    login_failures,
    transactions,
    outbox,
    notifications
);
