//! Device credentials as stored: bearer tokens (several per device, for
//! rotation with an overlap), the certificate bound to a device, and
//! whether the device is enabled. Written once for both backends (see
//! `sql.rs`).
//!
//! Every change returns the device it touched, so the caller can invalidate
//! what the server remembers of it in the same step (see `auth::Credentials`).

use crate::domain::credential::{CertFingerprint, DeviceKey};
use crate::domain::time::UnixNanos;
use crate::domain::{DeviceId, TokenHash};

use super::devices::INSERT_TOKEN;
use super::sql::{Conn, Row};
use super::{Clash, StorageError, Store};

/// What a token proves, and the state of its device, as of the lookup.
#[derive(Debug, Clone)]
pub struct TokenGrant {
    pub device: DeviceKey,
    pub token_pk: i64,
    pub expires: Option<UnixNanos>,
    pub revoked: bool,
    pub last_used: Option<UnixNanos>,
    pub state: DeviceAuthState,
}

/// A device bound to a certificate, and its state.
#[derive(Debug, Clone)]
pub struct CertificateGrant {
    pub device: DeviceKey,
    pub state: DeviceAuthState,
}

/// What decides whether a device may connect, whatever the credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAuthState {
    pub require_mtls: bool,
    pub disabled: bool,
    pub certificate: Option<CertFingerprint>,
}

/// One token as operators see it: never its secret, nor its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// The credential id (`device_tokens.pk`).
    pub id: i64,
    pub created: UnixNanos,
    pub last_used: Option<UnixNanos>,
    pub expires: Option<UnixNanos>,
    pub revoked: Option<UnixNanos>,
}

impl TokenRecord {
    pub fn active_at(&self, now: UnixNanos) -> bool {
        self.revoked.is_none() && self.expires.is_none_or(|e| e > now)
    }
}

/// Everything a device can authenticate with.
#[derive(Debug, Clone)]
pub struct DeviceCredentials {
    pub device: DeviceKey,
    pub tokens: Vec<TokenRecord>,
    pub certificate: Option<BoundCertificate>,
    pub require_mtls: bool,
    pub disabled: Option<UnixNanos>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundCertificate {
    pub fingerprint: CertFingerprint,
    pub bound: UnixNanos,
}

/// A new token, and the expiry the rotation gave the device's other tokens.
#[derive(Debug, Clone)]
pub struct RotatedToken {
    pub device: DeviceKey,
    pub token: TokenRecord,
    /// (credential id, expiry) of each older token still active now.
    pub others: Vec<(i64, UnixNanos)>,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("device {0} does not exist")]
    NoSuchDevice(String),
    #[error("device {device} has no token with credential id {id}")]
    NoSuchToken { device: String, id: i64 },
    #[error(
        "device {device} already holds {active} active tokens, the most a device may hold; revoke one first, or rotate with a zero overlap"
    )]
    TooManyTokens { device: String, active: usize },
    #[error(
        "token {id} of device {device} was already revoked at {}: nothing was revoked",
        crate::domain::time::rfc3339(*.at)
    )]
    AlreadyRevoked {
        device: String,
        id: i64,
        at: UnixNanos,
    },
    #[error("device {0} has no certificate bound: nothing was revoked")]
    NoCertificate(String),
    #[error("that certificate is already bound to {}", holder_text(.0.as_ref()))]
    CertificateInUse(Option<DeviceId>),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The device holding a certificate, as messages name it.
pub fn holder_text(holder: Option<&DeviceId>) -> String {
    holder.map_or_else(|| "another device".to_owned(), |id| format!("device {id}"))
}

impl From<sqlx::Error> for CredentialError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(e.into())
    }
}

const TOKEN_GRANT: &str = "SELECT t.pk, t.expires_unix_nano, t.revoked_unix_nano, t.last_used_unix_nano, \
     d.pk, d.device_id, d.require_mtls, d.disabled_unix_nano, d.cert_sha256 \
     FROM device_tokens t JOIN devices d ON d.pk = t.device_pk WHERE t.token_sha256 = $1";

const CERTIFICATE_GRANT: &str = "SELECT pk, device_id, require_mtls, disabled_unix_nano, cert_sha256 \
     FROM devices WHERE cert_sha256 = $1";

