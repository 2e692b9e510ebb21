//! Bearer-token metadata for every call on a client.

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Adds `authorization: Bearer <token>` to each request.
#[derive(Clone)]
pub struct BearerAuth {
    header: AsciiMetadataValue,
}

impl BearerAuth {
    pub fn new(token: &str) -> anyhow::Result<Self> {
        let mut header: AsciiMetadataValue = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| anyhow::anyhow!("token contains characters not allowed in a header"))?;
        // Keeps the token out of HPACK tables and out of debug output.
        header.set_sensitive(true);
        Ok(Self { header })
    }
}

impl std::fmt::Debug for BearerAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerAuth(<redacted>)")
    }
}

impl Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.header.clone());
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_bearer_header() {
        let mut auth = BearerAuth::new(" abc123 \n").expect("valid token");
        let request = auth.call(Request::new(())).expect("intercepted");
        let header = request.metadata().get("authorization").expect("header set");
        assert_eq!(header.to_str().expect("ascii"), "Bearer abc123");
    }

    #[test]
    fn rejects_tokens_that_cannot_be_headers() {
        assert!(BearerAuth::new("bad\u{7f}token").is_err());
    }
}
