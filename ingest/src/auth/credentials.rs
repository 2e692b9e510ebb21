//! Device credentials at run time: who a token or certificate proves, from
//! a cache in front of the database, and every change to them.
//!
//! A change is committed to the database first, then [`Credentials::apply`]
//! drops what the cache holds of the device and tells open streams, in one
//! step. A server sharing the database with others would receive the same
//! event from them and apply it the same way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};

use super::revocation::{Credential, CredentialEnded, CredentialEvent, CredentialWatch, Recheck};
use crate::domain::credential::MAX_ACTIVE_TOKENS;
use crate::domain::time::{UnixNanos, now_unix_nanos};
use crate::domain::{CertFingerprint, ClientCertificate, DeviceId, DeviceKey, Token, TokenHash};
use crate::storage::cluster::channel;
use crate::storage::credentials::{
    CertificateGrant, CredentialError, DeviceAuthState, DeviceCredentials, TokenGrant,
};
use crate::storage::{StorageError, Store};

/// A token's last use is written at most this often.
const LAST_USED_INTERVAL: i64 = 60_000_000_000;
/// Credential events a stream may fall behind before it must ask the
/// database (operators change credentials rarely; this is generous).
const EVENT_BUFFER: usize = 1024;

/// Why a device call is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("missing credential: send metadata `authorization: Bearer <{0} token>`")]
    Missing(&'static str),
    #[error("the authorization metadata must be `Bearer <token>`")]
    MalformedAuthorization,
    /// `Bearer ` and nothing after it: most often an empty token file or
    /// variable on the caller's side, so say where tokens come from.
    #[error(
        "the bearer token is empty: an operator's token comes from --ops-token-file or INGEST_OPS_TOKEN, a device's from its credentials file"
    )]
    EmptyToken,
    #[error(
        "device token not recognised; use the token RegisterDevice or RotateDeviceToken returned"
    )]
    UnknownDeviceToken,
    #[error("this device token was revoked; use the device's current token")]
    TokenRevoked,
    #[error("this device token expired at {0} (unix ns); use the token RotateDeviceToken returned")]
    TokenExpired(UnixNanos),
    #[error("device {0} is disabled")]
    DeviceDisabled(DeviceId),
    #[error(
        "device {0} requires mutual TLS: connect with its bound client certificate; a token alone is refused"
    )]
    MtlsRequired(DeviceId),
    #[error(
        "the client certificate is not bound to a device; send the device token too, or bind it (ingest devices bind-cert)"
    )]
    CertificateNotBound,
    #[error(
        "the client certificate is bound to device {0} but does not name it (subject CN, DNS SAN or URI SAN urn:device:{0})"
    )]
    CertificateDoesNotNameDevice(DeviceId),
    #[error("the client certificate and the token belong to different devices")]
    CertificateTokenMismatch,
    #[error("device {0} is bound to another certificate")]
    NotTheBoundCertificate(DeviceId),
    #[error(
        "ops token not recognised; use a token from INGEST_OPS_TOKEN, --ops-token-file or <data-dir>/ops.token"
    )]
    UnknownOpsToken,
    #[error("cannot check credentials right now; retry")]
    Unavailable,
}

impl AuthFailure {
    /// A short stable name, for the `auth_failures_total{reason}` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing(_) => "missing",
            Self::MalformedAuthorization => "malformed",
            Self::EmptyToken => "empty_token",
            Self::UnknownDeviceToken => "unknown_device_token",
            Self::TokenRevoked => "token_revoked",
            Self::TokenExpired(_) => "token_expired",
            Self::DeviceDisabled(_) => "device_disabled",
            Self::MtlsRequired(_) => "mtls_required",
            Self::CertificateNotBound => "certificate_not_bound",
            Self::CertificateDoesNotNameDevice(_) => "certificate_name_mismatch",
            Self::CertificateTokenMismatch => "certificate_token_mismatch",
            Self::NotTheBoundCertificate(_) => "not_the_bound_certificate",
            Self::UnknownOpsToken => "unknown_ops_token",
            Self::Unavailable => "unavailable",
        }
    }
}

/// The device a call was authenticated as, put in the request extensions by
/// the auth layer. Handlers take the caller's identity from here only.
#[derive(Clone)]
pub struct AuthenticatedDevice {
    pub key: DeviceKey,
    pub credential: Credential,
    watch: Arc<std::sync::Mutex<Option<CredentialWatch>>>,
}

impl AuthenticatedDevice {
    /// Watches this call's credential, for a stream to end when it no
    /// longer holds. Taken once: later calls get `None`.
    pub fn take_watch(&self) -> Option<CredentialWatch> {
        self.watch.lock().expect("lock poisoned").take()
    }
}

impl std::fmt::Debug for AuthenticatedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthenticatedDevice")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