const DEVICE_TOKENS: &str = "SELECT pk, created_unix_nano, last_used_unix_nano, expires_unix_nano, revoked_unix_nano \
     FROM device_tokens WHERE device_pk = $1 ORDER BY pk";

/// The active tokens' expiry moves to the overlap's end, unless it is
/// sooner already.
const EXPIRE_OTHERS: &str = "UPDATE device_tokens SET expires_unix_nano = $1 \
     WHERE device_pk = $2 AND revoked_unix_nano IS NULL \
       AND (expires_unix_nano IS NULL OR expires_unix_nano > $3)";

fn fingerprint(bytes: Option<Vec<u8>>) -> Result<Option<CertFingerprint>, StorageError> {
    bytes
        .map(|b| {
            <[u8; 32]>::try_from(b.as_slice())
                .map(CertFingerprint::from_bytes)
                .map_err(|_| StorageError::Corrupt("cert_sha256 is not 32 bytes".into()))
        })
        .transpose()
}

/// A credential's row (`sql` looks it up by the hash in `$1`), with the
/// device and its state from the row's columns `first..first + 5`: pk,
/// device_id, require_mtls, disabled_unix_nano, cert_sha256.
async fn grant(
    store: &Store,
    sql: &str,
    hash: &[u8],
    first: usize,
) -> Result<Option<(Row, DeviceKey, DeviceAuthState)>, StorageError> {
    let Some(row) = store.query(sql).bind(hash).fetch_optional().await? else {
        return Ok(None);
    };
    let id: String = row.get(first + 1)?;
    let device = DeviceKey {
        pk: row.get(first)?,
        id: DeviceId::parse(&id).map_err(|e| StorageError::Corrupt(e.to_string()))?,
    };
    let state = DeviceAuthState {
        require_mtls: row.get(first + 2)?,
        disabled: row.get::<Option<i64>>(first + 3)?.is_some(),
        certificate: fingerprint(row.get(first + 4)?)?,
    };
    Ok(Some((row, device, state)))
}

/// A device's tokens, oldest first.
async fn device_tokens(
    mut conn: Conn<'_>,
    device_pk: i64,
) -> Result<Vec<TokenRecord>, sqlx::Error> {
    let rows = conn
        .query(DEVICE_TOKENS)
        .bind(device_pk)
        .fetch_all()
        .await?;
    rows.iter()
        .map(|r| {
            Ok(TokenRecord {
                id: r.get(0)?,
                created: r.get(1)?,
                last_used: r.get(2)?,
                expires: r.get(3)?,
                revoked: r.get(4)?,
            })
        })
        .collect()
}

/// The device an `UPDATE devices ... RETURNING pk` changed, if any.
fn changed_device(id: &DeviceId, pk: Option<i64>) -> Result<DeviceKey, CredentialError> {
    pk.map(|pk| DeviceKey { pk, id: id.clone() })
        .ok_or_else(|| CredentialError::NoSuchDevice(id.to_string()))
}

impl Store {
    /// The device and state behind a token, revoked or expired included.
    pub async fn token_grant(&self, hash: &TokenHash) -> Result<Option<TokenGrant>, StorageError> {
        let Some((r, device, state)) = grant(self, TOKEN_GRANT, hash.as_bytes(), 4).await? else {
            return Ok(None);
        };
        Ok(Some(TokenGrant {
            device,
            token_pk: r.get(0)?,
            expires: r.get(1)?,
            revoked: r.get::<Option<i64>>(2)?.is_some(),
            last_used: r.get(3)?,
            state,
        }))
    }

    pub async fn certificate_grant(
        &self,
        fingerprint: &CertFingerprint,
    ) -> Result<Option<CertificateGrant>, StorageError> {
        let found = grant(self, CERTIFICATE_GRANT, fingerprint.as_bytes(), 0).await?;
        Ok(found.map(|(_, device, state)| CertificateGrant { device, state }))
    }

