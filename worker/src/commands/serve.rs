//! `worker serve`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use prunesweep_worker::heal::Recompute;
use prunesweep_worker::model::parse_device;
use prunesweep_worker::serve::pipeline::DEFAULT_STATE_CACHE_BYTES;
use prunesweep_worker::serve::roots::Roots;
use prunesweep_worker::serve::{serve, ServeConfig};

use super::gib;

/// Arguments of `worker serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// The coordinator's address (`https://` with TLS), or several separated by commas.
    #[arg(long, env = "PRUNESWEEP_COORDINATOR", default_value = "http://127.0.0.1:50051")]
    coordinator: String,
    /// A file holding the worker token (`PRUNESWEEP_TOKEN`, when set, is used instead).
    #[arg(long, env = "PRUNESWEEP_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The CA certificate (PEM) that signed the coordinator's; default: the system's roots.
    #[arg(long, env = "PRUNESWEEP_CA")]
    ca: Option<PathBuf>,
    /// cpu, cuda or cuda:N (cuda needs a build with --features cuda).
    #[arg(long, default_value = "cpu", env = "PRUNESWEEP_DEVICE")]
    device: String,
    /// Name shown by the coordinator; default HOST:DEVICE.
    #[arg(long, env = "PRUNESWEEP_WORKER_NAME")]
    name: Option<String>,
    /// Per-job files (healing checkpoints, so a re-leased job resumes).
    #[arg(long, env = "PRUNESWEEP_WORK_DIR", default_value = ".cache/worker")]
    work_dir: PathBuf,
    /// A folder (or file) jobs may read models from; repeat or separate with commas. The work dir
    /// and the local HF hub cache are always allowed.
    #[arg(long = "model-root", env = "PRUNESWEEP_MODEL_ROOT", value_delimiter = ',')]
    model_roots: Vec<PathBuf>,
    /// A folder (or file) jobs may read data from; repeat or separate with commas. The work dir
    /// is always allowed.
    #[arg(long = "data-root", env = "PRUNESWEEP_DATA_ROOT", value_delimiter = ',')]
    data_roots: Vec<PathBuf>,
    /// Count at most this many GiB of the device's memory as free when deciding whether a model
    /// fits (a device shared with other work). A score job whose model does not fit runs layer by
    /// layer instead of loading it whole; an evaluation (baseline, unhealed cell) holds the blocks
    /// that fit and reads the others from the checkpoint for each pass.
    #[arg(long, env = "PRUNESWEEP_MEMORY_BUDGET_GIB", value_parser = gib)]
    memory_budget_gib: Option<f64>,
    /// Host memory (GiB) the held model may keep the residual states of evaluation passes in, so
    /// that the next cell of the same model starts its evaluation where its cut begins rather
    /// than recomputing the blocks before it (results are bit for bit the same). 0 turns it off.
    #[arg(long, env = "PRUNESWEEP_STATE_CACHE_GIB", value_parser = gib,
        default_value_t = (DEFAULT_STATE_CACHE_BYTES >> 30) as f64)]
    state_cache_gib: f64,
    /// Which blocks of a healing cell keep their activations for the backward pass; the others
    /// are recomputed from their saved inputs (the same gradients): `fit`, as many of the top
    /// blocks as 90% of the free memory (at most `--memory-budget-gib`) holds beside the rest of
    /// the cell; `all`; or a number of top blocks (0: every block recomputed, the least memory,
    /// which is what the coordinator's memory model leases a cell for: for several workers
    /// sharing one machine's memory).
    #[arg(long, env = "PRUNESWEEP_KEEP_GRAPHS", default_value = "fit", value_name = "fit|all|N")]
    keep_graphs: Recompute,
    /// Exit after this many jobs (default: serve until Ctrl-C / SIGTERM).
    #[arg(long)]
    max_jobs: Option<usize>,
    /// Exit (status 0) once the coordinator has no unfinished job left in any sweep: for batch
    /// schedulers (a Slurm array task, a Kubernetes Job), so an allocation ends with the work.
    /// Start it after the sweep is submitted.
    #[arg(long, env = "PRUNESWEEP_EXIT_WHEN_DONE")]
    exit_when_done: bool,
    /// Long-poll wait per lease request, in seconds.
    #[arg(long, default_value_t = 10)]
    lease_wait_secs: u64,
}

/// Registers, then leases and runs jobs until Ctrl-C / SIGTERM.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let device = parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let host = std::env::var("HOSTNAME").ok().or_else(|| std::fs::read_to_string("/etc/hostname").ok());
    let name =
        args.name.unwrap_or_else(|| format!("{}:{}", host.unwrap_or_else(|| "worker".into()).trim(), args.device));
    let roots = Roots::new(&args.work_dir, &args.model_roots, &args.data_roots)?;
    tracing::info!(roots = %roots.describe(), "jobs may read only under these roots");
    tracing::info!(malloc = %prunesweep_worker::allocator::describe(), "glibc malloc settings");
    let cfg = ServeConfig {
        roots,
        memory_budget: args.memory_budget_gib.map(|g| (g * (1u64 << 30) as f64) as u64),
        state_cache: (args.state_cache_gib * (1u64 << 30) as f64) as u64,
        recompute: args.keep_graphs,
        coordinator: args.coordinator,
        name,
        device_name: args.device,
        work_dir: args.work_dir,
        lease_wait: Duration::from_secs(args.lease_wait_secs),
        max_jobs: args.max_jobs,
        exit_when_done: args.exit_when_done,
        token: prunesweep_proto::client::token(args.token_file.as_deref())?,
        ca: args
            .ca
            .as_deref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading {}", p.display())))
            .transpose()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    runtime.block_on(async {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("installing the SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            tracing::info!("shutdown requested");
        };
        serve(cfg, device, shutdown).await.context("worker serve")
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_sizes_are_finite_and_not_negative() {
        assert_eq!(super::gib("4"), Ok(4.0));
        assert_eq!(super::gib(" 0.5 "), Ok(0.5));
        assert_eq!(super::gib("0"), Ok(0.0));
        for bad in ["-1", "NaN", "inf", "4GiB", ""] {
            let err = super::gib(bad).unwrap_err();
            assert!(err.contains("number ≥ 0"), "{bad}: {err}");
        }
    }
}
