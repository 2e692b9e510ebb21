//! Device identity and descriptive attributes.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use super::text::{InvalidText, Layout, check};

/// Why a device attribute was refused; the text is shown to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidDevice {
    #[error(
        "device id {0:?} is invalid: use 1 to 128 ASCII letters, digits, '_', '.', '-' or ':', starting with a letter or digit"
    )]
    Id(String),
    /// A display name or label value: too long, or not printable text.
    #[error(transparent)]
    Text(#[from] InvalidText),
    #[error(
        "label key {0:?} is invalid: use 1 to 63 lowercase letters, digits, '_', '.', '-' or '/', starting with a letter"
    )]
    LabelKey(String),
    #[error("too many labels: {0}, at most 32")]
    TooManyLabels(usize),
}

/// Whether `s` has the shape of an id (a device's, a feed consumer's): 1 to
/// `max` bytes of ASCII letters, digits, '_', '.', '-' and ':', starting
/// with a letter or digit. Safe in URLs, logs, metric labels and file names.
pub fn id_shaped(s: &str, max: usize) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b':'))
}

/// A device's public id, unique and never reused.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(String);

impl DeviceId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(s: &str) -> Result<Self, InvalidDevice> {
        if id_shaped(s, Self::MAX_LEN) {
            Ok(Self(s.to_owned()))
        } else {
            Err(InvalidDevice::Id(s.chars().take(160).collect()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Free text shown to people; defaults to the device id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub const MAX_CHARS: usize = 256;

    pub fn parse(s: &str, id: &DeviceId) -> Result<Self, InvalidDevice> {
        let trimmed = check(
            || "display_name".into(),
            s.trim(),
            Self::MAX_CHARS,
            Layout::SingleLine,
        )?;
        if trimmed.is_empty() {
            return Ok(Self(id.as_str().to_owned()));
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// For values read back from our own database, which were parsed on
    /// the way in.
    pub(crate) fn from_trusted(s: String) -> Self {
        Self(s)
    }
}

/// Key/value labels used to select devices (e.g. `site=plant-3`). Ordered, so
/// that their stored JSON is canonical.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Labels(BTreeMap<String, String>);

impl Labels {
    pub const MAX_LABELS: usize = 32;
    pub const MAX_KEY_LEN: usize = 63;
    pub const MAX_VALUE_CHARS: usize = 256;

    pub fn parse(raw: HashMap<String, String>) -> Result<Self, InvalidDevice> {
        if raw.len() > Self::MAX_LABELS {
            return Err(InvalidDevice::TooManyLabels(raw.len()));
        }
        let mut labels = BTreeMap::new();
        for (key, value) in raw {
            let kb = key.as_bytes();
            let key_ok = !kb.is_empty()
                && kb.len() <= Self::MAX_KEY_LEN
                && kb[0].is_ascii_lowercase()
                && kb.iter().all(|b| {
                    b.is_ascii_lowercase()
                        || b.is_ascii_digit()
                        || matches!(b, b'_' | b'.' | b'-' | b'/')
                });
            if !key_ok {
                return Err(InvalidDevice::LabelKey(key.chars().take(80).collect()));
            }
            check(
                || format!("the value of label {key:?}"),
                &value,
                Self::MAX_VALUE_CHARS,
                Layout::SingleLine,
            )?;
            labels.insert(key, value);
        }
        Ok(Self(labels))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("a map of strings always serialises")
    }

    /// Reads labels back from the database. Our own writes are canonical, so
    /// a parse failure means someone edited the row by hand: keep serving
    /// the device and let the caller log it.
    pub(crate) fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s).map(Self)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn device_ids() {
        for ok in ["a", "sim-00001", "Plant3.line-2:pump_7", &"x".repeat(128)] {
            assert!(DeviceId::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", ".a", "a b", "ä", "a/b", &"x".repeat(129)] {
            assert!(DeviceId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn display_name_defaults_to_id() {
        let id = DeviceId::parse("d1").unwrap();
        assert_eq!(DisplayName::parse("  ", &id).unwrap().as_str(), "d1");
        assert_eq!(DisplayName::parse(" Pump ", &id).unwrap().as_str(), "Pump");
        assert!(DisplayName::parse(&"é".repeat(257), &id).is_err());
        assert!(DisplayName::parse(&"é".repeat(256), &id).is_ok());
        for bad in ["a\0b", "\x1b[31mred", "two\nlines"] {
            let err = DisplayName::parse(bad, &id).unwrap_err();
            assert!(
                err.to_string().starts_with("display_name contains"),
                "{err}"
            );
        }
    }

    #[test]
    fn labels() {
        let ok = HashMap::from([("site".to_owned(), "plant-3".to_owned())]);
        let labels = Labels::parse(ok).unwrap();
        assert_eq!(labels.to_json(), r#"{"site":"plant-3"}"#);
        assert_eq!(Labels::from_json(&labels.to_json()).unwrap(), labels);
        for bad in ["", "Site", "1site", "si te"] {
            let raw = HashMap::from([(bad.to_owned(), "v".to_owned())]);
            assert!(Labels::parse(raw).is_err(), "{bad}");
        }
        let nul = HashMap::from([("site".to_owned(), "a\0".to_owned())]);
        let err = Labels::parse(nul).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("the value of label \"site\" contains NUL"),
            "{err}"
        );
        let long = HashMap::from([("site".to_owned(), "x".repeat(257))]);
        assert!(Labels::parse(long).is_err());
        let many = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(Labels::parse(many), Err(InvalidDevice::TooManyLabels(33)));
    }

    proptest! {
        #[test]
        fn parsed_device_ids_round_trip(s in "\\PC{0,140}") {
            if let Ok(id) = DeviceId::parse(&s) {
                prop_assert_eq!(id.as_str(), s.as_str());
                prop_assert!(id.as_str().len() <= DeviceId::MAX_LEN);
                prop_assert!(id.as_str().is_ascii());
            }
        }

        #[test]
        fn valid_shaped_ids_parse(s in "[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}") {
            prop_assert!(DeviceId::parse(&s).is_ok());
        }
    }
}
