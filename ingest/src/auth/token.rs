//! Secret tokens and their stored form.

use std::fmt;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// A secret bearer token. `Debug` hides it so that it cannot reach a log by
/// accident; only [`Token::expose`] reveals it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A new random token: `prefix` + 64 hex digits (256 bits).
    pub fn generate(prefix: &str) -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        Self(format!("{prefix}{}", hex::encode(bytes)))
    }

    pub fn new(secret: String) -> Self {
        Self(secret)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> TokenHash {
        TokenHash::of(&self.0)
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// SHA-256 of a token: what the database stores and lookups use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    pub fn of(secret: &str) -> Self {
        Self(Sha256::digest(secret.as_bytes()).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Compares without an early exit, so the time taken does not tell an
    /// attacker how much of a guess was right.
    pub fn constant_time_eq(&self, other: &Self) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_redacted() {
        let a = Token::generate("dev_");
        let b = Token::generate("dev_");
        assert_ne!(a, b);
        assert_eq!(a.expose().len(), 4 + 64);
        assert!(!format!("{a:?}").contains(&a.expose()[4..]));
        assert!(a.hash().constant_time_eq(&TokenHash::of(a.expose())));
        assert!(!a.hash().constant_time_eq(&b.hash()));
    }
}
