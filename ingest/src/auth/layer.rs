//! The tower layer that authenticates every gRPC call by its path:
//! `telemetry.v1.Ingest` needs a device token, `telemetry.v1.Ops` the ops
//! token; health and reflection are open so generic tools work.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tower::{Layer, Service};

use super::AuthenticatedDevice;
use crate::domain::{DeviceKey, TokenHash};
use crate::storage::Store;

const INGEST_PREFIX: &str = "/telemetry.v1.Ingest/";
const OPS_PREFIX: &str = "/telemetry.v1.Ops/";

/// Marks a call authenticated with the ops token.
#[derive(Debug, Clone, Copy)]
pub struct Operator;

/// Checks credentials. Device tokens found in the database are remembered,
/// so a device's steady stream of calls costs one hash and one map lookup.
pub struct Authenticator {
    ops_token: TokenHash,
    store: Store,
    devices: RwLock<HashMap<TokenHash, DeviceKey>>,
}

impl Authenticator {
    pub fn new(ops_token: TokenHash, store: Store) -> Self {
        Self {
            ops_token,
            store,
            devices: RwLock::new(HashMap::new()),
        }
    }

    async fn check<B>(&self, request: &mut http::Request<B>) -> Result<(), Status> {
        let path = request.uri().path();
        if path.starts_with(INGEST_PREFIX) {
            let hash = bearer(request, "device")?;
            let device = self.device(&hash).await?;
            request.extensions_mut().insert(AuthenticatedDevice(device));
        } else if path.starts_with(OPS_PREFIX) {
            let hash = bearer(request, "ops")?;
            if !hash.constant_time_eq(&self.ops_token) {
                return Err(Status::unauthenticated(
                    "ops token not recognised; use the token from INGEST_OPS_TOKEN, --ops-token-file or <data-dir>/ops.token",
                ));
            }
            request.extensions_mut().insert(Operator);
        }
        Ok(())
    }

    async fn device(&self, hash: &TokenHash) -> Result<DeviceKey, Status> {
        if let Some(device) = self.devices.read().expect("lock poisoned").get(hash) {
            return Ok(device.clone());
        }
        match self.store.device_by_token(hash).await {
            Ok(Some(device)) => {
                self.devices
                    .write()
                    .expect("lock poisoned")
                    .insert(*hash, device.clone());
                Ok(device)
            }
            Ok(None) => Err(Status::unauthenticated(
                "device token not recognised; use the token RegisterDevice returned for this device",
            )),
            Err(error) => {
                tracing::error!(%error, "device token lookup failed");
                Err(Status::unavailable(
                    "cannot check credentials right now; retry",
                ))
            }
        }
    }
}

/// Reads `authorization: Bearer <token>` and hashes the token at once, so
/// the secret itself goes no further.
fn bearer<B>(request: &http::Request<B>, kind: &str) -> Result<TokenHash, Status> {
    let missing = || {
        Status::unauthenticated(format!(
            "missing credential: send metadata `authorization: Bearer <{kind} token>`"
        ))
    };
    let value = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .ok_or_else(missing)?;
    let value = value.to_str().map_err(|_| missing())?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(missing)?;
    Ok(TokenHash::of(token))
}

/// Installs [`Authenticator`] in front of every service.
#[derive(Clone)]
pub struct AuthLayer {
    auth: Arc<Authenticator>,
}

impl AuthLayer {
    pub fn new(auth: Arc<Authenticator>) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    auth: Arc<Authenticator>,
}

impl<S, B> Service<http::Request<B>> for AuthService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone is not ready; keep the ready one for this call (the
        // tower idiom for services used from a future).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let auth = self.auth.clone();
        Box::pin(async move {
            match auth.check(&mut request).await {
                Ok(()) => inner.call(request).await,
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}
