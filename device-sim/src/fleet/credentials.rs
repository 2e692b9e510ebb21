//! The credentials file: device id -> device token. The server shows a
//! token only once, at registration, so this file is the only copy; it is
//! written atomically and readable by the owner alone.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Device tokens by device id, ordered so the file diffs cleanly.
pub type Credentials = BTreeMap<String, String>;

/// Loads the file; a missing file is an empty map (first run).
pub fn load(path: &Path) -> anyhow::Result<Credentials> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Credentials::new()),
        Err(e) => {
            return Err(e).with_context(|| format!("reading credentials file {}", path.display()));
        }
    };
    // Refuse to guess on a damaged file: overwriting it would lose every
    // token in it for good.
    serde_json::from_str(&text).with_context(|| {
        format!(
            "credentials file {} is not a JSON object of device id -> token; fix or delete it",
            path.display()
        )
    })
}

/// Writes the file with mode 0600: first to a sibling temporary file, then
/// renamed over the old one, so a crash never leaves a half-written file.
pub fn save(path: &Path, credentials: &Credentials) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("creating directory {}", dir.display()))?;
    }
    let tmp = temporary_path(path);
    // The mode applies only when the file is created, so never reuse a
    // leftover temporary file whose permissions we did not choose.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", tmp.display())),
    }
    let mut json = serde_json::to_vec_pretty(credentials).context("encoding credentials")?;
    json.push(b'\n');

    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(&json)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    drop(file);
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn round_trip_with_private_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nested").join("creds.json");
        assert!(load(&path).expect("missing file is fine").is_empty());

        let mut creds = Credentials::new();
        creds.insert("sim-00001".into(), "token-a".into());
        creds.insert("sim-00002".into(), "token-b".into());
        save(&path, &creds).expect("save");
        assert_eq!(load(&path).expect("load"), creds);

        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);

        // Overwriting keeps the mode and leaves no temporary file behind.
        creds.insert("sim-00003".into(), "token-c".into());
        save(&path, &creds).expect("save again");
        assert_eq!(load(&path).expect("load").len(), 3);
        assert!(!temporary_path(&path).exists());
    }

    #[test]
    fn damaged_file_is_an_error_not_an_empty_map() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("creds.json");
        fs::write(&path, "{not json").expect("write");
        assert!(load(&path).is_err());
    }
}
