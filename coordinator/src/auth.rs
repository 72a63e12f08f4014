//! Who may call what: bearer tokens in two roles, TLS, and when serving without them is refused.
//!
//! Users (`SweepService`: submit, status, cancel, retry, results, workers) and workers
//! (`WorkerService`: register, lease, heartbeat, complete, fail) each present a bearer token in
//! the `authorization` header; [`Tokens`] checks it on every call through a tonic interceptor
//! ([`Tokens::interceptor`]). A missing or unknown token is `UNAUTHENTICATED`; a valid token of
//! the other role is `PERMISSION_DENIED`. Tokens are compared as SHA-256 digests in constant time.
//! With no token files, nothing is checked (a coordinator on loopback, `coordinator run`); then
//! [`check_exposure`] refuses a non-loopback listener unless the operator says `--insecure`.
//!
//! The client half (token, `Bearer`, endpoint) is the contract's, [`client`], shared with the
//! workers; [`client_endpoint`] reads the `--ca` file for it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prunesweep_proto::client::{self, ClientError, TOKEN_ENV};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::service::Interceptor;
use tonic::transport::{Endpoint, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// Errors reading tokens or certificates, or a listener that would be exposed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// A token, certificate or key file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A token file cannot be used, or a client endpoint cannot be set up.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Only one of the two token files was given.
    #[error("pass both --token-file (users) and --worker-token-file (workers), or neither")]
    OneRole,
    /// `--tls-cert` without `--tls-key` or the reverse.
    #[error("pass both --tls-cert and --tls-key, or neither")]
    HalfTls,
    /// A non-loopback listener without tokens.
    #[error(
        "refusing to serve on {0} without tokens: anyone who can reach it could submit, cancel or \
         complete jobs and read every job's paths. Pass --token-file and --worker-token-file (and \
         --tls-cert/--tls-key off a trusted network), listen on 127.0.0.1, or pass --insecure to \
         serve a trusted network anyway"
    )]
    Exposed(SocketAddr),
}

/// Who a caller is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Submits and follows sweeps (`SweepService`).
    User,
    /// Leases and runs jobs (`WorkerService`).
    Worker,
}

impl Role {
    fn other(self) -> Role {
        match self {
            Role::User => Role::Worker,
            Role::Worker => Role::User,
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Worker => "worker",
        }
    }

    fn service(self) -> &'static str {
        match self {
            Role::User => "SweepService",
            Role::Worker => "WorkerService",
        }
    }

    fn file_flag(self) -> &'static str {
        match self {
            Role::User => "--token-file",
            Role::Worker => "--worker-token-file",
        }
    }
}

/// The accepted tokens of both roles, as SHA-256 digests; [`Tokens::none`] accepts every call.
#[derive(Clone, Default)]
pub struct Tokens {
    inner: Option<Arc<RoleTokens>>,
}

struct RoleTokens {
    users: Vec<[u8; 32]>,
    workers: Vec<[u8; 32]>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            None => f.write_str("Tokens(none)"),
            Some(t) => write!(f, "Tokens({} user, {} worker)", t.users.len(), t.workers.len()),
        }
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

/// Whether `token` is one of `set`, in time that depends only on the size of `set`.
fn contains(set: &[[u8; 32]], token: &[u8; 32]) -> bool {
    set.iter().fold(subtle::Choice::from(0), |found, t| found | t.ct_eq(token)).into()
}

impl Tokens {
    /// No authentication: every call passes.
    pub fn none() -> Self {
        Tokens::default()
    }

    /// These user and worker tokens (each list non-empty).
    pub fn new<U: AsRef<str>, W: AsRef<str>>(users: &[U], workers: &[W]) -> Self {
        let users = users.iter().map(|t| digest(t.as_ref().as_bytes())).collect();
        let workers = workers.iter().map(|t| digest(t.as_ref().as_bytes())).collect();
        Tokens { inner: Some(Arc::new(RoleTokens { users, workers })) }
    }

    /// From `serve`'s `--token-file` and `--worker-token-file`: both or neither.
    pub fn from_files(users: Option<&Path>, workers: Option<&Path>) -> Result<Self, AuthError> {
        match (users, workers) {
            (None, None) => Ok(Tokens::none()),
            (Some(u), Some(w)) => Ok(Tokens::new(&client::read_tokens(u)?, &client::read_tokens(w)?)),
            _ => Err(AuthError::OneRole),
        }
    }