struct CachedToken {
    grant: TokenGrant,
    /// When this server last wrote the token's use (or read it).
    last_recorded: AtomicI64,
}

pub struct Credentials {
    store: Store,
    tokens: RwLock<HashMap<TokenHash, Arc<CachedToken>>>,
    certificates: RwLock<HashMap<CertFingerprint, Arc<CertificateGrant>>>,
    /// Moves on every applied change: a lookup that raced one is not
    /// cached.
    epoch: AtomicU64,
    events: broadcast::Sender<CredentialEvent>,
    uses: mpsc::Sender<(i64, UnixNanos)>,
    /// Shared by every call's watch: made once, not per call.
    recheck: Recheck,
}

impl Credentials {
    /// Starts the task that writes tokens' last use; it stops at shutdown.
    pub fn start(store: Store, mut stopping: watch::Receiver<bool>) -> Arc<Self> {
        let (uses, mut used) = mpsc::channel::<(i64, UnixNanos)>(4096);
        let writer = store.clone();
        tokio::spawn(async move {
            let mut batch = Vec::new();
            loop {
                tokio::select! {
                    n = used.recv_many(&mut batch, 512) => if n == 0 { break },
                    _ = stopping.wait_for(|s| *s) => break,
                }
                if let Err(error) = writer.record_token_use(&batch).await {
                    tracing::warn!(%error, "recording device tokens' last use failed");
                }
                batch.clear();
                // Coalesce: uses are rare (one per token per minute).
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Arc::new(Self {
            recheck: recheck_in(store.clone()),
            store,
            tokens: RwLock::default(),
            certificates: RwLock::default(),
            epoch: AtomicU64::new(0),
            events: broadcast::channel(EVENT_BUFFER).0,
            uses,
        })
    }

    /// Authenticates a device call by its client certificate, its bearer
    /// token, or both (then they must agree).
    pub async fn authenticate(
        &self,
        certificate: Option<&ClientCertificate>,
        token: Option<TokenHash>,
    ) -> Result<AuthenticatedDevice, AuthFailure> {
        // Before the lookup: a change committed after it is not missed.
        let events = self.events.subscribe();
        let now = now_unix_nanos();
        let bound = match certificate {
            Some(c) => self.certificate(&c.fingerprint).await?,
            None => None,
        };
        let (key, credential) = match (bound, certificate, token) {
            (Some(grant), Some(cert), token) => {
                if !cert.names_device(grant.device.id.as_str()) {
                    return Err(AuthFailure::CertificateDoesNotNameDevice(
                        grant.device.id.clone(),
                    ));
                }
                if grant.state.disabled {
                    return Err(AuthFailure::DeviceDisabled(grant.device.id.clone()));
                }
                if let Some(hash) = token {
                    let cached = self.token(&hash).await?;
                    if cached.grant.device.pk != grant.device.pk {
                        return Err(AuthFailure::CertificateTokenMismatch);
                    }
                }
                (
                    grant.device.clone(),
                    Credential::Certificate(cert.fingerprint),
                )
            }
            (_, certificate, token) => {
                let hash = match (token, certificate) {
                    (Some(hash), _) => hash,
                    (None, Some(_)) => return Err(AuthFailure::CertificateNotBound),
                    (None, None) => return Err(AuthFailure::Missing("device")),
                };
                let cached = self.token(&hash).await?;
                let grant = &cached.grant;
                check_token(grant, certificate, now)?;
                self.record_use(&cached, now);
                (
                    grant.device.clone(),
                    Credential::Token {
                        pk: grant.token_pk,
                        hash,
                        expires: grant.expires,
                    },
                )
            }
        };
        let watch = CredentialWatch {
            device: key.clone(),
            credential: credential.clone(),
            events,
            recheck: self.recheck.clone(),
        };
        Ok(AuthenticatedDevice {
            key,
            credential,
            watch: Arc::new(std::sync::Mutex::new(Some(watch))),
        })
    }

    /// An operator's change, committed here: applied, and told to the other
    /// server processes sharing the database, which apply it in turn.
    async fn publish(&self, event: CredentialEvent) {
        let payload = event.to_payload();
        self.apply(event);
        if let Err(error) = self.store.notify(channel::CREDENTIALS, &payload).await {
            // Their caches expire by themselves; open streams there go on
            // until they re-check or reconnect.
            tracing::error!(%error, "could not tell the other server processes of a credential change");
        }
    }

    /// Drops every cached lookup: after notifications from the other server
    /// processes may have been missed, the next call of each device reads
    /// its credentials from the database again.
    pub fn forget_all(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.tokens.write().expect("lock poisoned").clear();
        self.certificates.write().expect("lock poisoned").clear();
    }

    /// Drops what is remembered of the event's device and tells its open
    /// streams. Call it after the change is committed.
    pub fn apply(&self, event: CredentialEvent) {
        let device_pk = event.device_pk();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        self.tokens
            .write()
            .expect("lock poisoned")
            .retain(|_, t| t.grant.device.pk != device_pk);
        self.certificates
            .write()
            .expect("lock poisoned")
            .retain(|_, c| c.device.pk != device_pk);
        // No receiver: no open call to tell.
        let _ = self.events.send(event);
    }

    // The operators' changes: each commits, then applies its event.

    pub async fn rotate_token(
        &self,
        id: &DeviceId,
        overlap: Option<Duration>,
    ) -> Result<(Token, i64, DeviceCredentials), CredentialError> {
        let token = Token::generate("dev_");
        let now = now_unix_nanos();
        let others_expire =
            overlap.map(|o| now.saturating_add(o.as_nanos().min(i64::MAX as u128) as i64));
        let rotated = self
            .store
            .rotate_token(id, &token.hash(), now, others_expire, MAX_ACTIVE_TOKENS)
            .await?;
        let device_pk = rotated.device.pk;
        self.publish(if rotated.others.is_empty() {
            CredentialEvent::TokenIssued { device_pk }
        } else {
            CredentialEvent::TokensExpire {
                device_pk,
                expiries: rotated.others.clone(),
            }
        })
        .await;
        tracing::info!(device = %id, credential = rotated.token.id, overlap = ?overlap, "device token issued");
        Ok((
            token,
            rotated.token.id,
            self.store.device_credentials(id).await?,
        ))
    }

    pub async fn revoke_token(
        &self,
        id: &DeviceId,
        token_id: i64,
    ) -> Result<DeviceCredentials, CredentialError> {
        let device = self
            .store
            .revoke_token(id, token_id, now_unix_nanos())
            .await?;
        self.publish(CredentialEvent::TokenRevoked {
            device_pk: device.pk,
            token_pk: token_id,
        })
        .await;
        tracing::warn!(device = %id, credential = token_id, "device token revoked");
        self.store.device_credentials(id).await
    }

    /// Revokes the certificate binding. `NoCertificate` when none is
    /// bound: a success that changed nothing would mislead.
    pub async fn revoke_certificate(
        &self,
        id: &DeviceId,
    ) -> Result<DeviceCredentials, CredentialError> {
        if self
            .store
            .device_credentials(id)
            .await?
            .certificate
            .is_none()
        {
            return Err(CredentialError::NoCertificate(id.to_string()));
        }
        self.bind_certificate(id, None, None).await
    }

    /// Binds (`Some`) or revokes (`None`) a device's certificate.
    pub async fn bind_certificate(
        &self,
        id: &DeviceId,
        certificate: Option<CertFingerprint>,
        require_mtls: Option<bool>,
    ) -> Result<DeviceCredentials, CredentialError> {
        let device = self
            .store
            .bind_certificate(id, certificate.as_ref(), require_mtls, now_unix_nanos())
            .await?;
        let credentials = self.store.device_credentials(id).await?;
        self.publish(CredentialEvent::CertificateChanged {
            device_pk: device.pk,
            certificate,
            require_mtls: credentials.require_mtls,
        })
        .await;
        match certificate {
            Some(fp) => {
                tracing::info!(device = %id, certificate = %fp, require_mtls = credentials.require_mtls, "device certificate bound")
            }
            None => tracing::warn!(device = %id, "device certificate binding revoked"),
        }
        Ok(credentials)
    }

    /// Changes only whether a token alone is refused; the binding stays.
    pub async fn set_require_mtls(
        &self,
        id: &DeviceId,
        require_mtls: bool,
    ) -> Result<DeviceCredentials, CredentialError> {
        let device = self.store.set_require_mtls(id, require_mtls).await?;
        let credentials = self.store.device_credentials(id).await?;
        self.publish(CredentialEvent::CertificateChanged {
            device_pk: device.pk,
            certificate: credentials.certificate.map(|c| c.fingerprint),
            require_mtls,
        })
        .await;
        tracing::info!(device = %id, require_mtls, "device mutual TLS requirement changed");
        Ok(credentials)
    }

    pub async fn set_disabled(
        &self,
        id: &DeviceId,
        disabled: bool,
    ) -> Result<DeviceCredentials, CredentialError> {
        let since = disabled.then(now_unix_nanos);
        let device = self.store.set_disabled(id, since).await?;
        self.publish(if disabled {
            CredentialEvent::Disabled {
                device_pk: device.pk,
            }
        } else {
            CredentialEvent::Enabled {
                device_pk: device.pk,
            }
        })
        .await;
        tracing::warn!(device = %id, disabled, "device access changed");
        self.store.device_credentials(id).await
    }

    async fn token(&self, hash: &TokenHash) -> Result<Arc<CachedToken>, AuthFailure> {
        if let Some(cached) = self.tokens.read().expect("lock poisoned").get(hash) {
            return Ok(cached.clone());
        }
        loop {
            let epoch = self.epoch.load(Ordering::Acquire);
            let grant = self
                .store
                .token_grant(hash)
                .await
                .map_err(unavailable)?
                .ok_or(AuthFailure::UnknownDeviceToken)?;
            let cached = Arc::new(CachedToken {
                last_recorded: AtomicI64::new(grant.last_used.unwrap_or(i64::MIN)),
                grant,
            });
            let mut tokens = self.tokens.write().expect("lock poisoned");
            // A change applied meanwhile may have been read half: again.
            if self.epoch.load(Ordering::Acquire) == epoch {
                tokens.insert(*hash, cached.clone());
                return Ok(cached);
            }
        }
    }

    async fn certificate(
        &self,
        fingerprint: &CertFingerprint,
    ) -> Result<Option<Arc<CertificateGrant>>, AuthFailure> {
        if let Some(cached) = self
            .certificates
            .read()
            .expect("lock poisoned")
            .get(fingerprint)
        {
            return Ok(Some(cached.clone()));
        }
        loop {
            let epoch = self.epoch.load(Ordering::Acquire);
            // Unbound certificates are not remembered: their devices
            // authenticate by token, which is.
            let Some(grant) = self
                .store
                .certificate_grant(fingerprint)
                .await
                .map_err(unavailable)?
            else {
                return Ok(None);
            };
            let grant = Arc::new(grant);
            let mut certificates = self.certificates.write().expect("lock poisoned");
            if self.epoch.load(Ordering::Acquire) == epoch {
                certificates.insert(*fingerprint, grant.clone());
                return Ok(Some(grant));
            }
        }
    }

    fn record_use(&self, cached: &CachedToken, now: UnixNanos) {
        let last = cached.last_recorded.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= LAST_USED_INTERVAL
            && cached
                .last_recorded
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            // Full: the next use a minute on records it.
            let _ = self.uses.try_send((cached.grant.token_pk, now));
        }
    }
}

/// Whether a token still grants access, with the connection's client
/// certificate if it has one. That certificate is bound to no device (a
/// bound one identifies its device before any token is looked at), so it
/// identifies no one: a fleet or gateway certificate proves the connection
/// comes from our hardware, and the token says which device it is. It must
/// still be the device's own certificate when the device has one bound.
fn check_token(
    grant: &TokenGrant,
    certificate: Option<&ClientCertificate>,
    now: UnixNanos,
) -> Result<(), AuthFailure> {
    let device = &grant.device.id;
    let DeviceAuthState {
        require_mtls,
        disabled,
        certificate: bound,
    } = grant.state;
    if grant.revoked {
        return Err(AuthFailure::TokenRevoked);
    }
    if let Some(at) = grant.expires.filter(|at| *at <= now) {
        return Err(AuthFailure::TokenExpired(at));
    }
    if disabled {
        return Err(AuthFailure::DeviceDisabled(device.clone()));
    }
    if certificate.is_some() && bound.is_some() {
        return Err(AuthFailure::NotTheBoundCertificate(device.clone()));
    }
    if require_mtls {
        return Err(AuthFailure::MtlsRequired(device.clone()));
    }
    Ok(())
}

fn unavailable(error: StorageError) -> AuthFailure {
    tracing::error!(%error, "credential lookup failed");
    AuthFailure::Unavailable
}

/// Checks a credential in the database, for a stream that missed events.
fn recheck_in(store: Store) -> Recheck {
    Arc::new(move |credential| {
        let store = store.clone();
        Box::pin(async move {
            let now = now_unix_nanos();
            match credential {
                Credential::Token { hash, .. } => {
                    let grant = store.token_grant(&hash).await.map_err(drop)?;
                    Ok(match grant {
                        None => Some(CredentialEnded::TokenRevoked),
                        Some(g) => check_token(&g, None, now).err().map(|e| match e {
                            AuthFailure::TokenExpired(_) => CredentialEnded::TokenExpired,
                            AuthFailure::DeviceDisabled(_) => CredentialEnded::DeviceDisabled,
                            AuthFailure::MtlsRequired(_) => CredentialEnded::MtlsRequired,
                            _ => CredentialEnded::TokenRevoked,
                        }),
                    })
                }
                Credential::Certificate(fp) => {
                    let grant = store.certificate_grant(&fp).await.map_err(drop)?;
                    Ok(match grant {
                        None => Some(CredentialEnded::CertificateRevoked),
                        Some(g) if g.state.disabled => Some(CredentialEnded::DeviceDisabled),
                        Some(_) => None,
                    })
                }
            }
        })
    })
}
