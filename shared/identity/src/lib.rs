//! Service identity: which tracehop service is calling, and for which user.
//!
//! Only the gateway is public. Every call it makes to an internal service carries, in
//! `Authorization: Bearer`, a short-lived JSON Web Token signed with the gateway's Ed25519 key: the caller
//! (`iss`), the one service it is meant for (`aud`), and when the call is made for a signed-in user, that
//! user (`sub`, `email`). The callee checks it with the gateway's public key before anything else
//! ([`authenticate`]), so a request that did not come through the gateway gets a 401, and billing takes the
//! customer from the token, never from a body a caller could write.
//!
//! A signature costs tens of microseconds, so neither side makes one per call: the gateway reuses a token for
//! the same service and user for [`TOKEN_REUSE`], and a callee remembers a token it has checked until it
//! expires.
//!
//! Why signed tokens and not mutual TLS: the user's identity has to travel with the call in a form the callee
//! can verify, which mTLS alone does not give; one key pair is simpler to make and rotate than a CA with a
//! certificate per service; and callees hold only the public key, so a compromised billing cannot mint calls
//! to users. What tokens do not give is encryption on the wire: that is the network's (or a mesh's) job.
//!
//! Keys are PEM files, as `openssl genpkey -algorithm ed25519` writes them, or as [`generate_key_pair`]
//! makes them (`stack secrets`). A verifier accepts several public keys (concatenated PEM blocks), each known
//! by its key id (`kid`), so a key is rotated without a flag day: add the new public key to the callees, move
//! the gateway to the new private key, then remove the old public key.
//!
//! ```
//! use tracehop_identity::{EndUser, Issuer, Verifier, generate_key_pair};
//!
//! let (private_pem, public_pem) = generate_key_pair().unwrap();
//! let gateway = Issuer::from_pem(private_pem.expose().as_bytes(), "gateway").unwrap();
//! let billing = Verifier::from_pem(public_pem.as_bytes(), "billing").unwrap();
//!
//! let customer = EndUser { user_id: uuid::Uuid::new_v4(), email: "dani@example.com".into() };
//! let token = gateway.token("billing", Some(&customer)).unwrap();
//! let caller = billing.verify(&token).unwrap();
//! assert_eq!(caller.service, "gateway");
//! assert_eq!(caller.user.unwrap().user_id, customer.user_id);
//!
//! // Meant for another service: refused.
//! let for_users = gateway.token("users", None).unwrap();
//! assert!(billing.verify(&for_users).is_err());
//! ```

mod middleware;

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

pub use middleware::{Authenticated, SERVICE_UNAUTHORIZED, authenticate};

/// How long a token is good for. A call is made right after its token, so this only has to cover clock
/// skew between hosts; a stolen token is useless a minute later.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// How long the gateway hands out the same token again for the same service and user. An Ed25519 signature
/// costs the gateway about 20 µs and its check about 50 µs in the callee, a fifth of the gateway's CPU per
/// checkout when every call had a token of its own (BENCHMARKS.md, section 7); a bearer token reused within
/// its lifetime is as good as a new one, and a stolen one is good no longer. Half the lifetime, so a reused
/// token still has 30 s left when it arrives.
pub const TOKEN_REUSE: Duration = Duration::from_secs(30);

/// The most tokens an [`Issuer`] keeps for reuse, and the most a [`Verifier`] remembers as checked: past
/// it the expired ones go, and if none had, all of them (a burst of distinct users costs signatures, never
/// memory).
pub const MAX_REMEMBERED_TOKENS: usize = 10_000;

/// A bounded map from key to value, each good until a second on the wall clock ([`MAX_REMEMBERED_TOKENS`]).
struct Remembered<K, V> {
    entries: Mutex<HashMap<K, (V, u64)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> Remembered<K, V> {
    fn new() -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<K, (V, u64)>> {
        // Every update is one insert or one sweep: a panic elsewhere cannot leave the map half-changed.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value for `key` if it is still good at `now` (seconds since the epoch).
    fn get<Q>(&self, key: &Q, now: u64) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        match self.entries().get(key) {
            Some((value, until)) if now < *until => Some(value.clone()),
            _ => None,
        }
    }

    fn put(&self, key: K, value: V, until: u64, now: u64) {
        let mut entries = self.entries();
        if entries.len() >= MAX_REMEMBERED_TOKENS {
            entries.retain(|_, (_, good_until)| now < *good_until);
            if entries.len() >= MAX_REMEMBERED_TOKENS {
                entries.clear();
            }
        }
        entries.insert(key, (value, until));
    }
}

/// The user a call is made for, as the gateway established it from the session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EndUser {
    pub user_id: uuid::Uuid,
    pub email: String,
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The calling service (`iss`).
    pub service: String,
    /// The user it calls for, when there is one.
    pub user: Option<EndUser>,
}

