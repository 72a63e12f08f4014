//! Tokens, roles, TLS and the health service over gRPC: a real coordinator on 127.0.0.1:0
//! ([`server::serve`] with a [`Security`]) on SQLite, and the generated clients.

use std::path::Path;
use std::time::Duration;

use prunesweep_coordinator::auth::{self, AuthError, Security, Tokens};
use prunesweep_coordinator::server;
use prunesweep_coordinator::testing::{self, TestStore, TINY};
use prunesweep_proto::client::{Bearer, TOKEN_ENV};
use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use prunesweep_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ServerTlsConfig};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const USER: &str = "user-secret-1";
const WORKER: &str = "worker-secret-1";

type Sweeps = SweepServiceClient<InterceptedService<Channel, Bearer>>;
type Workers = WorkerServiceClient<InterceptedService<Channel, Bearer>>;

/// A coordinator serving a fresh SQLite store with `security`.
struct Server {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    _store: TestStore,
}

impl Server {
    async fn start(security: Security) -> Server {
        let store = testing::sqlite().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if security.tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().unwrap());
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async {
            let _ = rx.await;
        };
        let serving = server::serve(listener, store.store.clone(), testing::fast_config(), security, shutdown);
        let task = tokio::spawn(async move { serving.await.expect("server") });
        Server { url, stop, task, _store: store }
    }

    async fn with_tokens() -> Server {
        Server::start(Security { tokens: Tokens::new(&[USER, "user-secret-2"], &[WORKER]), tls: None }).await
    }

    async fn channel(&self, ca: Option<&Path>) -> Result<Channel, tonic::transport::Error> {
        auth::client_endpoint(&self.url, ca, Duration::from_secs(10)).unwrap().connect().await
    }

    async fn clients(&self, token: Option<&str>) -> (Sweeps, Workers) {
        let channel = self.channel(None).await.unwrap();
        let auth = Bearer::new(token).unwrap();
        (
            SweepServiceClient::with_interceptor(channel.clone(), auth.clone()),
            WorkerServiceClient::with_interceptor(channel, auth),
        )
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}

fn submit() -> pb::SubmitSweepRequest {
    pb::SubmitSweepRequest { yaml: TINY.into(), file_name: Some("tiny.yaml".into()) }
}

fn register() -> pb::RegisterRequest {
    pb::RegisterRequest { name: "w".into(), device: "cpu".into(), memory_bytes: None, version: "test".into() }
}

/// The status of every RPC of both services, called with requests the interceptor sees first.
async fn every_call(sweeps: &mut Sweeps, workers: &mut Workers) -> Vec<(&'static str, Result<(), tonic::Status>)> {
    let sweep = || "tiny".to_string();
    vec![
        ("SubmitSweep", sweeps.submit_sweep(submit()).await.map(drop)),
        ("GetSweep", sweeps.get_sweep(pb::GetSweepRequest { sweep: sweep() }).await.map(drop)),
        ("ListSweeps", sweeps.list_sweeps(pb::ListSweepsRequest {}).await.map(drop)),
        ("CancelSweep", sweeps.cancel_sweep(pb::CancelSweepRequest { sweep: sweep() }).await.map(drop)),
        (
            "RetrySweep",
            sweeps.retry_sweep(pb::RetrySweepRequest { sweep: sweep(), include_cancelled: true }).await.map(drop),
        ),
        ("WatchSweep", sweeps.watch_sweep(pb::WatchSweepRequest { sweep: sweep(), after_seq: 0 }).await.map(drop)),
        (
            "ListResults",
            sweeps.list_results(pb::ListResultsRequest { sweep: sweep(), ..Default::default() }).await.map(drop),
        ),
        ("ListWorkers", sweeps.list_workers(pb::ListWorkersRequest {}).await.map(drop)),
        ("Register", workers.register(register()).await.map(drop)),
        (
            "LeaseJob",
            workers.lease_job(pb::LeaseJobRequest { worker_id: "w".into(), ..Default::default() }).await.map(drop),
        ),
        ("Heartbeat", workers.heartbeat(pb::HeartbeatRequest::default()).await.map(drop)),
        ("CompleteJob", workers.complete_job(pb::CompleteJobRequest::default()).await.map(drop)),
        ("FailJob", workers.fail_job(pb::FailJobRequest::default()).await.map(drop)),
    ]
}

