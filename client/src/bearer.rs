//! The bearer token every call carries: a device's token on its uploads
//! and Control stream, the ops token on operator calls.

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Adds `authorization: Bearer <token>` to every call of a client
/// (`IngestClient::with_interceptor(channel, bearer)`), or to one request
/// built by hand ([`Bearer::authorize`]).
#[derive(Clone)]
pub struct Bearer {
    /// `None` sends no header at all: how tests call without credentials.
    header: Option<AsciiMetadataValue>,
}

/// A token that cannot travel in an HTTP header.
#[derive(Debug, thiserror::Error)]
#[error("token contains characters not allowed in a header")]
pub struct InvalidToken;

impl Bearer {
    /// The header for `token`, trimmed: a token read from a file usually
    /// ends with a newline.
    pub fn new(token: &str) -> Result<Self, InvalidToken> {
        let mut header: AsciiMetadataValue = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| InvalidToken)?;
        // Keeps the token out of HPACK tables and out of debug output.
        header.set_sensitive(true);
        Ok(Self {
            header: Some(header),
        })
    }

    /// No `authorization` header: a client that presents no token.
    pub fn none() -> Self {
        Self { header: None }
    }

    /// Adds the header to `request`, for calls made without a generated
    /// client (`tonic::client::Grpc` with hand-made bytes).
    pub fn authorize<T>(&self, request: &mut Request<T>) {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.header {
            Some(_) => f.write_str("Bearer(<redacted>)"),
            None => f.write_str("Bearer(none)"),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        self.authorize(&mut request);
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_bearer_header() {
        let mut auth = Bearer::new(" abc123 \n").expect("valid token");
        let request = auth.call(Request::new(())).expect("intercepted");
        let header = request.metadata().get("authorization").expect("header set");
        assert_eq!(header.to_str().expect("ascii"), "Bearer abc123");
    }

    #[test]
    fn rejects_tokens_that_cannot_be_headers() {
        assert!(Bearer::new("bad\u{7f}token").is_err());
    }

    #[test]
    fn none_sends_no_header_and_no_token_is_printed() {
        let mut none = Bearer::none();
        let request = none.call(Request::new(())).expect("intercepted");
        assert!(request.metadata().get("authorization").is_none());
        let debug = format!("{:?}", Bearer::new("secret").expect("valid token"));
        assert!(!debug.contains("secret"), "{debug}");
    }
}