    /// Whether tokens are checked.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Checks the bearer token in `metadata` for a call that needs `role`.
    pub fn check(&self, role: Role, metadata: &MetadataMap) -> Result<(), Status> {
        let Some(tokens) = &self.inner else { return Ok(()) };
        let set = |r: Role| match r {
            Role::User => &tokens.users,
            Role::Worker => &tokens.workers,
        };
        let how = match role {
            Role::User => format!("pass a user token with --token-file FILE or {TOKEN_ENV}"),
            Role::Worker => format!(
                "pass a worker token (from the coordinator's {}) with --token-file FILE or {TOKEN_ENV}",
                role.file_flag()
            ),
        };
        let presented = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
        let Some(presented) = presented else {
            return Err(Status::unauthenticated(format!("this coordinator needs a token: {how}")));
        };
        let presented = digest(presented.trim().as_bytes());
        let mine = contains(set(role), &presented);
        let other = contains(set(role.other()), &presented);
        if mine {
            Ok(())
        } else if other {
            Err(Status::permission_denied(format!(
                "a {} token cannot call {}: {how}",
                role.other().noun(),
                role.service()
            )))
        } else {
            Err(Status::unauthenticated(format!("the token was not accepted: {how}")))
        }
    }

    /// The interceptor that checks every call of a service whose callers have `role`.
    pub fn interceptor(&self, role: Role) -> ServerAuth {
        ServerAuth { tokens: self.clone(), role }
    }
}

/// Server-side interceptor: [`Tokens::check`] for one role.
#[derive(Clone, Debug)]
pub struct ServerAuth {
    tokens: Tokens,
    role: Role,
}

impl Interceptor for ServerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        self.tokens.check(self.role, request.metadata())?;
        Ok(request)
    }
}

/// Refuses to serve on a non-loopback `addr` without tokens, unless `insecure`.
pub fn check_exposure(addr: SocketAddr, tokens: &Tokens, insecure: bool) -> Result<(), AuthError> {
    if addr.ip().is_loopback() || tokens.enabled() || insecure {
        Ok(())
    } else {
        Err(AuthError::Exposed(addr))
    }
}

/// How `run` serves: tokens (default none) and TLS (default plain HTTP/2).
#[derive(Debug, Clone, Default)]
pub struct Security {
    /// Accepted tokens.
    pub tokens: Tokens,
    /// The server's certificate chain and key.
    pub tls: Option<ServerTlsConfig>,
}

/// The server's TLS settings from `--tls-cert` and `--tls-key` (PEM files): both or neither.
pub fn server_tls(cert: Option<&Path>, key: Option<&Path>) -> Result<Option<ServerTlsConfig>, AuthError> {
    match (cert, key) {
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => {
            let identity = Identity::from_pem(read(cert)?, read(key)?);
            Ok(Some(ServerTlsConfig::new().identity(identity)))
        }
        _ => Err(AuthError::HalfTls),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|source| AuthError::Read { path: path.to_path_buf(), source })
}

/// A client endpoint for `url`: [`client::endpoint`] with the CA certificate read from `ca`.
pub fn client_endpoint(url: &str, ca: Option<&Path>, timeout: Duration) -> Result<Endpoint, AuthError> {
    let ca = ca.map(read).transpose()?;
    Ok(client::endpoint(url, ca.as_deref(), timeout)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(token: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("authorization", format!("Bearer {token}").parse().unwrap());
        m
    }

    #[test]
    fn roles_and_codes() {
        let t = Tokens::new(&["u1", "u2"], &["w1"]);
        assert!(t.check(Role::User, &bearer("u2")).is_ok());
        assert!(t.check(Role::Worker, &bearer("w1")).is_ok());
        assert_eq!(t.check(Role::User, &bearer("w1")).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(t.check(Role::Worker, &bearer("u1")).unwrap_err().code(), tonic::Code::PermissionDenied);
        assert_eq!(t.check(Role::User, &bearer("nope")).unwrap_err().code(), tonic::Code::Unauthenticated);
        let missing = t.check(Role::User, &MetadataMap::new()).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::Unauthenticated);
        assert!(missing.message().contains("--token-file") && missing.message().contains(TOKEN_ENV));
        assert!(Tokens::none().check(Role::Worker, &MetadataMap::new()).is_ok());
    }

    #[test]
    fn exposure() {
        let any: SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let err = check_exposure(any, &Tokens::none(), false).unwrap_err();
        assert!(err.to_string().contains("--insecure") && err.to_string().contains("--token-file"));
        assert!(check_exposure(any, &Tokens::none(), true).is_ok());
        assert!(check_exposure(any, &Tokens::new(&["u"], &["w"]), false).is_ok());
        assert!(check_exposure(local, &Tokens::none(), false).is_ok());
        assert!(check_exposure("[::1]:1".parse().unwrap(), &Tokens::none(), false).is_ok());
    }
}
