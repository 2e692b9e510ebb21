//! Where the operators' token comes from.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::domain::Token;

/// The ops token's source, in order of precedence.
#[derive(Debug, Clone)]
pub enum OpsTokenSource {
    /// Given directly (`INGEST_OPS_TOKEN`).
    Value(Token),
    /// Read from a file (`--ops-token-file`).
    File(PathBuf),
    /// `ops.token` in the data directory, generated at first start.
    Generated { data_dir: PathBuf },
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

fn read(path: &Path) -> anyhow::Result<Token> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the ops token from {}", path.display()))?;
    non_empty(
        Token::new(text.trim().to_owned()),
        &path.display().to_string(),
    )
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
    fn refuses_an_empty_token() {
        assert!(resolve_ops_token(&OpsTokenSource::Value(Token::new(String::new()))).is_err());
    }
}
