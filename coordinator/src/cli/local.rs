//! `coordinator run`: one machine, no setup. An embedded coordinator on 127.0.0.1 with SQLite in
//! the output folder, N local `worker serve` processes reading exactly the sweep's files, a
//! progress bar until the sweep is done, then its CSV, Parquet and plots.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use prunesweep_coordinator::store;
use prunesweep_coordinator::sweep::SweepSpec;
use prunesweep_coordinator::Config;
use prunesweep_proto::v1 as pb;

use super::watch::watch;
use crate::cli::figures::write_results;
use crate::{connect, ClientArgs};

/// `coordinator run`: serve on 127.0.0.1:0, submit, start the workers, follow the sweep, export.
pub(crate) async fn run_local(
    file: PathBuf,
    workers: usize,
    device: String,
    worker_bin: Option<PathBuf>,
    out: Option<PathBuf>,
) -> Result<()> {
    let yaml = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let spec = SweepSpec::parse(&yaml, &file.display().to_string())?;
    let sweep = spec.name.as_str().to_string();
    let dir = out.unwrap_or_else(|| PathBuf::from("results").join(&sweep));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let worker_bin = match worker_bin {
        Some(p) => p,
        None => std::env::current_exe()?.with_file_name("worker"),
    };
    if !worker_bin.is_file() {
        bail!(
            "the worker binary is not at {}; build it (cargo build --release -p prunesweep-worker) or pass --worker-bin",
            worker_bin.display()
        );
    }
    let database = format!("sqlite://{}", dir.join("coordinator.sqlite").display());
    let store = store::open(&database).await.with_context(|| format!("opening {database}"))?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = Config::for_lease_ttl(Duration::from_secs(60));
    let server = tokio::spawn(prunesweep_coordinator::run(listener, store, config, async {
        let _ = stop_rx.await;
    }));
    let mut client = connect(&ClientArgs::local(url.clone())).await?;
    let reply = client
        .submit_sweep(pb::SubmitSweepRequest { yaml, file_name: Some(file.display().to_string()) })
        .await?
        .into_inner();
    println!(
        "sweep {sweep}: {} jobs ({} new); {workers} local workers on {device}",
        reply.jobs_total, reply.jobs_added
    );
    let roots = read_roots(&spec);
    let children = (0..workers.max(1))
        .map(|i| {
            std::process::Command::new(&worker_bin)
                .args([
                    "serve",
                    "--coordinator",
                    &url,
                    "--device",
                    &local_device(&device, i),
                    "--name",
                    &format!("local-{i}"),
                ])
                .arg("--work-dir")
                .arg(dir.join("work"))
                .args(&roots)
                .spawn()
                .with_context(|| format!("starting {}", worker_bin.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let followed = tokio::select! {
        r = watch(&mut client, &sweep) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted; the sweep is kept in {database}")),
    };
    for child in &children {
        // SIGTERM: workers stop their job at a safe point (healing checkpoints) and exit.
        let _ = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    }
    for mut child in children {
        let _ = tokio::task::spawn_blocking(move || child.wait()).await;
    }
    followed?;
    let failed = write_results(&mut client, &sweep, &dir).await?;
    let _ = stop_tx.send(());
    let _ = server.await;
    if !failed.is_empty() {
        bail!("{} jobs failed:\n{}", failed.len(), failed.join("\n"));
    }
    Ok(())
}

/// The device of local worker `i`: `cuda` spreads the workers over the GPUs (`cuda:i`); any other
/// name is every worker's.
fn local_device(device: &str, i: usize) -> String {
    if device == "cuda" {
        format!("cuda:{i}")
    } else {
        device.to_string()
    }
}

/// `--model-root`/`--data-root` arguments for the local workers: exactly the files the sweep
/// names (or, for one that does not exist yet, its folder), so they read what the sweep file
/// asks and nothing else.
fn read_roots(spec: &SweepSpec) -> Vec<std::ffi::OsString> {
    let mut roots = std::collections::BTreeSet::new();
    for job in spec.expand() {
        let models = std::iter::once(("--model-root", job.spec.model.source.as_str()));
        for (flag, file) in models.chain(job.spec.data_files().into_iter().map(|f| ("--data-root", f))) {
            let path = std::path::Path::new(file);
            let root = if path.exists() { Some(path) } else { path.parent().filter(|p| p.is_dir()) };
            if let Some(root) = root {
                roots.insert((flag, root.to_path_buf()));
            }
        }
    }
    roots.into_iter().flat_map(|(flag, root)| [flag.into(), root.into_os_string()]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_spreads_local_workers_over_the_gpus() {
        assert_eq!((0..3).map(|i| local_device("cuda", i)).collect::<Vec<_>>(), ["cuda:0", "cuda:1", "cuda:2"]);
        assert_eq!(local_device("cuda:1", 2), "cuda:1");
        assert_eq!(local_device("cpu", 5), "cpu");
    }
}
