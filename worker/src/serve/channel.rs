//! The worker's connection to a coordinator: its token on every call, TLS for `https://` URLs,
//! a deadline on every call and keepalives, so a dead coordinator or a silently dropped
//! connection fails a call (and the worker retries or fails over) instead of hanging it.

use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// Extra time a call gets beyond the `LeaseJob` long poll, so the poll is never cut short.
const DEADLINE_MARGIN: Duration = Duration::from_secs(30);

/// Sends `authorization: Bearer TOKEN` on every call (nothing without a token).
#[derive(Clone, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(token)" } else { "Bearer(none)" })
    }
}

impl Bearer {
    /// Sends `token`, if any; `None` when it cannot be an HTTP header value.
    pub fn new(token: Option<&str>) -> Option<Self> {
        match token {
            None => Some(Bearer(None)),
            Some(t) => format!("Bearer {t}").parse().ok().map(|h| Bearer(Some(h))),
        }
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.0 {
            request.metadata_mut().insert("authorization", h.clone());
        }
        Ok(request)
    }
}

/// The endpoint for `url`: TLS for `https://` (trusting `ca`, PEM, or else the system's roots),
/// a deadline of `lease_wait` plus a margin on every call (`LeaseJob` polls up to `lease_wait`),
/// HTTP/2 keepalive pings every 30 s and TCP keepalive.
pub fn endpoint(url: &str, ca: Option<&[u8]>, lease_wait: Duration) -> Result<Endpoint, tonic::transport::Error> {
    let endpoint = Endpoint::from_shared(url.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(lease_wait + DEADLINE_MARGIN)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .tcp_keepalive(Some(Duration::from_secs(60)));
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let tls = match ca {
        Some(pem) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)),
        None => ClientTlsConfig::new().with_native_roots(),
    };
    endpoint.tls_config(tls)
}
