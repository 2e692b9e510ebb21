//! Device credentials as stored: bearer tokens (several per device, for
//! rotation with an overlap), the certificate bound to a device, and
//! whether the device is enabled. Written once for both backends, like
//! `shared.rs`: `credential_queries!(Store)` expands into an `impl`.
//!
//! Every change returns the device it touched, so the caller can invalidate
//! what the server remembers of it in the same step (see `auth::Credentials`).

use crate::domain::credential::{CertFingerprint, DeviceKey};
use crate::domain::time::UnixNanos;

use super::StorageError;

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
    #[error("this certificate is already bound to another device")]
    CertificateInUse,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<sqlx::Error> for CredentialError {
    fn from(e: sqlx::Error) -> Self {
        Self::Storage(e.into())
    }
}

pub(super) const TOKEN_GRANT: &str = "SELECT t.pk, t.expires_unix_nano, t.revoked_unix_nano, t.last_used_unix_nano, \
     d.pk, d.device_id, d.require_mtls, d.disabled_unix_nano, d.cert_sha256 \
     FROM device_tokens t JOIN devices d ON d.pk = t.device_pk WHERE t.token_sha256 = ?";

pub(super) const CERTIFICATE_GRANT: &str = "SELECT pk, device_id, require_mtls, disabled_unix_nano, cert_sha256 \
     FROM devices WHERE cert_sha256 = ?";

pub(super) const DEVICE_TOKENS: &str = "SELECT pk, created_unix_nano, last_used_unix_nano, expires_unix_nano, revoked_unix_nano \
     FROM device_tokens WHERE device_pk = ? ORDER BY pk";

/// The active tokens' expiry moves to the overlap's end, unless it is
/// sooner already.
pub(super) const EXPIRE_OTHERS: &str = "UPDATE device_tokens SET expires_unix_nano = ? \
     WHERE device_pk = ? AND revoked_unix_nano IS NULL \
       AND (expires_unix_nano IS NULL OR expires_unix_nano > ?)";

pub(super) const INSERT_TOKEN: &str = "INSERT INTO device_tokens (device_pk, token_sha256, created_unix_nano) \
     VALUES (?, ?, ?) RETURNING pk";

pub(super) fn fingerprint(bytes: Option<Vec<u8>>) -> Result<Option<CertFingerprint>, StorageError> {
    bytes
        .map(|b| {
            <[u8; 32]>::try_from(b.as_slice())
                .map(CertFingerprint::from_bytes)
                .map_err(|_| StorageError::Corrupt("cert_sha256 is not 32 bytes".into()))
        })
        .transpose()
}

pub(super) fn device_key(pk: i64, id: &str) -> Result<DeviceKey, StorageError> {
    Ok(DeviceKey {
        pk,
        id: crate::domain::DeviceId::parse(id).map_err(|e| StorageError::Corrupt(e.to_string()))?,
    })
}