#[tokio::test]
async fn calls_without_a_valid_token_are_unauthenticated() {
    let server = Server::with_tokens().await;
    for token in [None, Some("not-a-token"), Some("")] {
        let (mut sweeps, mut workers) = server.clients(token).await;
        for (call, result) in every_call(&mut sweeps, &mut workers).await {
            let status = result.expect_err(call);
            assert_eq!(status.code(), Code::Unauthenticated, "{call} with {token:?}: {status:?}");
            assert!(status.message().contains(TOKEN_ENV), "{call}: {}", status.message());
            assert!(status.message().contains("--token-file"), "{call}: {}", status.message());
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn wrong_role_is_permission_denied() {
    let server = Server::with_tokens().await;
    // A worker token on SweepService.
    let (mut sweeps, _) = server.clients(Some(WORKER)).await;
    let status = sweeps.submit_sweep(submit()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("user token"), "{}", status.message());
    let status = sweeps.cancel_sweep(pb::CancelSweepRequest { sweep: "tiny".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    let status = sweeps.list_workers(pb::ListWorkersRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // A user token on WorkerService.
    let (_, mut workers) = server.clients(Some(USER)).await;
    let status = workers.register(register()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("worker token"), "{}", status.message());
    let lease = pb::LeaseJobRequest { worker_id: "w".into(), wait_ms: 0, ..Default::default() };
    assert_eq!(workers.lease_job(lease).await.unwrap_err().code(), Code::PermissionDenied);
    let status = workers.complete_job(pb::CompleteJobRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    server.stop().await;
}

#[tokio::test]
async fn right_role_passes() {
    let server = Server::with_tokens().await;
    let (mut sweeps, _) = server.clients(Some("user-secret-2")).await;
    let reply = sweeps.submit_sweep(submit()).await.unwrap().into_inner();
    assert!(reply.created && reply.jobs_added > 0);
    let listed = sweeps.list_sweeps(pb::ListSweepsRequest {}).await.unwrap().into_inner();
    assert_eq!(listed.sweeps.len(), 1);
    let (_, mut workers) = server.clients(Some(WORKER)).await;
    let worker_id = workers.register(register()).await.unwrap().into_inner().worker_id;
    let lease = pb::LeaseJobRequest { worker_id, wait_ms: 0, ..Default::default() };
    let leased = workers.lease_job(lease).await.unwrap().into_inner();
    assert!(leased.lease.is_some(), "the score job is ready: {leased:?}");
    let status = sweeps.get_sweep(pb::GetSweepRequest { sweep: "tiny".into() }).await.unwrap().into_inner();
    assert_eq!(status.leased, 1);
    server.stop().await;
}

#[tokio::test]
async fn health_answers_without_a_token() {
    let server = Server::with_tokens().await;
    let mut health = HealthClient::new(server.channel(None).await.unwrap());
    for service in ["", "prunesweep.v1.SweepService", "prunesweep.v1.WorkerService"] {
        let reply = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(reply.status(), ServingStatus::Serving, "service {service:?}");
    }
    server.stop().await;
}

/// A self-signed certificate for 127.0.0.1 and localhost, written as `cert.pem` and `key.pem`.
fn certificate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let generated = rcgen::generate_simple_self_signed(names).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

async fn tls_server(dir: &Path) -> (Server, std::path::PathBuf) {
    let (cert, key) = certificate(dir);
    let tls: Option<ServerTlsConfig> = auth::server_tls(Some(&cert), Some(&key)).unwrap();
    let security = Security { tokens: Tokens::new(&[USER], &[WORKER]), tls };
    (Server::start(security).await, cert)
}

#[tokio::test]
async fn tls_round_trip_with_a_trusted_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (server, cert) = tls_server(dir.path()).await;
    assert!(server.url.starts_with("https://"));
    let channel = server.channel(Some(&cert)).await.unwrap();
    let mut sweeps = SweepServiceClient::with_interceptor(channel, Bearer::new(Some(USER)).unwrap());
    let reply = sweeps.submit_sweep(submit()).await.unwrap().into_inner();
    assert!(reply.created);
    let status = sweeps.get_sweep(pb::GetSweepRequest { sweep: "tiny".into() }).await.unwrap().into_inner();
    assert_eq!(status.name, "tiny");
    server.stop().await;
}

#[tokio::test]
async fn tls_client_that_does_not_trust_the_certificate_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _) = tls_server(dir.path()).await;
    let other = tempfile::tempdir().unwrap();
    let (untrusted_ca, _) = certificate(other.path());
    let refused = match server.channel(Some(&untrusted_ca)).await {
        Err(_) => true,
        Ok(channel) => {
            let mut sweeps = SweepServiceClient::with_interceptor(channel, Bearer::new(Some(USER)).unwrap());
            sweeps.list_sweeps(pb::ListSweepsRequest {}).await.is_err()
        }
    };
    assert!(refused, "a client trusting another CA reached the coordinator");
    // Nor does a plain-text client get an answer.
    let plain = server.url.replace("https://", "http://");
    let answered = match SweepServiceClient::connect(plain).await {
        Err(_) => false,
        Ok(mut sweeps) => sweeps.list_sweeps(pb::ListSweepsRequest {}).await.is_ok(),
    };
    assert!(!answered, "a plain-text client got an answer from the TLS coordinator");
    server.stop().await;
}

#[test]
fn non_loopback_bind_without_tokens_is_refused() {
    let any = "0.0.0.0:50051".parse().unwrap();
    let err = auth::check_exposure(any, &Tokens::none(), false).unwrap_err();
    assert!(matches!(err, AuthError::Exposed(_)));
    let message = err.to_string();
    assert!(message.contains("--insecure") && message.contains("--token-file"), "{message}");
    assert!(auth::check_exposure(any, &Tokens::none(), true).is_ok());
    assert!(auth::check_exposure(any, &Tokens::new(&[USER], &[WORKER]), false).is_ok());
    assert!(auth::check_exposure("127.0.0.1:0".parse().unwrap(), &Tokens::none(), false).is_ok());
    assert!(matches!(Tokens::from_files(Some(Path::new("users")), None), Err(AuthError::OneRole)));
}

#[tokio::test]
async fn the_call_deadline_does_not_cut_a_watch_stream() {
    let server = Server::with_tokens().await;
    let channel =
        auth::client_endpoint(&server.url, None, Duration::from_millis(500)).unwrap().connect().await.unwrap();
    let mut sweeps = SweepServiceClient::with_interceptor(channel, Bearer::new(Some(USER)).unwrap());
    sweeps.submit_sweep(submit()).await.unwrap();
    let request = pb::WatchSweepRequest { sweep: "tiny".into(), after_seq: 0 };
    let mut stream = sweeps.watch_sweep(request).await.unwrap().into_inner();
    // Drain what is there, then idle past the deadline: the stream stays open.
    let idle = async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => {}
                ended => return ended.map(drop),
            }
        }
    };
    let outcome = tokio::time::timeout(Duration::from_millis(1500), idle).await;
    assert!(outcome.is_err(), "the watch stream ended within 1.5 s: {outcome:?}");
    // Graceful shutdown waits for open streams.
    drop(stream);
    server.stop().await;
}
