//! Free text from clients (display names, label values, firmware versions,
//! acknowledgement details): what either database can hold and what an
//! operator's terminal can print without being rewritten.
//!
//! PostgreSQL refuses U+0000 in `text`, SQLite stores it; control
//! characters and escape sequences would reach an operator's terminal
//! through the CLI. Checking here, once, makes both backends refuse the same
//! values with the same message, before anything is written.

use std::fmt;

/// Which layout characters a field may hold besides printable text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Tab only: names and versions, printed in table cells.
    SingleLine,
    /// Tab and line feed: details that may run over several lines. Carriage
    /// return is still refused: it moves the cursor over what was printed.
    MultiLine,
}

/// Why a free-text field was refused; names the field, so the message can
/// go to the client as it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidText {
    #[error("{field} is too long: {chars} characters, at most {max}")]
    TooLong {
        field: String,
        chars: usize,
        max: usize,
    },
    #[error(
        "{field} contains {found} at character {at}; only printable text is accepted (no NUL, control characters or escape sequences{layout})"
    )]
    Control {
        field: String,
        found: ControlChar,
        at: usize,
        layout: &'static str,
    },
}

/// A refused character, shown by its code point: printing it would do what
/// the check prevents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlChar(pub char);

impl fmt::Display for ControlChar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = self.0 as u32;
        match code {
            0 => write!(f, "NUL (U+0000)"),
            0x1B => write!(f, "ESC (U+001B, starts a terminal escape sequence)"),
            0x9B => write!(f, "CSI (U+009B, starts a terminal escape sequence)"),
            _ => write!(f, "control character U+{code:04X}"),
        }
    }
}

/// C0 controls, DEL and C1 controls (which include the 8-bit CSI).
fn is_control(c: char) -> bool {
    matches!(c as u32, 0x00..=0x1F | 0x7F..=0x9F)
}

/// Checks `s` for `field`: at most `max_chars` characters, no control
/// characters but the layout's. Returns it unchanged when it is fine.
pub fn check(
    field: impl FnOnce() -> String,
    s: &str,
    max_chars: usize,
    layout: Layout,
) -> Result<&str, InvalidText> {
    // Bytes bound characters from above: a short string needs no count.
    if s.len() > max_chars {
        let chars = s.chars().count();
        if chars > max_chars {
            return Err(InvalidText::TooLong {
                field: field(),
                chars,
                max: max_chars,
            });
        }
    }
    let allowed = |c: char| match layout {
        Layout::SingleLine => c == '\t',
        Layout::MultiLine => c == '\t' || c == '\n',
    };
    if let Some((at, c)) = s
        .chars()
        .enumerate()
        .find(|&(_, c)| is_control(c) && !allowed(c))
    {
        return Err(InvalidText::Control {
            field: field(),
            found: ControlChar(c),
            at,
            layout: match layout {
                Layout::SingleLine => "; tab is allowed",
                Layout::MultiLine => "; tab and line feed are allowed",
            },
        });
    }
    Ok(s)
}

/// Text from a device or operator that passed [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Text(String);

impl Text {
    pub fn parse(
        field: impl FnOnce() -> String,
        s: &str,
        max_chars: usize,
        layout: Layout,
    ) -> Result<Self, InvalidText> {
        check(field, s, max_chars, layout).map(|s| Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> String {
        "display_name".into()
    }

    #[test]
    fn refuses_nul_controls_and_escapes() {
        for (bad, found) in [
            ("a\0b", '\0'),
            ("\x1b[2J", '\x1b'),
            ("x\u{9b}31m", '\u{9b}'),
            ("a\rb", '\r'),
            ("a\nb", '\n'),
            ("del\x7f", '\x7f'),
            ("bell\x07", '\x07'),
        ] {
            let err = check(name, bad, 100, Layout::SingleLine).unwrap_err();
            assert!(
                matches!(err, InvalidText::Control { found: ControlChar(c), .. } if c == found),
                "{bad:?}: {err}"
            );
            assert!(
                err.to_string().starts_with("display_name contains"),
                "{err}"
            );
        }
        let err = check(name, "ok\0", 100, Layout::SingleLine).unwrap_err();
        assert_eq!(
            err.to_string(),
            "display_name contains NUL (U+0000) at character 2; only printable text is accepted (no NUL, control characters or escape sequences; tab is allowed)"
        );
    }

    #[test]
    fn accepts_printable_text_tab_and_multiline_newlines() {
        for ok in ["Pump 7", "tab\there", "Ünïcødé ✓ 温度", ""] {
            assert_eq!(check(name, ok, 100, Layout::SingleLine), Ok(ok));
        }
        assert!(check(name, "line 1\nline 2", 100, Layout::MultiLine).is_ok());
        assert!(check(name, "line 1\r\nline 2", 100, Layout::MultiLine).is_err());
    }

    #[test]
    fn counts_characters_not_bytes() {
        assert!(check(name, &"é".repeat(10), 10, Layout::SingleLine).is_ok());
        assert_eq!(
            check(name, &"é".repeat(11), 10, Layout::SingleLine),
            Err(InvalidText::TooLong {
                field: name(),
                chars: 11,
                max: 10
            })
        );
    }

    proptest! {
        #[test]
        fn accepted_text_has_no_controls_and_fits(s in "\\PC{0,40}|[\\x00-\\x{a0}]{0,40}") {
            if let Ok(t) = Text::parse(name, &s, 30, Layout::SingleLine) {
                prop_assert!(t.as_str().chars().count() <= 30);
                prop_assert!(t.as_str().chars().all(|c| c == '\t' || !is_control(c)));
                prop_assert!(!t.as_str().contains('\0'));
            }
        }
    }
}
