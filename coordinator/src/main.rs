//! `coordinator`: serve the job store over gRPC, and the client commands that talk to it.
//!
//! ```sh
//! coordinator serve                                   # SQLite at results/coordinator.sqlite, :50051
//! coordinator serve --database postgres://postgres@127.0.0.1:5432/test --listen 0.0.0.0:50051 \
//!     --token-file users.tokens --worker-token-file workers.tokens --tls-cert cert.pem --tls-key key.pem
//! coordinator serve --http 127.0.0.1:8080 --metrics-listen 127.0.0.1:8080   # + the sweep page and /metrics
//! coordinator plan experiments/tiny-test.yaml           # the jobs and every resolved setting
//! coordinator submit experiments/tiny-test.yaml
//! coordinator status                                  # every sweep
//! coordinator status tiny-test --watch                # counts + progress bar until done
//! coordinator workers                                 # registered workers and their jobs
//! coordinator cancel tiny-test
//! coordinator retry tiny-test --failed
//! coordinator export tiny-test --format csv --out results/tiny-test/results.csv
//! coordinator plot tiny-test --out results/tiny-test/plots
//! coordinator plot --from results/tiny-test               # the same, from the export alone
//! coordinator run experiments/tiny-test.yaml --workers 2   # embedded coordinator + local workers
//! ```
//!
//! Every flag also reads an environment variable (`PRUNESWEEP_LISTEN`, `PRUNESWEEP_DATABASE`,
//! `PRUNESWEEP_COORDINATOR`, `PRUNESWEEP_TOKEN_FILE`, `PRUNESWEEP_CA`); clients take their token
//! from `PRUNESWEEP_TOKEN` before `--token-file`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use pb::sweep_service_client::SweepServiceClient;
use prunesweep_coordinator::auth::{self, Security, Tokens};
use prunesweep_coordinator::export::{self, Format};
use prunesweep_coordinator::plan;
use prunesweep_coordinator::server::HttpListeners;
use prunesweep_coordinator::store::{self, DEFAULT_DATABASE_URL};
use prunesweep_coordinator::sweep::{self, SweepSpec};
use prunesweep_coordinator::web::view::Counts;
use prunesweep_coordinator::Config;
use prunesweep_proto::client::{self, Bearer};
use prunesweep_proto::v1 as pb;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

mod cli;

use cli::figures::{plot_from_export, write_figures};
use cli::local::run_local;
use cli::tables::{eta, print_failed, print_running, print_table, print_workers};
use cli::watch::watch;

/// A `SweepService` client that sends the user's token on every call.
type Client = SweepServiceClient<InterceptedService<Channel, Bearer>>;

#[derive(Parser)]
#[command(name = "coordinator", version, about = "prunesweep coordinator: sweeps, job store, leases over gRPC")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// The coordinator's URL (`https://` with TLS).
    #[arg(long, env = "PRUNESWEEP_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// A file holding the user token (`PRUNESWEEP_TOKEN`, when set, is used instead).
    #[arg(long, env = "PRUNESWEEP_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the coordinator's; default: the system's roots.
    #[arg(long, env = "PRUNESWEEP_CA")]
    ca: Option<PathBuf>,
}

impl ClientArgs {
    /// A coordinator this process started (plain HTTP/2 on loopback, no token).
    fn local(url: String) -> Self {
        ClientArgs { coordinator: url, token_file: None, ca: None }
    }
}