/// The claims of a service token.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Claims {
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
    jti: uuid::Uuid,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sub: Option<uuid::Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    email: Option<String>,
}

/// A key that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not an Ed25519 private key in PKCS#8 PEM (openssl genpkey -algorithm ed25519)")]
    Private,
    #[error("no Ed25519 public key in SubjectPublicKeyInfo PEM found")]
    Public,
    #[error("generating a key: {0}")]
    Generate(String),
}

/// Why a token was refused. Deliberately coarse: the caller learns "unauthorized", the log learns which.
#[derive(Debug, thiserror::Error)]
pub enum Rejected {
    #[error("no service token")]
    Missing,
    #[error("service token signed by an unknown key")]
    UnknownKey,
    #[error("service token invalid: {0:?}")]
    Invalid(jsonwebtoken::errors::ErrorKind),
}

/// A secret's text that never prints (the private key PEM).
pub struct SecretText(String);

impl SecretText {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A fresh Ed25519 key pair: (private key as PKCS#8 PEM, public key as SubjectPublicKeyInfo PEM).
pub fn generate_key_pair() -> Result<(SecretText, String), KeyError> {
    let mut seed = [0_u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut seed);
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    let private = signing
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|error| KeyError::Generate(error.to_string()))?;
    let public = signing
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .map_err(|error| KeyError::Generate(error.to_string()))?;
    Ok((SecretText(private.to_string()), public))
}

/// A key's id: the first 16 hex digits of the SHA-256 of its public key.
fn key_id(public: &ed25519_dalek::VerifyingKey) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(public.as_bytes())[..8])
}

fn read(path: &str) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Makes service tokens (the gateway).
pub struct Issuer {
    name: String,
    key: EncodingKey,
    key_id: String,
    /// Tokens made in the last [`TOKEN_REUSE`], by audience and user.
    made: Remembered<(String, Option<EndUser>), String>,
}

impl fmt::Debug for Issuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Issuer")
            .field("name", &self.name)
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// `pem`: an Ed25519 private key in PKCS#8 PEM; `name`: the calling service, written as `iss`.
    pub fn from_pem(pem: &[u8], name: &str) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(pem).map_err(|_| KeyError::Private)?;
        let signing =
            ed25519_dalek::SigningKey::from_pkcs8_pem(text).map_err(|_| KeyError::Private)?;
        let der = signing.to_pkcs8_der().map_err(|_| KeyError::Private)?;
        Ok(Self {
            name: name.to_owned(),
            key: EncodingKey::from_ed_der(der.as_bytes()),
            key_id: key_id(&signing.verifying_key()),
            made: Remembered::new(),
        })
    }

    /// Reads the private key from a file.
    pub fn from_file(path: &str, name: &str) -> Result<Self, KeyError> {
        Self::from_pem(&read(path)?, name)
    }

    /// The id (`kid`) of the key this issuer signs with: public, and what to look for in a verifier's list
    /// during a rotation.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// A token for a call to `audience`, on behalf of `user` if given: the one made for the same audience
    /// and user less than [`TOKEN_REUSE`] ago, or a new one.
    pub fn token(
        &self,
        audience: &str,
        user: Option<&EndUser>,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let now = jsonwebtoken::get_current_timestamp();
        let key = (audience.to_owned(), user.cloned());
        if let Some(token) = self.made.get(&key, now) {
            return Ok(token);
        }
        let token = self.sign(audience, user, now)?;
        self.made
            .put(key, token.clone(), now + TOKEN_REUSE.as_secs(), now);
        Ok(token)
    }

    /// A new token, made at `now`.
    fn sign(
        &self,
        audience: &str,
        user: Option<&EndUser>,
        now: u64,
    ) -> Result<String, jsonwebtoken::errors::Error> {
        let claims = Claims {
            iss: self.name.clone(),
            aud: audience.to_owned(),
            iat: now,
            exp: now + TOKEN_LIFETIME.as_secs(),
            jti: uuid::Uuid::new_v4(),
            sub: user.map(|user| user.user_id),
            email: user.map(|user| user.email.clone()),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, &claims, &self.key)
    }
}

