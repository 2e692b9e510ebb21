//! Resume tokens (Google AIP-158): opaque, versioned, MAC'd.
//!
//! A token carries where the stream stopped (series, time, value, how
//! many equal readings were already sent), a hash of the request's other
//! arguments, and when it was issued; HMAC-SHA256 under a key the server
//! processes share through the database signs all of it. So a client can
//! neither edit a token into reading another selection nor replay one past
//! its lifetime, and any process on the same database accepts it.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 1;
const HASH_LEN: usize = 16;
const MAC_LEN: usize = 32;
/// version, issued, arguments' hash, sensor, time, value, skip.
const BODY_LEN: usize = 1 + 8 + HASH_LEN + 8 + 8 + 8 + 8;

/// Where a stream resumes: in the series of `sensor_pk`, readings at or
/// after `(time, value)` in (time, value) order, less the first `skip`
/// equal to it (already sent). Buckets resume at a bucket's start, with
/// `value` at `f64::MIN` and no skip.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Position {
    pub sensor_pk: i64,
    pub time: i64,
    pub value: f64,
    pub skip: u64,
}

/// Why a token is refused: INVALID_ARGUMENT, naming the problem.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("resume_token is not a token this server issued")]
    Malformed,
    #[error("resume_token was altered (its signature does not match)")]
    Tampered,
    #[error("resume_token is of an unknown version {0}")]
    Version(u8),
    #[error(
        "resume_token belongs to a request with other arguments; resume with the same devices, sensors, range and downsampling"
    )]
    OtherArguments,
    #[error("resume_token expired: issued {age_secs} s ago, valid for {ttl_secs} s")]
    Expired { age_secs: u64, ttl_secs: u64 },
}

/// Issues and checks tokens with one key.
#[derive(Clone)]
pub struct TokenKey {
    key: Vec<u8>,
    ttl: Duration,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey").field("ttl", &self.ttl).finish()
    }
}

/// A hash of a request's arguments other than its token: the canonical
/// text the caller builds, so that equal requests hash alike.
pub fn arguments_hash(canonical: &str) -> [u8; HASH_LEN] {
    let digest = Sha256::digest(canonical.as_bytes());
    digest[..HASH_LEN]
        .try_into()
        .expect("a SHA-256 is 32 bytes")
}

impl TokenKey {
    pub fn new(key: Vec<u8>, ttl: Duration) -> Self {
        Self { key, ttl }
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length")
    }

    /// The token for `position`, issued at `now` (unix seconds).
    pub fn issue(&self, arguments: &[u8; HASH_LEN], position: Position, now: i64) -> String {
        let mut body = Vec::with_capacity(BODY_LEN + MAC_LEN);
        body.push(VERSION);
        body.extend_from_slice(&now.to_be_bytes());
        body.extend_from_slice(arguments);
        body.extend_from_slice(&position.sensor_pk.to_be_bytes());
        body.extend_from_slice(&position.time.to_be_bytes());
        body.extend_from_slice(&position.value.to_bits().to_be_bytes());
        body.extend_from_slice(&position.skip.to_be_bytes());
        let mut mac = self.mac();
        mac.update(&body);
        body.extend_from_slice(&mac.finalize().into_bytes());
        hex::encode(body)
    }

    /// The position of `token`, if this key signed it for these arguments
    /// within its lifetime (`now` in unix seconds).
    pub fn check(
        &self,
        token: &str,
        arguments: &[u8; HASH_LEN],
        now: i64,
    ) -> Result<Position, TokenError> {
        let bytes = hex::decode(token).map_err(|_| TokenError::Malformed)?;
        if bytes.len() != BODY_LEN + MAC_LEN {
            return Err(TokenError::Malformed);
        }
        let (body, tag) = bytes.split_at(BODY_LEN);
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(tag).map_err(|_| TokenError::Tampered)?;
        if body[0] != VERSION {
            return Err(TokenError::Version(body[0]));
        }
        let word = |at: usize| -> [u8; 8] { body[at..at + 8].try_into().expect("8 bytes") };
        let issued = i64::from_be_bytes(word(1));
        if body[9..9 + HASH_LEN] != arguments[..] {
            return Err(TokenError::OtherArguments);
        }
        let age = now.saturating_sub(issued).max(0) as u64;
        if age > self.ttl.as_secs() {
            return Err(TokenError::Expired {
                age_secs: age,
                ttl_secs: self.ttl.as_secs(),
            });
        }
        let at = 9 + HASH_LEN;
        Ok(Position {
            sensor_pk: i64::from_be_bytes(word(at)),
            time: i64::from_be_bytes(word(at + 8)),
            value: f64::from_bits(u64::from_be_bytes(word(at + 16))),
            skip: u64::from_be_bytes(word(at + 24)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400;

    fn key() -> TokenKey {
        TokenKey::new(vec![7; 32], Duration::from_secs(3 * DAY as u64))
    }

    fn position() -> Position {
        Position {
            sensor_pk: 42,
            time: 1_700_000_000_000_000_000,
            value: -3.5,
            skip: 2,
        }
    }

    #[test]
    fn a_token_gives_back_its_position() {
        let args = arguments_hash("a");
        let token = key().issue(&args, position(), 1000);
        assert_eq!(key().check(&token, &args, 1000 + DAY), Ok(position()));
    }

    #[test]
    fn other_arguments_a_changed_byte_age_or_key_are_refused() {
        let args = arguments_hash("a");
        let token = key().issue(&args, position(), 1000);
        assert_eq!(
            key().check(&token, &arguments_hash("b"), 1000),
            Err(TokenError::OtherArguments)
        );
        assert!(matches!(
            key().check(&token, &args, 1000 + 3 * DAY + 1),
            Err(TokenError::Expired { .. })
        ));
        // Every byte of the token matters.
        let bytes = hex::decode(&token).unwrap();
        for i in 0..bytes.len() {
            let mut edited = bytes.clone();
            edited[i] ^= 1;
            assert_eq!(
                key().check(&hex::encode(edited), &args, 1000),
                Err(TokenError::Tampered),
                "byte {i}"
            );
        }
        let other = TokenKey::new(vec![8; 32], Duration::from_secs(60));
        assert_eq!(other.check(&token, &args, 1000), Err(TokenError::Tampered));
        assert_eq!(key().check("zz", &args, 1000), Err(TokenError::Malformed));
        assert_eq!(key().check("abcd", &args, 1000), Err(TokenError::Malformed));
    }
}