    pub async fn device_credentials(
        &self,
        id: &DeviceId,
    ) -> Result<DeviceCredentials, CredentialError> {
        let mut conn = self.read().await?;
        let row = conn
            .query(
                "SELECT pk, require_mtls, disabled_unix_nano, cert_sha256, cert_bound_unix_nano \
                 FROM devices WHERE device_id = $1",
            )
            .bind(id.as_str())
            .fetch_optional()
            .await?
            .ok_or_else(|| CredentialError::NoSuchDevice(id.to_string()))?;
        let device = DeviceKey {
            pk: row.get(0)?,
            id: id.clone(),
        };
        let certificate = fingerprint(row.get(3)?)?
            .map(|fingerprint| -> Result<_, sqlx::Error> {
                Ok(BoundCertificate {
                    fingerprint,
                    bound: row.get::<Option<i64>>(4)?.unwrap_or_default(),
                })
            })
            .transpose()?;
        let tokens = device_tokens(conn.conn(), device.pk).await?;
        Ok(DeviceCredentials {
            device,
            tokens,
            certificate,
            require_mtls: row.get(1)?,
            disabled: row.get(2)?,
        })
    }

    /// Adds a token to a device. With `others_expire`, the device's other
    /// active tokens expire then (at the latest). Refused when the device
    /// would hold more than `max_active` active tokens. The device's row is
    /// locked first, so two rotations cannot both pass the limit.
    pub async fn rotate_token(
        &self,
        id: &DeviceId,
        hash: &TokenHash,
        now: UnixNanos,
        others_expire: Option<UnixNanos>,
        max_active: usize,
    ) -> Result<RotatedToken, CredentialError> {
        let lock = format!(
            "SELECT pk FROM devices WHERE device_id = $1{}",
            self.row_lock()
        );
        let mut tx = self.begin_write().await?;
        let device_pk: i64 = tx
            .query(&lock)
            .bind(id.as_str())
            .fetch_optional_scalar()
            .await?
            .ok_or_else(|| CredentialError::NoSuchDevice(id.to_string()))?;
        if let Some(at) = others_expire {
            tx.query(EXPIRE_OTHERS)
                .bind(at)
                .bind(device_pk)
                .bind(at)
                .execute()
                .await?;
        }
        let tokens = device_tokens(tx.conn(), device_pk).await?;
        let active: Vec<_> = tokens.iter().filter(|t| t.active_at(now)).collect();
        if active.len() + 1 > max_active {
            return Err(CredentialError::TooManyTokens {
                device: id.to_string(),
                active: active.len(),
            });
        }
        let token_pk: i64 = tx
            .query(INSERT_TOKEN)
            .bind(device_pk)
            .bind(hash.as_bytes().as_slice())
            .bind(now)
            .fetch_scalar()
            .await?;
        tx.commit().await?;
        Ok(RotatedToken {
            device: DeviceKey {
                pk: device_pk,
                id: id.clone(),
            },
            token: TokenRecord {
                id: token_pk,
                created: now,
                last_used: None,
                expires: None,
                revoked: None,
            },
            others: active
                .iter()
                .filter_map(|t| t.expires.map(|e| (t.id, e)))
                .collect(),
        })
    }

    /// Revokes one token of a device. A token revoked already is
    /// `AlreadyRevoked`: an operator told "done" would believe they had
    /// cut something off.
    pub async fn revoke_token(
        &self,
        id: &DeviceId,
        token_id: i64,
        now: UnixNanos,
    ) -> Result<DeviceKey, CredentialError> {
        let mut tx = self.begin_write().await?;
        // No lock on the device's row: a group commit holds it while it
        // commits, and a revocation must not wait for one.
        let row = tx
            .query(
                "SELECT d.pk, t.revoked_unix_nano FROM devices d \
                 JOIN device_tokens t ON t.device_pk = d.pk \
                 WHERE d.device_id = $1 AND t.pk = $2",
            )
            .bind(id.as_str())
            .bind(token_id)
            .fetch_optional()
            .await?
            .ok_or_else(|| CredentialError::NoSuchToken {
                device: id.to_string(),
                id: token_id,
            })?;
        let device_pk: i64 = row.get(0)?;
        if let Some(at) = row.get::<Option<i64>>(1)? {
            return Err(CredentialError::AlreadyRevoked {
                device: id.to_string(),
                id: token_id,
                at,
            });
        }
        tx.query(
            "UPDATE device_tokens SET revoked_unix_nano = $1 \
             WHERE pk = $2 AND revoked_unix_nano IS NULL",
        )
        .bind(now)
        .bind(token_id)
        .execute()
        .await?;
        tx.commit().await?;
        Ok(DeviceKey {
            pk: device_pk,
            id: id.clone(),
        })
    }

