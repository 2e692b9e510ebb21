//! The tower layer that authenticates every gRPC call by its path:
//! `telemetry.v1.Ingest` needs a device token, `telemetry.v1.Ops` the ops
//! token; health and reflection are open so generic tools work.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tower::{Layer, Service};
use tracing::Instrument;

use super::credentials::{AuthFailure, Credentials};
use super::ops_token::OpsTokens;
use crate::domain::TokenHash;
use crate::metrics::{Metrics, ReasonLabel};
use crate::transport::ConnectionInfo;

const INGEST_PREFIX: &str = "/telemetry.v1.Ingest/";
const OPS_PREFIX: &str = "/telemetry.v1.Ops/";

/// Marks a call authenticated with an ops token, and which one.
#[derive(Debug, Clone)]
pub struct Operator {
    pub token_name: Arc<str>,
}

/// Checks credentials: devices' through [`Credentials`] (certificate or
/// token, remembered so a device's steady calls cost a hash and a map
/// lookup), operators' against the named ops tokens.
pub struct Authenticator {
    ops: Arc<OpsTokens>,
    devices: Arc<Credentials>,
    metrics: Arc<Metrics>,
}

/// What a call needs before its handler runs.
enum Checked {
    Open,
    Device,
    Ops(Arc<str>),
}

impl Authenticator {
    pub fn new(ops: Arc<OpsTokens>, devices: Arc<Credentials>, metrics: Arc<Metrics>) -> Self {
        Self {
            ops,
            devices,
            metrics,
        }
    }

    async fn check<B>(&self, request: &mut http::Request<B>) -> Result<Checked, AuthFailure> {
        let path = request.uri().path();
        if path.starts_with(INGEST_PREFIX) {
            let token = bearer(request).transpose()?;
            let certificate = request
                .extensions()
                .get::<ConnectionInfo>()
                .and_then(|c| c.client_certificate.clone());
            let device = self
                .devices
                .authenticate(certificate.as_deref(), token)
                .await?;
            request.extensions_mut().insert(device);
            Ok(Checked::Device)
        } else if path.starts_with(OPS_PREFIX) {
            let hash = bearer(request).ok_or(AuthFailure::Missing("ops"))??;
            let token_name = self.ops.check(&hash).ok_or(AuthFailure::UnknownOpsToken)?;
            request.extensions_mut().insert(Operator {
                token_name: token_name.clone(),
            });
            Ok(Checked::Ops(token_name))
        } else {
            Ok(Checked::Open)
        }
    }
}

/// Reads `authorization: Bearer <token>` and hashes the token at once, so
/// the secret itself goes no further. `None` when there is no such header;
/// an error when it is there but not a bearer token, or an empty one.
fn bearer<B>(request: &http::Request<B>) -> Option<Result<TokenHash, AuthFailure>> {
    let value = request.headers().get(http::header::AUTHORIZATION)?;
    // `Bearer` alone counts as an empty token too: a trailing space may not
    // survive the way here.
    let token = value.to_str().ok().and_then(|value| {
        value
            .strip_prefix("Bearer")
            .or_else(|| value.strip_prefix("bearer"))
            .filter(|rest| rest.is_empty() || rest.starts_with(' '))
            .map(str::trim)
    });
    Some(match token {
        None => Err(AuthFailure::MalformedAuthorization),
        Some("") => Err(AuthFailure::EmptyToken),
        Some(token) => Ok(TokenHash::of(token)),
    })
}

/// Whether an Ops method changes something, so that its call is logged
/// with the operator's token name. Reads are logged at debug level.
fn is_ops_action(method: &str) -> bool {
    !["Get", "List", "Watch", "Query"]
        .iter()
        .any(|read| method.starts_with(read))
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
                Ok(Checked::Open | Checked::Device) => inner.call(request).await,
                Ok(Checked::Ops(operator)) => {
                    let method = request
                        .uri()
                        .path()
                        .trim_start_matches(OPS_PREFIX)
                        .to_owned();
                    if is_ops_action(&method) {
                        tracing::info!(%operator, %method, "ops action");
                    } else {
                        tracing::debug!(%operator, %method, "ops read");
                    }
                    // The handler's own logs carry the operator too.
                    let span = tracing::info_span!("ops", %operator, %method);
                    inner.call(request).instrument(span).await
                }
                Err(failure) => {
                    tracing::debug!(%failure, "call refused");
                    auth.metrics
                        .auth_failures
                        .get_or_create(&ReasonLabel {
                            reason: failure.reason(),
                        })
                        .inc();
                    Ok(Status::from(failure).into_http())
                }
            }
        })
    }
}