/// `serve`'s tokens and TLS.
#[derive(clap::Args)]
struct SecurityArgs {
    /// User tokens (SweepService), one per line, `#` comments; needs --worker-token-file.
    #[arg(long, env = "PRUNESWEEP_USER_TOKENS")]
    token_file: Option<PathBuf>,
    /// Worker tokens (WorkerService), one per line, `#` comments; needs --token-file.
    #[arg(long, env = "PRUNESWEEP_WORKER_TOKENS")]
    worker_token_file: Option<PathBuf>,
    /// The server's certificate chain (PEM); clients then use https:// (needs --tls-key).
    #[arg(long, env = "PRUNESWEEP_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "PRUNESWEEP_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Serve a non-loopback address without tokens (a trusted network only).
    #[arg(long)]
    insecure: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    Csv,
    Parquet,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the job store over gRPC until Ctrl-C or SIGTERM.
    Serve {
        /// Address to listen on.
        #[arg(long, env = "PRUNESWEEP_LISTEN", default_value = "127.0.0.1:50051")]
        listen: String,
        /// `sqlite://PATH`, a path, or `postgres://...`.
        #[arg(long, env = "PRUNESWEEP_DATABASE", default_value = DEFAULT_DATABASE_URL)]
        database: String,
        /// Lease length without a heartbeat, in seconds.
        #[arg(long, default_value_t = 60)]
        lease_ttl_secs: u64,
        /// The most jobs one submit may plan (models × methods × amounts × heal variants, plus
        /// score and baseline jobs); a bigger sweep is refused before anything is written.
        #[arg(long, default_value_t = sweep::DEFAULT_MAX_JOBS_PER_SUBMIT)]
        max_jobs_per_submit: u64,
        /// Also serve `GET /metrics` (Prometheus text format) on this address, e.g.
        /// 127.0.0.1:9464: plain HTTP without a token. Off when not given.
        #[arg(long, env = "PRUNESWEEP_METRICS_LISTEN")]
        metrics_listen: Option<String>,
        /// Also serve the live sweep page (sweeps, jobs, charts, heatmaps, workers) on this
        /// address, e.g. 127.0.0.1:8080; the same address as --metrics-listen shares one
        /// listener. With tokens, open it once as http://ADDR/?token=USER_TOKEN. Off when not given.
        #[arg(long, env = "PRUNESWEEP_HTTP")]
        http: Option<String>,
        #[command(flatten)]
        security: SecurityArgs,
    },
    /// Show the jobs a sweep file expands to, with every resolved setting (no coordinator needed):
    /// what a submit would store, to check before spending GPU hours.
    Plan {
        /// The sweep file (YAML).
        file: PathBuf,
        /// Print the jobs as JSON (`[{key, depends_on, spec}]`) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Submit a sweep file (adds only the cells the sweep does not have yet).
    Submit {
        /// The sweep file (YAML).
        file: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Job counts and ETA per sweep (one or all) and the workers; for one sweep also its running
    /// jobs (phase, progress, attempt) and failed jobs (attempts, last error): the sweep page as text.
    Status {
        /// The sweep (default: all).
        sweep: Option<String>,
        /// Follow the sweep with a progress bar until it is done.
        #[arg(long, requires = "sweep")]
        watch: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Registered workers: device, memory, version, when each was last seen, the job it holds.
    Workers {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Cancel a sweep: no more leases; running workers are told to stop.
    Cancel {
        /// The sweep.
        sweep: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Requeue a sweep's failed jobs (and cancelled ones, without `--failed`).
    Retry {
        /// The sweep.
        sweep: String,
        /// Only failed jobs.
        #[arg(long)]
        failed: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Accuracy-versus-depth curves, one SVG + PNG per task (like the paper's Figs. 1–3), and a
    /// distance heatmap per scored model (Fig. 4): from the coordinator, or (`--from`) from an
    /// export folder alone, which also gets `results.md`, the results as a Markdown table.
    Plot {
        /// The sweep (read from the coordinator).
        #[arg(required_unless_present = "from")]
        sweep: Option<String>,
        /// An export folder instead: `results.parquet` (or `results.csv`) and `distances.csv`.
        #[arg(long, conflicts_with = "sweep")]
        from: Option<PathBuf>,
        /// Output folder (default with `--from`: FROM/plots).
        #[arg(long, required_unless_present = "from")]
        out: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Single-machine mode: an embedded coordinator (SQLite under the output folder) and N local
    /// `worker serve` processes run the sweep; the results are exported to the output folder.
    Run {
        /// The sweep file (YAML).
        file: PathBuf,
        /// Local workers to start.
        #[arg(long, default_value_t = 1)]
        workers: usize,
        /// Their device: `cpu` (all of them), `cuda` (worker i on `cuda:i`, one per GPU), or
        /// `cuda:N` (all on GPU N).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The worker binary; default: `worker` next to this executable.
        #[arg(long)]
        worker_bin: Option<PathBuf>,
        /// Output folder; default `results/<sweep>`.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write a sweep's results, one row per cell × metric, and the score jobs' distance tables
    /// to `distances.csv` beside them: all `coordinator plot --from` needs.
    Export {
        /// The sweep.
        sweep: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "csv")]
        format: FormatArg,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        client: ClientArgs,
    },
}

/// A client of the coordinator at `args.coordinator`, with its token, TLS, a 5-minute deadline
/// per call (a `status --watch` stream is bounded only by its first reply) and keepalives.
async fn connect(args: &ClientArgs) -> Result<Client> {
    let token = client::token(args.token_file.as_deref())?;
    let endpoint = auth::client_endpoint(&args.coordinator, args.ca.as_deref(), Duration::from_secs(300))?;
    let channel =
        endpoint.connect().await.with_context(|| format!("connecting to the coordinator at {}", args.coordinator))?;
    Ok(SweepServiceClient::with_interceptor(channel, Bearer::new(token.as_deref())?))
}

/// Waits for Ctrl-C or SIGTERM (what Slurm, Kubernetes and systemd send) and names it.
async fn shutdown_signal() -> &'static str {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler needs no privileges");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = term.recv() => "SIGTERM",
    }
}

async fn run(args: Args) -> Result<()> {
    match args.command {
        Command::Serve { listen, database, lease_ttl_secs, max_jobs_per_submit, metrics_listen, http, security } => {
            let config = Config { max_jobs_per_submit, ..Config::for_lease_ttl(Duration::from_secs(lease_ttl_secs)) };
            serve(&listen, metrics_listen.as_deref(), http.as_deref(), &database, config, &security).await?
        }
        Command::Plan { file, json } => {
            let yaml = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let spec = SweepSpec::parse(&yaml, &file.display().to_string())?;
            spec.check_job_count(sweep::DEFAULT_MAX_JOBS_PER_SUBMIT, &file.display().to_string())?;
            let jobs = spec.expand();
            if json {
                println!("{}", serde_json::to_string_pretty(&plan::to_json(&jobs))?);
            } else {
                print!("{}", plan::to_table(&jobs));
            }
        }
        Command::Submit { file, client } => submit(&file, &client).await?,
        Command::Status { sweep, watch: follow, client } => {
            let mut c = connect(&client).await?;
            match sweep {
                Some(sweep) if follow => watch(&mut c, &sweep).await?,
                Some(sweep) => {
                    let status = c.get_sweep(pb::GetSweepRequest { sweep: sweep.clone() }).await?.into_inner();
                    let jobs = export::fetch_results(&mut c, &sweep).await?;
                    print_table(std::slice::from_ref(&status), &[eta(&status, &jobs)]);
                    print_running(&status.running, &jobs);
                    print_failed(&jobs);
                    println!();
                    print_workers(&c.list_workers(pb::ListWorkersRequest {}).await?.into_inner().workers);
                }
                None => {
                    let sweeps = c.list_sweeps(pb::ListSweepsRequest {}).await?.into_inner().sweeps;
                    let mut etas = Vec::with_capacity(sweeps.len());
                    for s in &sweeps {
                        let unfinished = Counts::from_pb(s).unfinished() > 0;
                        etas.push(if unfinished {
                            eta(s, &export::fetch_results(&mut c, &s.name).await?)
                        } else {
                            None
                        });
                    }
                    print_table(&sweeps, &etas);
                    println!();
                    print_workers(&c.list_workers(pb::ListWorkersRequest {}).await?.into_inner().workers);
                }
            }
        }
        Command::Workers { client } => {
            let reply = connect(&client).await?.list_workers(pb::ListWorkersRequest {}).await?;
            print_workers(&reply.into_inner().workers);
        }
        Command::Cancel { sweep, client } => {
            let reply = connect(&client).await?.cancel_sweep(pb::CancelSweepRequest { sweep: sweep.clone() }).await?;
            println!("sweep {sweep}: {} jobs cancelled", reply.into_inner().jobs_cancelled);
        }
        Command::Retry { sweep, failed, client } => {
            let req = pb::RetrySweepRequest { sweep: sweep.clone(), include_cancelled: !failed };
            let reply = connect(&client).await?.retry_sweep(req).await?;
            println!("sweep {sweep}: {} jobs requeued", reply.into_inner().jobs_requeued);
        }
        Command::Plot { from: Some(dir), out, .. } => plot_from_export(&dir, out)?,
        Command::Plot { sweep: Some(sweep), out: Some(out), client, .. } => {
            let jobs = export::fetch_results(&mut connect(&client).await?, &sweep).await?;
            let rows = export::rows_from_pb(&sweep, &jobs);
            write_figures(&sweep, &rows, &export::distance_rows_from_pb(&sweep, &jobs), &out, None)?;
        }
        Command::Plot { .. } => unreachable!("clap requires SWEEP and --out, or --from"),
        Command::Run { file, workers, device, worker_bin, out } => {
            run_local(file, workers, device, worker_bin, out).await?
        }
        Command::Export { sweep, format, out, client } => export_results(&sweep, format, &out, &client).await?,
    }
    Ok(())
}

/// `coordinator serve`: the store, both services and the reaper until Ctrl-C or SIGTERM; a
/// non-loopback address needs tokens (or `--insecure`), for gRPC and for the page. With
/// `metrics_listen`, also `GET /metrics`; with `http`, the sweep page (one listener when the two
/// are the same address).
async fn serve(
    listen: &str,
    metrics_listen: Option<&str>,
    http: Option<&str>,
    database: &str,
    config: Config,
    args: &SecurityArgs,
) -> Result<()> {
    let tokens = Tokens::from_files(args.token_file.as_deref(), args.worker_token_file.as_deref())?;
    let tls = auth::server_tls(args.tls_cert.as_deref(), args.tls_key.as_deref())?;
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    auth::check_exposure(listener.local_addr()?, &tokens, args.insecure)?;
    if !tokens.enabled() {
        tracing::warn!("no --token-file: every caller is trusted");
    }
    let security = Security { tokens, tls };
    let shared = http.is_some() && http == metrics_listen;
    let page = bind_http("--http", http).await?;
    if let Some(page) = &page {
        auth::check_exposure(page.local_addr()?, &security.tokens, args.insecure).context("--http (the sweep page)")?;
    }
    let metrics = if shared { None } else { bind_http("--metrics-listen", metrics_listen).await? };
    let http = HttpListeners { metrics, page, page_with_metrics: shared };
    let store = store::open(database).await.with_context(|| format!("opening {database}"))?;
    let shutdown = async {
        let signal = shutdown_signal().await;
        tracing::info!("{signal}: shutting down");
    };
    prunesweep_coordinator::server::serve_with_http(listener, http, store, config, security, shutdown).await?;
    Ok(())
}

/// Binds `addr` for the HTTP listener `flag` names, when given.
async fn bind_http(flag: &str, addr: Option<&str>) -> Result<Option<tokio::net::TcpListener>> {
    let Some(addr) = addr else { return Ok(None) };
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {flag} {addr}"))?;
    Ok(Some(listener))
}

/// `coordinator submit`: validated here first (the coordinator's checks, without a round trip).
async fn submit(file: &std::path::Path, client: &ClientArgs) -> Result<()> {
    let yaml = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let name = file.display().to_string();
    SweepSpec::parse(&yaml, &name)?;
    let reply =
        connect(client).await?.submit_sweep(pb::SubmitSweepRequest { yaml, file_name: Some(name) }).await?.into_inner();
    println!(
        "sweep {}: {} ({} jobs added, {} in total)",
        reply.sweep,
        if reply.created { "created" } else { "extended" },
        reply.jobs_added,
        reply.jobs_total
    );
    Ok(())
}

/// `coordinator export`: one row per cell × metric, as CSV or Parquet.
async fn export_results(sweep: &str, format: FormatArg, out: &std::path::Path, client: &ClientArgs) -> Result<()> {
    let jobs = export::fetch_results(&mut connect(client).await?, sweep).await?;
    let rows = export::rows_from_pb(sweep, &jobs);
    if rows.is_empty() {
        bail!("sweep {sweep} has no results yet");
    }
    let format = match format {
        FormatArg::Csv => Format::Csv,
        FormatArg::Parquet => Format::Parquet,
    };
    export::write(&rows, format, out)?;
    println!("wrote {} rows to {}", rows.len(), out.display());
    let distances = export::distance_rows_from_pb(sweep, &jobs);
    if !distances.is_empty() {
        let path = out.with_file_name("distances.csv");
        export::write_distances(&distances, &path)?;
        println!("wrote the score jobs' {} distances to {}", distances.len(), path.display());
    }
    Ok(())
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread().enable_all().build()?.block_on(run(args))
}