    /// Binds (`Some`) or unbinds (`None`, a revocation) a device's
    /// certificate, replacing any earlier one; `require_mtls` is set when
    /// given.
    pub async fn bind_certificate(
        &self,
        id: &DeviceId,
        certificate: Option<&CertFingerprint>,
        require_mtls: Option<bool>,
        now: UnixNanos,
    ) -> Result<DeviceKey, CredentialError> {
        let result = self
            .write_conn()
            .await?
            .query(
                "UPDATE devices SET cert_sha256 = $1, cert_bound_unix_nano = $2, \
                 require_mtls = COALESCE($3, require_mtls) WHERE device_id = $4 RETURNING pk",
            )
            .bind(certificate.map(|c| c.as_bytes().to_vec()))
            .bind(certificate.map(|_| now))
            .bind(require_mtls)
            .bind(id.as_str())
            .fetch_optional_scalar::<i64>()
            .await;
        match result {
            Ok(pk) => changed_device(id, pk),
            Err(e) => match self.naming_holder(e.into(), certificate).await {
                StorageError::AlreadyExists(Clash::Certificate { holder }) => {
                    Err(CredentialError::CertificateInUse(holder))
                }
                other => Err(other.into()),
            },
        }
    }

    /// The device a certificate is bound to, if any.
    pub async fn certificate_holder(
        &self,
        certificate: &CertFingerprint,
    ) -> Result<Option<DeviceId>, StorageError> {
        let id: Option<String> = self
            .query("SELECT device_id FROM devices WHERE cert_sha256 = $1")
            .bind(certificate.as_bytes().as_slice())
            .fetch_optional_scalar()
            .await?;
        id.map(|id| DeviceId::parse(&id).map_err(|e| StorageError::Corrupt(e.to_string())))
            .transpose()
    }

    /// A certificate clash with the device holding `certificate` named (a
    /// lookup after the failed write; if that fails too, unnamed). Other
    /// errors pass unchanged.
    pub(super) async fn naming_holder(
        &self,
        e: StorageError,
        certificate: Option<&CertFingerprint>,
    ) -> StorageError {
        let (StorageError::AlreadyExists(Clash::Certificate { holder: None }), Some(certificate)) =
            (&e, certificate)
        else {
            return e;
        };
        match self.certificate_holder(certificate).await {
            Ok(holder) => StorageError::AlreadyExists(Clash::Certificate { holder }),
            Err(error) => {
                tracing::warn!(%error, "could not look up the device holding a certificate");
                e
            }
        }
    }

    pub async fn set_require_mtls(
        &self,
        id: &DeviceId,
        require_mtls: bool,
    ) -> Result<DeviceKey, CredentialError> {
        let pk: Option<i64> = self
            .write_conn()
            .await?
            .query("UPDATE devices SET require_mtls = $1 WHERE device_id = $2 RETURNING pk")
            .bind(require_mtls)
            .bind(id.as_str())
            .fetch_optional_scalar()
            .await?;
        changed_device(id, pk)
    }

    /// Disables (`Some(now)`) or enables (`None`) a device. A device
    /// disabled twice keeps its first time.
    pub async fn set_disabled(
        &self,
        id: &DeviceId,
        disabled: Option<UnixNanos>,
    ) -> Result<DeviceKey, CredentialError> {
        let pk: Option<i64> = self
            .write_conn()
            .await?
            .query(
                "UPDATE devices SET disabled_unix_nano = CASE WHEN $1 IS NULL THEN NULL \
                 ELSE COALESCE(disabled_unix_nano, $2) END WHERE device_id = $3 RETURNING pk",
            )
            .bind(disabled)
            .bind(disabled)
            .bind(id.as_str())
            .fetch_optional_scalar()
            .await?;
        changed_device(id, pk)
    }

    /// Records when tokens were last used, never moving a time back.
    pub async fn record_token_use(&self, uses: &[(i64, UnixNanos)]) -> Result<(), StorageError> {
        if uses.is_empty() {
            return Ok(());
        }
        // In pk order: two writers of the same rows never wait on each
        // other in a circle.
        let mut uses = uses.to_vec();
        uses.sort_unstable();
        let mut tx = self.begin_write().await?;
        for (pk, at) in &uses {
            tx.query(
                "UPDATE device_tokens SET last_used_unix_nano = $1 \
                 WHERE pk = $2 AND (last_used_unix_nano IS NULL OR last_used_unix_nano < $3)",
            )
            .bind(*at)
            .bind(*pk)
            .bind(*at)
            .execute()
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
