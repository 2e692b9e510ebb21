//! Where the operators' tokens come from, and checking them.
//!
//! Operators may hold several named tokens, so one can be replaced while
//! another is in use: `--ops-token-file` names a file with one token per
//! line (`NAME TOKEN`, or a bare `TOKEN`), or a directory with one token per
//! file (named after the file). SIGHUP reads them again.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::Context;

use telemetry_client::ops_token as client;

use crate::domain::{Token, TokenHash};

/// The ops token's source, in order of precedence.
#[derive(Debug, Clone)]
pub enum OpsTokenSource {
    /// Given directly (`INGEST_OPS_TOKEN`).
    Value(Token),
    /// Read from a file or a directory (`--ops-token-file`).
    File(PathBuf),
    /// `ops.token` in the data directory, generated at first start.
    Generated { data_dir: PathBuf },
}

impl OpsTokenSource {
    /// Where the tokens come from, as every client reads them (see
    /// `telemetry_client::ops_token`); `<data-dir>/ops.token` is generated
    /// at first start.
    pub fn choose(flag: Option<PathBuf>, data_dir: &Path) -> Self {
        match client::OpsTokenSource::choose(flag, data_dir) {
            client::OpsTokenSource::Value(token) => Self::Value(Token::new(token)),
            client::OpsTokenSource::File(path) => Self::File(path),
            client::OpsTokenSource::DataDir(data_dir) => Self::Generated { data_dir },
        }
    }
}

/// Resolves the ops token, generating and saving one if needed.
pub fn resolve_ops_token(source: &OpsTokenSource) -> anyhow::Result<Token> {
    match source {
        OpsTokenSource::Value(token) => non_empty(token.clone(), "INGEST_OPS_TOKEN"),
        OpsTokenSource::File(path) => read(path),
        OpsTokenSource::Generated { data_dir } => {
            let path = data_dir.join("ops.token");
            if path.exists() {
                return read(&path);
            }
            let token = Token::generate("ops_");
            write_private(&path, token.expose())?;
            tracing::info!(path = %path.display(), "generated the ops token; operators read it from this file");
            Ok(token)
        }
    }
}

/// One accepted ops token: its name (for the logs) and hash.
#[derive(Debug, Clone)]
struct NamedToken {
    name: Arc<str>,
    hash: TokenHash,
}

/// The ops tokens in force, replaced whole by [`OpsTokens::reload`].
#[derive(Debug)]
pub struct OpsTokens {
    source: OpsTokenSource,
    tokens: RwLock<Vec<NamedToken>>,
}

impl OpsTokens {
    /// Reads the tokens (generating the data directory's one if needed).
    pub fn load(source: OpsTokenSource) -> anyhow::Result<Self> {
        let tokens = read_all(&source)?;
        Ok(Self {
            source,
            tokens: RwLock::new(tokens),
        })
    }

    /// Reads the tokens again. On an error the old ones stay in force.
    pub fn reload(&self) -> anyhow::Result<usize> {
        let tokens = read_all(&self.source)?;
        let count = tokens.len();
        *self.tokens.write().expect("lock poisoned") = tokens;
        Ok(count)
    }

    /// The name of the token with this hash. Every token is compared in
    /// full, so the time taken tells nothing about which one nearly matched.
    pub fn check(&self, hash: &TokenHash) -> Option<Arc<str>> {
        let tokens = self.tokens.read().expect("lock poisoned");
        let mut found = None;
        for token in tokens.iter() {
            if token.hash.constant_time_eq(hash) {
                found = Some(token.name.clone());
            }
        }
        found
    }
}

/// Every token of `source` with its name, in the order given.
fn read_named(source: &OpsTokenSource) -> anyhow::Result<Vec<(Arc<str>, Token)>> {
    let named = |name: &str, token: Token| (Arc::<str>::from(name), token);
    match source {
        OpsTokenSource::Value(token) => Ok(vec![named(
            "INGEST_OPS_TOKEN",
            non_empty(token.clone(), "INGEST_OPS_TOKEN")?,
        )]),
        OpsTokenSource::Generated { .. } => {
            Ok(vec![named("ops.token", resolve_ops_token(source)?)])
        }
        OpsTokenSource::File(path) => Ok(client::read_tokens(path)?
            .into_iter()
            .map(|(name, token)| named(&name, Token::new(token)))
            .collect()),
    }
}

fn read_all(source: &OpsTokenSource) -> anyhow::Result<Vec<NamedToken>> {
    Ok(read_named(source)?
        .into_iter()
        .map(|(name, token)| NamedToken {
            name,
            hash: token.hash(),
        })
        .collect())
}

fn read(path: &Path) -> anyhow::Result<Token> {
    Ok(Token::new(client::read_one(path)?))
}

fn non_empty(token: Token, from: &str) -> anyhow::Result<Token> {
    anyhow::ensure!(
        !token.expose().is_empty(),
        "the ops token from {from} is empty"
    );
    Ok(token)
}

/// Creates the file readable and writable by its owner only, from the first
/// byte: the token is never briefly world-readable.
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(file, "{contents}").with_context(|| format!("writing {}", path.display()))?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generates_once_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let source = OpsTokenSource::Generated {
            data_dir: dir.path().to_owned(),
        };
        let first = resolve_ops_token(&source).unwrap();
        let second = resolve_ops_token(&source).unwrap();
        assert_eq!(first, second);
        let mode = std::fs::metadata(dir.path().join("ops.token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn several_named_tokens_from_a_file_or_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(&file, "# operators\nalice ops_a\n\nci ops_c\n").unwrap();
        let tokens = OpsTokens::load(OpsTokenSource::File(file.clone())).unwrap();
        assert_eq!(
            tokens.check(&TokenHash::of("ops_a")).as_deref(),
            Some("alice")
        );
        assert_eq!(tokens.check(&TokenHash::of("ops_c")).as_deref(), Some("ci"));
        assert_eq!(tokens.check(&TokenHash::of("ops_b")), None);

        // A rotation: the new file replaces the old tokens; a bad one does not.
        std::fs::write(&file, "bob ops_b\n").unwrap();
        assert_eq!(tokens.reload().unwrap(), 1);
        assert_eq!(tokens.check(&TokenHash::of("ops_a")), None);
        std::fs::write(&file, "too many words here\n").unwrap();
        assert!(tokens.reload().is_err());
        assert_eq!(
            tokens.check(&TokenHash::of("ops_b")).as_deref(),
            Some("bob")
        );

        let tokens_dir = dir.path().join("ops.d");
        std::fs::create_dir(&tokens_dir).unwrap();
        std::fs::write(tokens_dir.join("grafana"), "ops_g\n").unwrap();
        std::fs::write(tokens_dir.join(".hidden"), "ops_h\n").unwrap();
        let tokens = OpsTokens::load(OpsTokenSource::File(tokens_dir)).unwrap();
        assert_eq!(
            tokens.check(&TokenHash::of("ops_g")).as_deref(),
            Some("grafana")
        );
        assert_eq!(tokens.check(&TokenHash::of("ops_h")), None);
    }

    #[test]
    fn refuses_an_empty_token() {
        assert!(resolve_ops_token(&OpsTokenSource::Value(Token::new(String::new()))).is_err());
    }
}