/// Checks service tokens (users, billing).
pub struct Verifier {
    audience: String,
    keys: HashMap<String, DecodingKey>,
    validation: Validation,
    /// Tokens that passed every check, with whom they name, until they expire: the same string always
    /// verifies the same way, so a reused token ([`TOKEN_REUSE`]) is checked once.
    checked: Remembered<String, Caller>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("audience", &self.audience)
            .field("key_ids", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// `pem`: one or more Ed25519 public keys (SubjectPublicKeyInfo PEM blocks, concatenated);
    /// `audience`: this service's name, the only `aud` accepted. Only the gateway's tokens are accepted.
    pub fn from_pem(pem: &[u8], audience: &str) -> Result<Self, KeyError> {
        let text = std::str::from_utf8(pem).map_err(|_| KeyError::Public)?;
        const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
        let mut keys = HashMap::new();
        for block in text.split(BEGIN).skip(1) {
            let block = format!("{BEGIN}{block}");
            let public = ed25519_dalek::VerifyingKey::from_public_key_pem(block.trim())
                .map_err(|_| KeyError::Public)?;
            keys.insert(key_id(&public), DecodingKey::from_ed_der(public.as_bytes()));
        }
        if keys.is_empty() {
            return Err(KeyError::Public);
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_audience(&[audience]);
        validation.set_issuer(&["gateway"]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.leeway = 5;
        Ok(Self {
            audience: audience.to_owned(),
            keys,
            validation,
            checked: Remembered::new(),
        })
    }

    /// Reads the public keys from a file.
    pub fn from_file(path: &str, audience: &str) -> Result<Self, KeyError> {
        Self::from_pem(&read(path)?, audience)
    }

    /// The caller a token names, if the token is good: signed by a known key, for this service, not expired.
    /// A token checked before is answered from memory until its `exp` (without the 5 s of leeway a first
    /// check allows).
    pub fn verify(&self, token: &str) -> Result<Caller, Rejected> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(caller) = self.checked.get(token, now) {
            return Ok(caller);
        }
        let (caller, expires) = self.check(token)?;
        self.checked
            .put(token.to_owned(), caller.clone(), expires, now);
        Ok(caller)
    }

    /// Every check of a token: its caller and its `exp`.
    fn check(&self, token: &str) -> Result<(Caller, u64), Rejected> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| Rejected::Invalid(error.into_kind()))?;
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| self.keys.get(kid))
            .ok_or(Rejected::UnknownKey)?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|error| Rejected::Invalid(error.into_kind()))?
            .claims;
        let user = match (claims.sub, claims.email) {
            (Some(user_id), Some(email)) => Some(EndUser { user_id, email }),
            _ => None,
        };
        let caller = Caller {
            service: claims.iss,
            user,
        };
        Ok((caller, claims.exp))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn pair() -> (Issuer, String) {
        let (private, public) = generate_key_pair().unwrap();
        (
            Issuer::from_pem(private.expose().as_bytes(), "gateway").unwrap(),
            public,
        )
    }

    #[test]
    fn a_token_is_good_for_its_audience_only() {
        let (gateway, public) = pair();
        let users = Verifier::from_pem(public.as_bytes(), "users").unwrap();
        let token = gateway.token("users", None).unwrap();
        assert_eq!(
            users.verify(&token).unwrap(),
            Caller {
                service: "gateway".into(),
                user: None
            }
        );
        let billing = Verifier::from_pem(public.as_bytes(), "billing").unwrap();
        assert!(matches!(
            billing.verify(&token),
            Err(Rejected::Invalid(
                jsonwebtoken::errors::ErrorKind::InvalidAudience
            ))
        ));
    }

    #[test]
    fn another_key_or_another_issuer_is_refused() {
        let (gateway, _) = pair();
        let (_, other_public) = pair();
        let verifier = Verifier::from_pem(other_public.as_bytes(), "users").unwrap();
        assert!(matches!(
            verifier.verify(&gateway.token("users", None).unwrap()),
            Err(Rejected::UnknownKey)
        ));

        // The right key, but a service other than the gateway claiming to call.
        let (private, public) = generate_key_pair().unwrap();
        let billing_as_issuer = Issuer::from_pem(private.expose().as_bytes(), "billing").unwrap();
        let verifier = Verifier::from_pem(public.as_bytes(), "users").unwrap();
        assert!(matches!(
            verifier.verify(&billing_as_issuer.token("users", None).unwrap()),
            Err(Rejected::Invalid(
                jsonwebtoken::errors::ErrorKind::InvalidIssuer
            ))
        ));
    }

    #[test]
    fn tampered_and_expired_tokens_are_refused() {
        let (gateway, public) = pair();
        let verifier = Verifier::from_pem(public.as_bytes(), "billing").unwrap();
        let user = EndUser {
            user_id: uuid::Uuid::new_v4(),
            email: "a@example.com".into(),
        };
        let token = gateway.token("billing", Some(&user)).unwrap();
        // Swap the payload for one naming another user: the signature no longer matches.
        let parts: Vec<&str> = token.split('.').collect();
        let other = gateway
            .token(
                "billing",
                Some(&EndUser {
                    user_id: uuid::Uuid::new_v4(),
                    email: "b@example.com".into(),
                }),
            )
            .unwrap();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            other.split('.').nth(1).unwrap(),
            parts[2]
        );
        assert!(verifier.verify(&forged).is_err());
        assert!(verifier.verify("not a token").is_err());

        // An expired token, signed with the right key.
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            iss: "gateway".into(),
            aud: "billing".into(),
            iat: now - 600,
            exp: now - 300,
            jti: uuid::Uuid::new_v4(),
            sub: None,
            email: None,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(gateway.key_id.clone());
        let expired = jsonwebtoken::encode(&header, &claims, &gateway.key).unwrap();
        assert!(matches!(
            verifier.verify(&expired),
            Err(Rejected::Invalid(
                jsonwebtoken::errors::ErrorKind::ExpiredSignature
            ))
        ));

        // "alg": "none" and HMAC tokens are never accepted.
        let mut hs = Header::new(Algorithm::HS256);
        hs.kid = Some(gateway.key_id.clone());
        let hmac = jsonwebtoken::encode(&hs, &claims, &EncodingKey::from_secret(public.as_bytes()))
            .unwrap();
        assert!(verifier.verify(&hmac).is_err());
    }

    #[test]
    fn several_public_keys_allow_rotation() {
        let (old, old_public) = pair();
        let (new, new_public) = pair();
        let bundle = format!("{old_public}{new_public}");
        let verifier = Verifier::from_pem(bundle.as_bytes(), "users").unwrap();
        assert!(verifier.verify(&old.token("users", None).unwrap()).is_ok());
        assert!(verifier.verify(&new.token("users", None).unwrap()).is_ok());
        assert!(Verifier::from_pem(b"", "users").is_err());
    }

    #[test]
    fn a_token_is_reused_for_the_same_audience_and_user_only() {
        let (gateway, public) = pair();
        let alice = EndUser {
            user_id: uuid::Uuid::new_v4(),
            email: "alice@example.com".into(),
        };
        let bob = EndUser {
            user_id: uuid::Uuid::new_v4(),
            email: "bob@example.com".into(),
        };
        let for_alice = gateway.token("billing", Some(&alice)).unwrap();
        assert_eq!(gateway.token("billing", Some(&alice)).unwrap(), for_alice);
        assert_ne!(gateway.token("billing", Some(&bob)).unwrap(), for_alice);
        assert_ne!(gateway.token("billing", None).unwrap(), for_alice);
        assert_ne!(gateway.token("users", Some(&alice)).unwrap(), for_alice);
        // Each still names its own user.
        let billing = Verifier::from_pem(public.as_bytes(), "billing").unwrap();
        let bobs = gateway.token("billing", Some(&bob)).unwrap();
        assert_eq!(billing.verify(&bobs).unwrap().user, Some(bob));
        assert_eq!(billing.verify(&for_alice).unwrap().user, Some(alice));
    }

    #[test]
    fn a_remembered_token_is_good_until_its_time_only() {
        let remembered = Remembered::<String, u32>::new();
        remembered.put("token".into(), 7, 100, 40);
        assert_eq!(remembered.get("token", 99), Some(7));
        assert_eq!(remembered.get("token", 100), None);
        assert_eq!(remembered.get("other", 50), None);
    }

    #[test]
    fn remembered_tokens_are_bounded() {
        let remembered = Remembered::<u64, ()>::new();
        // Half of them expired by `now`: the sweep keeps the good ones.
        for key in 0..MAX_REMEMBERED_TOKENS as u64 {
            remembered.put(key, (), if key % 2 == 0 { 10 } else { 1000 }, 5);
        }
        remembered.put(u64::MAX, (), 1000, 20);
        assert_eq!(remembered.entries().len(), MAX_REMEMBERED_TOKENS / 2 + 1);
        assert_eq!(remembered.get(&1, 20), Some(()));
        // All of them still good: the map starts again rather than grow.
        for key in 0..MAX_REMEMBERED_TOKENS as u64 {
            remembered.put(key, (), 1000, 20);
        }
        assert!(remembered.entries().len() <= MAX_REMEMBERED_TOKENS);
    }

    #[test]
    fn a_token_checked_before_is_refused_by_another_service_still() {
        let (gateway, public) = pair();
        let users = Verifier::from_pem(public.as_bytes(), "users").unwrap();
        let billing = Verifier::from_pem(public.as_bytes(), "billing").unwrap();
        let token = gateway.token("users", None).unwrap();
        assert!(users.verify(&token).is_ok());
        assert!(users.verify(&token).is_ok());
        assert!(billing.verify(&token).is_err());
    }

    #[test]
    fn the_private_key_never_prints() {
        let (private, _) = generate_key_pair().unwrap();
        assert_eq!(format!("{private:?}"), "<redacted>");
        let issuer = Issuer::from_pem(private.expose().as_bytes(), "gateway").unwrap();
        assert!(!format!("{issuer:?}").contains("PRIVATE"));
    }
}
