//! Where an operator's token comes from, the same for the server, the
//! `ingest` CLI and device-sim: an `--ops-token-file` given on the command
//! line, then `INGEST_OPS_TOKEN` (the token itself: never a flag, since a
//! command line is visible to every user of the machine), then
//! `INGEST_OPS_TOKEN_FILE`, then `<data-dir>/ops.token`. An empty variable
//! counts as unset.
//!
//! A token file holds one token per line (`NAME TOKEN`, or a bare `TOKEN`;
//! `#` comments), or is a directory of one token per file (named after
//! the file), so that one token can be replaced while another is in use.
//! The server accepts them all; a client presents the first.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The tokens' source, in order of precedence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpsTokenSource {
    /// Given directly (`INGEST_OPS_TOKEN`).
    Value(String),
    /// A file or a directory (`--ops-token-file`, `INGEST_OPS_TOKEN_FILE`).
    File(PathBuf),
    /// `ops.token` in this data directory, which the server writes at its
    /// first start.
    DataDir(PathBuf),
}

impl OpsTokenSource {
    /// The source by the precedence above, from the flag and the
    /// environment.
    pub fn choose(flag: Option<PathBuf>, data_dir: &Path) -> Self {
        Self::choose_from(flag, data_dir, |name: &str| std::env::var(name).ok())
    }

    /// [`OpsTokenSource::choose`] with the environment given, for tests.
    pub fn choose_from(
        flag: Option<PathBuf>,
        data_dir: &Path,
        var: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        if let Some(path) = flag {
            Self::File(path)
        } else if let Some(token) = var("INGEST_OPS_TOKEN") {
            Self::Value(token.trim().to_owned())
        } else if let Some(path) = var("INGEST_OPS_TOKEN_FILE") {
            Self::File(path.into())
        } else {
            Self::DataDir(data_dir.to_owned())
        }
    }
}

/// The token a client presents, the first of its source's, and where it
/// came from (for messages: a refused token should say which file or
/// variable to fix).
pub fn client_token(source: &OpsTokenSource) -> anyhow::Result<(String, String)> {
    let (tokens, origin) = match source {
        OpsTokenSource::Value(token) => {
            let token = non_empty(token.trim(), "INGEST_OPS_TOKEN")?;
            return Ok((token.to_owned(), "INGEST_OPS_TOKEN".to_owned()));
        }
        OpsTokenSource::File(path) => (read_tokens(path)?, path.display().to_string()),
        OpsTokenSource::DataDir(dir) => {
            let path = dir.join("ops.token");
            anyhow::ensure!(
                path.exists(),
                "no ops token: {} does not exist (the server writes it at its first start, in its --data-dir); \
                 give the token with --ops-token-file FILE or INGEST_OPS_TOKEN, or the server's data directory with --data-dir",
                path.display()
            );
            (read_tokens(&path)?, path.display().to_string())
        }
    };
    let (name, token) = tokens.into_iter().next().expect("a source holds a token");
    let file_name = Path::new(&origin).file_name().and_then(|f| f.to_str());
    let origin = if file_name == Some(name.as_str()) {
        origin
    } else {
        format!("{origin} ({name})")
    };
    Ok((token, origin))
}

/// Every token of a file or a directory, with its name, in order: a
/// directory's by file name, a file's by line.
pub fn read_tokens(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    if path.is_dir() {
        let mut tokens = Vec::new();
        let entries = std::fs::read_dir(path)
            .with_context(|| format!("reading the ops token directory {}", path.display()))?;
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // Kubernetes mounts secrets through hidden `..data` links.
            if name.starts_with('.') || !entry.path().is_file() {
                continue;
            }
            tokens.push((name, read_one(&entry.path())?));
        }
        anyhow::ensure!(
            !tokens.is_empty(),
            "the ops token directory {} holds no token",
            path.display()
        );
        tokens.sort();
        return Ok(tokens);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the ops tokens from {}", path.display()))?;
    let file = path
        .file_name()
        .map_or_else(|| "ops-token".into(), |f| f.to_string_lossy().into_owned());
    let lines: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .map(|(n, l)| (n + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .collect();
    anyhow::ensure!(
        !lines.is_empty(),
        "the ops token file {} holds no token",
        path.display()
    );
    lines
        .iter()
        .map(|&(n, line)| {
            let mut words = line.split_whitespace();
            match (words.next(), words.next(), words.next()) {
                (Some(token), None, _) if lines.len() == 1 => Ok((file.clone(), token.to_owned())),
                (Some(token), None, _) => Ok((format!("{file}:{n}"), token.to_owned())),
                (Some(name), Some(token), None) => Ok((name.to_owned(), token.to_owned())),
                _ => anyhow::bail!(
                    "{}:{n}: expected `NAME TOKEN` or a bare `TOKEN`",
                    path.display()
                ),
            }
        })
        .collect()
}

/// A file of one bare token (a directory's entry, the generated file).
pub fn read_one(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the ops token from {}", path.display()))?;
    Ok(non_empty(text.trim(), &path.display().to_string())?.to_owned())
}

fn non_empty<'t>(token: &'t str, from: &str) -> anyhow::Result<&'t str> {
    anyhow::ensure!(!token.is_empty(), "the ops token from {from} is empty");
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_then_the_token_then_the_file_variable_then_the_data_dir() {
        let dir = Path::new("/data");
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        let both = env(&[("INGEST_OPS_TOKEN", "t"), ("INGEST_OPS_TOKEN_FILE", "/f")]);
        assert_eq!(
            OpsTokenSource::choose_from(Some("/flag".into()), dir, both),
            OpsTokenSource::File("/flag".into())
        );
        assert_eq!(
            OpsTokenSource::choose_from(None, dir, both),
            OpsTokenSource::Value("t".into())
        );
        let empty_token = env(&[("INGEST_OPS_TOKEN", " "), ("INGEST_OPS_TOKEN_FILE", "/f")]);
        assert_eq!(
            OpsTokenSource::choose_from(None, dir, empty_token),
            OpsTokenSource::File("/f".into())
        );
        assert_eq!(
            OpsTokenSource::choose_from(None, dir, env(&[])),
            OpsTokenSource::DataDir(dir.into())
        );
    }

    #[test]
    fn the_client_takes_the_first_token_and_says_where_from() {
        let dir = std::env::temp_dir().join(format!("ops-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens");
        std::fs::write(&file, "# operators\nalice ops_a\nci ops_c\n").unwrap();
        let (token, origin) = client_token(&OpsTokenSource::File(file.clone())).unwrap();
        assert_eq!(token, "ops_a");
        assert_eq!(origin, format!("{} (alice)", file.display()));

        std::fs::write(&file, "ops_bare\n").unwrap();
        let (token, origin) = client_token(&OpsTokenSource::File(file.clone())).unwrap();
        assert_eq!(token, "ops_bare");
        assert_eq!(origin, file.display().to_string());

        std::fs::write(&file, "too many words\n").unwrap();
        let error = client_token(&OpsTokenSource::File(file.clone())).unwrap_err();
        assert!(
            error.to_string().contains("expected `NAME TOKEN`"),
            "{error}"
        );

        // Never generated by a client: the server's data directory is named.
        let empty = dir.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let error = client_token(&OpsTokenSource::DataDir(empty.clone()))
            .unwrap_err()
            .to_string();
        assert!(error.contains("ops.token does not exist"), "{error}");
        assert!(error.contains("--data-dir"), "{error}");
        assert!(!empty.join("ops.token").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
