//! The name of a readings-feed consumer (`CommitReadingsCursor`), as a
//! Kafka consumer group is named: chosen by the downstream job, shown in
//! metrics as a label, so its characters are few and its length bounded.

use std::fmt;

/// 1 to 64 characters: ASCII letters, digits, '_', '.', '-' and ':',
/// starting with a letter or digit.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConsumerName(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "consumer {0:?} is not a consumer name: 1 to 64 characters of ASCII letters, digits, '_', '.', '-' and ':', starting with a letter or digit"
)]
pub struct InvalidConsumerName(pub String);

impl ConsumerName {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, InvalidConsumerName> {
        if super::device::id_shaped(s, Self::MAX_LEN) {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidConsumerName(s.chars().take(80).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConsumerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn valid_shaped_names_parse(s in "[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}") {
            let name = ConsumerName::parse(&s).unwrap();
            prop_assert_eq!(name.as_str(), s.as_str());
        }

        #[test]
        fn anything_with_another_character_is_refused(
            head in "[a-z]{0,10}",
            bad in "[^A-Za-z0-9_.:-]",
            tail in "[a-z]{0,10}",
        ) {
            let name = format!("{head}{bad}{tail}");
            prop_assert!(ConsumerName::parse(&name).is_err());
        }
    }

    #[test]
    fn edges() {
        assert!(ConsumerName::parse("").is_err());
        assert!(ConsumerName::parse("-lake").is_err());
        assert!(ConsumerName::parse(&"a".repeat(64)).is_ok());
        assert!(ConsumerName::parse(&"a".repeat(65)).is_err());
        assert!(ConsumerName::parse("lake-loader:prod.v2").is_ok());
    }
}
