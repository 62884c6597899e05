//! `ensure_user`: profile rows, placeholder emails, unique emails.

use tradeeon_shared::domain::Exchange;
use tradeeon_shared::store::{Store, StoreError, UserContext, placeholder_email};

use crate::harness::{new_connection, new_user, text};

async fn email_of(store: &Store, user: &UserContext) -> Option<String> {
    let id = user.user_id.to_string();
    text(store, "SELECT email FROM public.users WHERE id = $1", "SELECT email FROM users WHERE id = ?1", &id).await
}

async fn ensure_user_is_idempotent(store: Store) {
    let user = new_user();
    store.ensure_user(&user).await.unwrap();
    store.ensure_user(&user).await.unwrap();
    assert_eq!(email_of(&store, &user).await, user.email);

    // Without an email the stored one stays.
    let anonymous = UserContext { email: None, ..user.clone() };
    store.ensure_user(&anonymous).await.unwrap();
    assert_eq!(email_of(&store, &user).await, user.email);

    // A new email replaces it.
    let renamed = UserContext { email: Some("renamed@example.com".into()), ..user.clone() };
    store.ensure_user(&renamed).await.unwrap();
    assert_eq!(email_of(&store, &user).await.as_deref(), Some("renamed@example.com"));

    // The profile row is what connections hang off.
    store.upsert_connection(&user, new_connection(Exchange::Binance, "u"), None).await.unwrap();
}

async fn user_without_email_gets_a_placeholder(store: Store) {
    let user = UserContext { email: None, ..new_user() };
    store.ensure_user(&user).await.unwrap();
    store.ensure_user(&user).await.unwrap();
    let email = email_of(&store, &user).await.unwrap();
    assert_eq!(email, placeholder_email(user.user_id));
    assert!(email.ends_with("@users.invalid"));
    // A real email arriving later replaces the placeholder.
    let with_email = UserContext { email: Some("late@example.com".into()), ..user.clone() };
    store.ensure_user(&with_email).await.unwrap();
    assert_eq!(email_of(&store, &user).await.as_deref(), Some("late@example.com"));
}

/// `users.email` is UNIQUE (seed schema); a clash is a Conflict, not an opaque database error.
async fn duplicate_email_is_a_conflict(store: Store) {
    let a = new_user();
    store.ensure_user(&a).await.unwrap();
    let b = UserContext { email: a.email.clone(), ..new_user() };
    let err = store.ensure_user(&b).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    // And the same for a user changing to an email already taken.
    let c = new_user();
    store.ensure_user(&c).await.unwrap();
    let err = store.ensure_user(&UserContext { email: a.email.clone(), ..c }).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}

/// Writing for a user who has no profile row fails cleanly (no panic, not a Conflict).
async fn upsert_without_profile_is_an_error(store: Store) {
    let stranger = new_user();
    let err = store.upsert_connection(&stranger, new_connection(Exchange::Binance, "x"), None).await.unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err:?}");
}

contract!(
    ensure_user_is_idempotent,
    user_without_email_gets_a_placeholder,
    duplicate_email_is_a_conflict,
    upsert_without_profile_is_an_error,
);
