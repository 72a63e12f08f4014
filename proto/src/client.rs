//! How a client of the contract reaches a coordinator: its token (from `PRUNESWEEP_TOKEN` or a
//! token file), sent as `authorization: Bearer TOKEN` on every call, and an endpoint with TLS for
//! `https://` URLs, a deadline on every call and keepalives, so a dead coordinator or a silently
//! dropped connection fails a call instead of hanging it. The CLI and the workers both connect
//! this way; the coordinator reads its own token files with [`read_tokens`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

/// The environment variable a client's token is read from (before `--token-file`).
pub const TOKEN_ENV: &str = "PRUNESWEEP_TOKEN";

/// Why a client cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A token or certificate file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A token file holds no token.
    #[error("{}: no token in it (one token per line; `#` starts a comment)", .0.display())]
    NoToken(PathBuf),
    /// A token holds characters an HTTP header cannot carry.
    #[error("{0}: a token must be printable ASCII without spaces")]
    BadToken(String),
    /// The coordinator URL does not parse.
    #[error("--coordinator `{0}` is not a URL like http://host:50051 or https://host:50051")]
    BadUrl(String),
    /// The TLS settings of an endpoint were refused.
    #[error("TLS settings for {url}: {source}")]
    Tls {
        /// The coordinator URL.
        url: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// The tokens in `path`: one per line, blank lines and `#` comments skipped; at least one, each
/// printable ASCII.
pub fn read_tokens(path: &Path) -> Result<Vec<String>, ClientError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClientError::Read { path: path.into(), source })?;
    let tokens: Vec<String> = text
        .lines()
        .map(|l| l.split_once('#').map_or(l, |(before, _)| before).trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if tokens.is_empty() {
        return Err(ClientError::NoToken(path.into()));
    }
    for t in &tokens {
        check_token(t, &path.display().to_string())?;
    }
    Ok(tokens)
}

fn check_token(token: &str, source: &str) -> Result<(), ClientError> {
    if token.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ClientError::BadToken(source.to_string()))
    }
}

/// A client's token: `PRUNESWEEP_TOKEN` if set, else the first token in `token_file`, else none.
pub fn token(token_file: Option<&Path>) -> Result<Option<String>, ClientError> {
    if let Some(token) = std::env::var(TOKEN_ENV).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty()) {
        check_token(&token, TOKEN_ENV)?;
        return Ok(Some(token));
    }
    match token_file {
        Some(path) => Ok(read_tokens(path)?.into_iter().next()),
        None => Ok(None),
    }
}

/// Sends `authorization: Bearer TOKEN` on every call (nothing without a token).
#[derive(Clone, Default)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Bearer(token)" } else { "Bearer(none)" })
    }
}

impl Bearer {
    /// Sends `token`, if any.
    pub fn new(token: Option<&str>) -> Result<Self, ClientError> {
        let header = token
            .map(|t| format!("Bearer {t}").parse().map_err(|_| ClientError::BadToken("the token".into())))
            .transpose()?;
        Ok(Bearer(header))
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
/// `timeout` on every call, a 5 s connect timeout, HTTP/2 keepalive pings every 30 s (a connection
/// closed after 20 s without an answer) and TCP keepalive.
pub fn endpoint(url: &str, ca: Option<&[u8]>, timeout: Duration) -> Result<Endpoint, ClientError> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|_| ClientError::BadUrl(url.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(timeout)
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
    endpoint.tls_config(tls).map_err(|source| ClientError::Tls { url: url.to_string(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_skip_comments_and_blanks() {
        let dir = std::env::temp_dir().join(format!("prunesweep-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens");
        std::fs::write(&path, "# users\n\n  alpha  \nbeta # the CI\n").unwrap();
        assert_eq!(read_tokens(&path).unwrap(), ["alpha", "beta"]);
        std::fs::write(&path, "# nothing\n").unwrap();
        assert!(matches!(read_tokens(&path), Err(ClientError::NoToken(_))));
        std::fs::write(&path, "tab\there\n").unwrap();
        assert!(matches!(read_tokens(&path), Err(ClientError::BadToken(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
