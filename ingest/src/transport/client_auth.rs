//! `--tls-client-auth`, shared by the settings and their errors.

/// `--tls-client-auth`: whether a client must present a certificate signed
/// by `--tls-client-ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuth {
    /// No client certificate is asked for.
    None,
    /// A client may present one; if it does, it must verify.
    Optional,
    /// Every client must present one that verifies.
    Require,
}

impl std::fmt::Display for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Optional => "optional",
            Self::Require => "require",
        })
    }
}