macro_rules! credential_queries {
    ($store:ty, $conn:ty) => {
        impl $store {
            /// A device's tokens, oldest first, on `conn` (the pool's, or a
            /// transaction's).
            async fn device_tokens_on(
                conn: &mut $conn,
                device_pk: i64,
            ) -> Result<Vec<credentials::TokenRecord>, sqlx::Error> {
                sqlx::query(&Self::sql(credentials::DEVICE_TOKENS))
                    .bind(device_pk)
                    .fetch_all(conn)
                    .await?
                    .iter()
                    .map(|r| {
                        Ok(credentials::TokenRecord {
                            id: r.try_get(0)?,
                            created: r.try_get(1)?,
                            last_used: r.try_get(2)?,
                            expires: r.try_get(3)?,
                            revoked: r.try_get(4)?,
                        })
                    })
                    .collect()
            }

            pub async fn token_grant(
                &self,
                hash: &TokenHash,
            ) -> Result<Option<credentials::TokenGrant>, StorageError> {
                let row = sqlx::query(&Self::sql(credentials::TOKEN_GRANT))
                    .bind(hash.as_bytes().as_slice())
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(r) = row else { return Ok(None) };
                Ok(Some(credentials::TokenGrant {
                    token_pk: r.try_get(0)?,
                    expires: r.try_get(1)?,
                    revoked: r.try_get::<Option<i64>, _>(2)?.is_some(),
                    last_used: r.try_get(3)?,
                    device: credentials::device_key(r.try_get(4)?, &r.try_get::<String, _>(5)?)?,
                    state: credentials::DeviceAuthState {
                        require_mtls: r.try_get(6)?,
                        disabled: r.try_get::<Option<i64>, _>(7)?.is_some(),
                        certificate: credentials::fingerprint(r.try_get(8)?)?,
                    },
                }))
            }

            pub async fn certificate_grant(
                &self,
                fingerprint: &CertFingerprint,
            ) -> Result<Option<credentials::CertificateGrant>, StorageError> {
                let row = sqlx::query(&Self::sql(credentials::CERTIFICATE_GRANT))
                    .bind(fingerprint.as_bytes().as_slice())
                    .fetch_optional(&self.pool)
                    .await?;
                let Some(r) = row else { return Ok(None) };
                Ok(Some(credentials::CertificateGrant {
                    device: credentials::device_key(r.try_get(0)?, &r.try_get::<String, _>(1)?)?,
                    state: credentials::DeviceAuthState {
                        require_mtls: r.try_get(2)?,
                        disabled: r.try_get::<Option<i64>, _>(3)?.is_some(),
                        certificate: credentials::fingerprint(r.try_get(4)?)?,
                    },
                }))
            }

            pub async fn device_credentials(
                &self,
                id: &DeviceId,
            ) -> Result<credentials::DeviceCredentials, credentials::CredentialError> {
                let row = sqlx::query(&Self::sql(
                    "SELECT pk, require_mtls, disabled_unix_nano, cert_sha256, cert_bound_unix_nano \
                     FROM devices WHERE device_id = ?",
                ))
                .bind(id.as_str())
                .fetch_optional(&self.pool)
                .await?
                .ok_or_else(|| credentials::CredentialError::NoSuchDevice(id.to_string()))?;
                let device = DeviceKey {
                    pk: row.try_get(0)?,
                    id: id.clone(),
                };
                let certificate = credentials::fingerprint(row.try_get(3)?)?
                    .map(|fingerprint| -> Result<_, sqlx::Error> {
                        Ok(credentials::BoundCertificate {
                            fingerprint,
                            bound: row.try_get::<Option<i64>, _>(4)?.unwrap_or_default(),
                        })
                    })
                    .transpose()?;
                let tokens =
                    Self::device_tokens_on(&mut *self.pool.acquire().await?, device.pk).await?;
                Ok(credentials::DeviceCredentials {
                    device,
                    tokens,
                    certificate,
                    require_mtls: row.try_get(1)?,
                    disabled: row.try_get(2)?,
                })
            }

            /// Adds a token to a device. With `others_expire`, the device's
            /// other active tokens expire then (at the latest). Refused when
            /// the device would hold more than `max_active` active tokens.
            /// The device's row is locked first, so two rotations cannot
            /// both pass the limit.
            pub async fn rotate_token(
                &self,
                id: &DeviceId,
                hash: &TokenHash,
                now: UnixNanos,
                others_expire: Option<UnixNanos>,
                max_active: usize,
            ) -> Result<credentials::RotatedToken, credentials::CredentialError> {
                let mut tx = self.begin_write().await?;
                let device_pk: i64 = sqlx::query_scalar(&Self::sql(&format!(
                    "SELECT pk FROM devices WHERE device_id = ?{}",
                    Self::ROW_LOCK
                )))
                .bind(id.as_str())
                .fetch_optional(&mut *tx)
                .await?
                .ok_or_else(|| credentials::CredentialError::NoSuchDevice(id.to_string()))?;
                if let Some(at) = others_expire {
                    sqlx::query(&Self::sql(credentials::EXPIRE_OTHERS))
                        .bind(at)
                        .bind(device_pk)
                        .bind(at)
                        .execute(&mut *tx)
                        .await?;
                }
                let tokens = Self::device_tokens_on(&mut *tx, device_pk).await?;
                let active: Vec<_> = tokens.iter().filter(|t| t.active_at(now)).collect();
                if active.len() + 1 > max_active {
                    return Err(credentials::CredentialError::TooManyTokens {
                        device: id.to_string(),
                        active: active.len(),
                    });
                }
                let token_pk: i64 = sqlx::query_scalar(&Self::sql(credentials::INSERT_TOKEN))
                    .bind(device_pk)
                    .bind(hash.as_bytes().as_slice())
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(credentials::RotatedToken {
                    device: DeviceKey {
                        pk: device_pk,
                        id: id.clone(),
                    },
                    token: credentials::TokenRecord {
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

            /// Revokes one token of a device. Revoking a revoked token
            /// changes nothing and succeeds.
            pub async fn revoke_token(
                &self,
                id: &DeviceId,
                token_id: i64,
                now: UnixNanos,
            ) -> Result<DeviceKey, credentials::CredentialError> {
                let mut tx = self.begin_write().await?;
                // No lock on the device's row: a group commit holds it while
                // it commits, and a revocation must not wait for one.
                let device_pk: Option<i64> = sqlx::query_scalar(&Self::sql(
                    "SELECT d.pk FROM devices d JOIN device_tokens t ON t.device_pk = d.pk \
                     WHERE d.device_id = ? AND t.pk = ?",
                ))
                .bind(id.as_str())
                .bind(token_id)
                .fetch_optional(&mut *tx)
                .await?;
                let device_pk = device_pk.ok_or_else(|| credentials::CredentialError::NoSuchToken {
                    device: id.to_string(),
                    id: token_id,
                })?;
                sqlx::query(&Self::sql(
                    "UPDATE device_tokens SET revoked_unix_nano = ? \
                     WHERE pk = ? AND revoked_unix_nano IS NULL",
                ))
                .bind(now)
                .bind(token_id)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                Ok(DeviceKey {
                    pk: device_pk,
                    id: id.clone(),
                })
            }

            /// Binds a certificate to a device, replacing any earlier one;
            /// `require_mtls` is set when given. `None` unbinds (revokes) the
            /// certificate.
            pub async fn bind_certificate(
                &self,
                id: &DeviceId,
                certificate: Option<&CertFingerprint>,
                require_mtls: Option<bool>,
                now: UnixNanos,
            ) -> Result<DeviceKey, credentials::CredentialError> {
                let result = sqlx::query_scalar::<_, i64>(&Self::sql(
                    "UPDATE devices SET cert_sha256 = ?, cert_bound_unix_nano = ?, \
                     require_mtls = COALESCE(?, require_mtls) WHERE device_id = ? RETURNING pk",
                ))
                .bind(certificate.map(|c| c.as_bytes().to_vec()))
                .bind(certificate.map(|_| now))
                .bind(require_mtls)
                .bind(id.as_str())
                .fetch_optional(&mut *self.write_conn().await?)
                .await;
                match result {
                    Ok(Some(pk)) => Ok(DeviceKey { pk, id: id.clone() }),
                    Ok(None) => Err(credentials::CredentialError::NoSuchDevice(id.to_string())),
                    Err(e) => match StorageError::from(e) {
                        StorageError::AlreadyExists => {
                            Err(credentials::CredentialError::CertificateInUse)
                        }
                        other => Err(other.into()),
                    },
                }
            }

            pub async fn set_require_mtls(
                &self,
                id: &DeviceId,
                require_mtls: bool,
            ) -> Result<DeviceKey, credentials::CredentialError> {
                let pk: Option<i64> = sqlx::query_scalar(&Self::sql(
                    "UPDATE devices SET require_mtls = ? WHERE device_id = ? RETURNING pk",
                ))
                .bind(require_mtls)
                .bind(id.as_str())
                .fetch_optional(&mut *self.write_conn().await?)
                .await?;
                pk.map(|pk| DeviceKey { pk, id: id.clone() })
                    .ok_or_else(|| credentials::CredentialError::NoSuchDevice(id.to_string()))
            }

            /// Disables (`Some(now)`) or enables (`None`) a device. A device
            /// disabled twice keeps its first time.
            pub async fn set_disabled(
                &self,
                id: &DeviceId,
                disabled: Option<UnixNanos>,
            ) -> Result<DeviceKey, credentials::CredentialError> {
                let pk: Option<i64> = sqlx::query_scalar(&Self::sql(
                    "UPDATE devices SET disabled_unix_nano = CASE WHEN ? IS NULL THEN NULL \
                     ELSE COALESCE(disabled_unix_nano, ?) END WHERE device_id = ? RETURNING pk",
                ))
                .bind(disabled)
                .bind(disabled)
                .bind(id.as_str())
                .fetch_optional(&mut *self.write_conn().await?)
                .await?;
                pk.map(|pk| DeviceKey { pk, id: id.clone() })
                    .ok_or_else(|| credentials::CredentialError::NoSuchDevice(id.to_string()))
            }

            /// Records when tokens were last used, never moving a time back.
            pub async fn record_token_use(
                &self,
                uses: &[(i64, UnixNanos)],
            ) -> Result<(), StorageError> {
                if uses.is_empty() {
                    return Ok(());
                }
                // In pk order: two writers of the same rows never wait on
                // each other in a circle.
                let mut uses = uses.to_vec();
                uses.sort_unstable();
                let mut tx = self.begin_write().await?;
                for (pk, at) in &uses {
                    sqlx::query(&Self::sql(
                        "UPDATE device_tokens SET last_used_unix_nano = ? \
                         WHERE pk = ? AND (last_used_unix_nano IS NULL OR last_used_unix_nano < ?)",
                    ))
                    .bind(*at)
                    .bind(*pk)
                    .bind(*at)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    };
}

pub(super) use credential_queries;
