//! Cursors of the readings feed: where a reader stands, as an opaque string
//! (AIP-158: URL-safe, versioned, and signed, so
//! that it cannot be edited).
//!
//! A cursor names a feed position and how far into that position's batch
//! the reader got, and carries an HMAC-SHA256 under a key the server
//! processes share through the database. A cursor is not tied to a
//! selection, as a Kafka offset is not: any reader of the feed may start
//! from it. It does not expire by age; retention decides (a cursor whose
//! next batch was removed is refused with the earliest valid cursor).

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const VERSION: u8 = 1;
/// version, position, next index.
const BODY_LEN: usize = 1 + 8 + 4;
/// A truncated MAC: 128 bits is far beyond guessing.
const MAC_LEN: usize = 16;

/// `next_index` of a cursor past the whole batch at its position.
pub const WHOLE_BATCH: u32 = u32::MAX;

/// Everything before `position`, and the readings of the batch at
/// `position` whose index in the batch is below `next_index`, were
/// considered by the reader (delivered, or not in its selection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cursor {
    pub position: u64,
    pub next_index: u32,
}

impl Cursor {
    /// After the whole batch at `position` (0: before the first batch).
    pub fn after(position: u64) -> Self {
        Self {
            position,
            next_index: WHOLE_BATCH,
        }
    }

    /// The first position a reader at this cursor still has to read.
    pub fn first_unread(&self) -> u64 {
        if self.next_index == WHOLE_BATCH {
            self.position + 1
        } else {
            self.position
        }
    }

    /// Whether the reading `index` of the batch at `position` is still to
    /// be read.
    pub fn is_unread(&self, position: u64, index: u32) -> bool {
        position > self.position || (position == self.position && index >= self.next_index)
    }
}

/// Why a cursor is refused: INVALID_ARGUMENT.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum CursorError {
    #[error("cursor is not a cursor of the readings feed")]
    Malformed,
    #[error(
        "cursor was not issued by this feed: it comes from another database, or it was altered"
    )]
    Foreign,
    #[error("cursor is of an unknown version {0}")]
    Version(u8),
}

/// Issues and checks cursors with one key.
#[derive(Clone)]
pub struct CursorKey {
    key: Vec<u8>,
}

impl std::fmt::Debug for CursorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CursorKey")
    }
}

impl CursorKey {
    pub fn new(key: Vec<u8>) -> Self {
        Self { key }
    }

    fn mac(&self, body: &[u8]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes keys of any length");
        mac.update(body);
        mac
    }

    pub fn issue(&self, cursor: Cursor) -> String {
        let mut bytes = Vec::with_capacity(BODY_LEN + MAC_LEN);
        bytes.push(VERSION);
        bytes.extend_from_slice(&cursor.position.to_be_bytes());
        bytes.extend_from_slice(&cursor.next_index.to_be_bytes());
        let tag = self.mac(&bytes).finalize().into_bytes();
        bytes.extend_from_slice(&tag[..MAC_LEN]);
        hex::encode(bytes)
    }

    pub fn check(&self, text: &str) -> Result<Cursor, CursorError> {
        let bytes = hex::decode(text.trim()).map_err(|_| CursorError::Malformed)?;
        if bytes.len() != BODY_LEN + MAC_LEN {
            return Err(CursorError::Malformed);
        }
        let (body, tag) = bytes.split_at(BODY_LEN);
        if body[0] != VERSION {
            return Err(CursorError::Version(body[0]));
        }
        self.mac(body)
            .verify_truncated_left(tag)
            .map_err(|_| CursorError::Foreign)?;
        Ok(Cursor {
            position: u64::from_be_bytes(body[1..9].try_into().expect("8 bytes")),
            next_index: u32::from_be_bytes(body[9..13].try_into().expect("4 bytes")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_cursor_reads_back_as_issued(position: u64, next_index: u32) {
            let key = CursorKey::new(b"k".to_vec());
            let cursor = Cursor { position, next_index };
            prop_assert_eq!(key.check(&key.issue(cursor)), Ok(cursor));
        }

        #[test]
        fn any_changed_character_is_refused(position: u64, next_index: u32, at: usize, with: u8) {
            let key = CursorKey::new(b"k".to_vec());
            let text = key.issue(Cursor { position, next_index });
            let at = at % text.len();
            let alphabet = b"0123456789abcdef";
            let replacement = alphabet[with as usize % alphabet.len()] as char;
            prop_assume!(text.as_bytes()[at] as char != replacement);
            let mut changed = text.clone();
            changed.replace_range(at..=at, &replacement.to_string());
            prop_assert!(key.check(&changed).is_err());
        }
    }

    #[test]
    fn another_key_or_garbage_is_refused() {
        let ours = CursorKey::new(b"ours".to_vec());
        let theirs = CursorKey::new(b"theirs".to_vec());
        let text = theirs.issue(Cursor::after(7));
        assert_eq!(ours.check(&text), Err(CursorError::Foreign));
        assert_eq!(ours.check("not a cursor"), Err(CursorError::Malformed));
        assert_eq!(ours.check(""), Err(CursorError::Malformed));
    }

    #[test]
    fn unread_means_after_the_cursor() {
        let c = Cursor {
            position: 5,
            next_index: 3,
        };
        assert!(!c.is_unread(4, 100));
        assert!(!c.is_unread(5, 2));
        assert!(c.is_unread(5, 3));
        assert!(c.is_unread(6, 0));
        assert_eq!(c.first_unread(), 5);
        assert_eq!(Cursor::after(5).first_unread(), 6);
        assert!(!Cursor::after(5).is_unread(5, u32::MAX - 1));
    }
}
