//! Results → a table. This is the client edge: it reads the `ListResults` reply (protobuf) and
//! writes a table (one row per job × result: model, method, heal, fraction, layers dropped,
//! task, metric, value, timings) → CSV or Parquet with polars. [`fetch_results`] reads every
//! page of the reply. [`read`] reads a written table back (`read.rs`), for `coordinator plot
//! --from` with no coordinator.

use std::path::Path;

use polars::prelude::*;
use prunesweep_proto::v1 as pb;
use prunesweep_proto::v1::sweep_service_client::SweepServiceClient;
use prunesweep_proto::Vocabulary;
use tonic::codegen::{Body, Bytes, StdError};

use crate::store::DistanceRow;

mod read;
pub use read::{read, read_distances};

/// Every job of `sweep` with its results, in job-id order: `ListResults` page after page (each
/// page well under the 4 MiB message limit), until the coordinator gives no `next_page_token`.
/// Any transport: a plain [`Channel`](tonic::transport::Channel) or one with an interceptor.
pub async fn fetch_results<T>(
    client: &mut SweepServiceClient<T>,
    sweep: &str,
) -> Result<Vec<pb::JobResult>, tonic::Status>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<StdError>,
    T::ResponseBody: Body<Data = Bytes> + Send + 'static,
    <T::ResponseBody as Body>::Error: Into<StdError> + Send,
{
    let mut jobs = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListResultsRequest { sweep: sweep.to_string(), page_size: 0, page_token: page_token.clone() };
        let page = client.list_results(request).await?.into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            return Ok(jobs);
        }
        if page.next_page_token == page_token {
            return Err(tonic::Status::internal(format!(
                "ListResults of {sweep} gave the same page token twice ({page_token:?}): stopping rather than looping"
            )));
        }
        page_token = page.next_page_token;
    }
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated values with a header.
    Csv,
    /// Apache Parquet.
    Parquet,
}

/// One exported row.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExportRow {
    /// Sweep name.
    pub sweep: String,
    /// Job id.
    pub job_id: i64,
    /// `baseline` or `cell`.
    pub kind: String,
    /// Model name.
    pub model: String,
    /// Method (`none` for the baseline).
    pub method: String,
    /// Heal variant.
    pub heal: String,
    /// Requested fraction (0 for the baseline; unset for explicit `n`).
    pub fraction: Option<f64>,
    /// Requested n (explicit `n` cells).
    pub n: Option<u32>,
    /// Layers actually dropped.
    pub n_dropped: Option<u32>,
    /// The dropped layers, comma-separated.
    pub layers_dropped: String,
    /// Decoder layers of the unpruned model.
    pub num_layers: Option<u32>,
    /// Fraction actually dropped (`n_dropped / num_layers`).
    pub fraction_dropped: Option<f64>,
    /// Task.
    pub task: String,
    /// Metric.
    pub metric: String,
    /// Value.
    pub value: f64,
    /// Seconds the job took (sum of its phase timings).
    pub seconds: Option<f64>,
    /// The worker process's peak resident host memory in the job (bytes; the largest of its
    /// phases' peaks), where the worker measured it: a CPU job's to set against the memory
    /// model's CPU prediction (`coordinator plan`).
    pub peak_host_bytes: Option<u64>,
    /// The job's key (the hash of its resolved spec).
    pub key: String,
    /// The weights: `hf:org/name@<commit>` or `sha256:<hex>` (empty: not reported).
    pub model_fingerprint: String,
    /// The data files' fingerprints, a JSON object (path → `sha256:<hex>`).
    pub data_fingerprints: String,
    /// The worker's version and the git commit it was built from.
    pub worker_version: String,
    /// The git commit of the worker's build.
    pub worker_commit: String,
    /// The worker's device.
    pub device: String,
    /// The compute dtype.
    pub dtype: String,
    /// The job's wall time on its worker, lease to report.
    pub wall_seconds: Option<f64>,
    /// The resolved job spec (JSON), enough to rerun the job.
    pub spec: String,
}

/// Errors writing an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// polars failed to build or write the table.
    #[error("building the table: {0}")]
    Polars(#[from] PolarsError),
    /// A table could not be read back (a missing column names it).
    #[error("reading {path}: {source}")]
    Read {
        /// The file (and the column).
        path: String,
        /// polars' error.
        #[source]
        source: PolarsError,
    },
    /// The output file could not be created.
    #[error("creating {path}: {source}")]
    Io {
        /// The path.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Rows from a `ListResults` reply: one per (job, result) for baseline and cell jobs (score jobs
/// have no results; their distance tables are [`distance_rows_from_pb`]'s).
pub fn rows_from_pb(sweep: &str, jobs: &[pb::JobResult]) -> Vec<ExportRow> {
    let mut rows = Vec::new();
    for job in jobs {
        let Some(spec) = &job.spec else { continue };
        let kind = spec.kind();
        if kind == pb::JobKind::Score {
            continue;
        }
        let baseline = kind == pb::JobKind::Baseline;
        let (fraction, n) = match spec.amount {
            Some(pb::job_spec::Amount::Fraction(f)) => (Some(f), None),
            Some(pb::job_spec::Amount::N(n)) => (None, Some(n)),
            None => (baseline.then_some(0.0), baseline.then_some(0)),
        };
        let n_dropped = if baseline {
            Some(0)
        } else if job.layers_dropped.is_empty() && job.num_layers.is_none() {
            None
        } else {
            Some(job.layers_dropped.len() as u32)
        };
        let method = match spec.method() {
            pb::PruneMethod::Unspecified => "none".to_string(),
            m => m.name(),
        };
        let seconds = (!job.timings.is_empty()).then(|| job.timings.iter().map(|t| t.seconds).sum());
        let peak_host_bytes = job.timings.iter().filter_map(|t| t.peak_host_bytes).max();
        let provenance = job.provenance.clone().unwrap_or_default();
        let data_fingerprints: std::collections::BTreeMap<_, _> = provenance.data_fingerprints.iter().collect();
        let data_fingerprints = serde_json::to_string(&data_fingerprints).expect("strings serialize");
        for r in &job.results {
            rows.push(ExportRow {
                sweep: sweep.to_string(),
                job_id: job.job_id,
                kind: if baseline { "baseline" } else { "cell" }.to_string(),
                model: spec.model.as_ref().map(|m| m.name.clone()).unwrap_or_default(),
                method: method.clone(),
                heal: spec.heal.as_ref().map_or("none", |h| h.name.as_str()).to_string(),
                fraction,
                n,
                n_dropped,
                layers_dropped: job.layers_dropped.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
                num_layers: job.num_layers,
                fraction_dropped: match (n_dropped, job.num_layers) {
                    (Some(d), Some(l)) if l > 0 => Some(f64::from(d) / f64::from(l)),
                    _ => None,
                },
                task: r.task.clone(),
                metric: r.metric.clone(),
                value: r.value,
                seconds,
                peak_host_bytes,
                key: spec.key.clone(),
                model_fingerprint: provenance.model_fingerprint.clone(),
                data_fingerprints: data_fingerprints.clone(),
                worker_version: provenance.worker_version.clone(),
                worker_commit: provenance.worker_commit.clone(),
                device: provenance.device.clone(),
                dtype: provenance.dtype.clone(),
                wall_seconds: job.provenance.as_ref().map(|p| p.wall_seconds),
                spec: spec.spec_json.clone(),
            });
        }
    }
    rows
}

/// Build the table.
pub fn to_dataframe(rows: &[ExportRow]) -> Result<DataFrame, ExportError> {
    fn col<T, F: Fn(&ExportRow) -> T>(rows: &[ExportRow], _name: &str, f: F) -> Vec<T> {
        rows.iter().map(f).collect()
    }
    let columns = vec![
        Column::new("sweep".into(), col(rows, "sweep", |r| r.sweep.clone())),
        Column::new("job_id".into(), col(rows, "job_id", |r| r.job_id)),
        Column::new("kind".into(), col(rows, "kind", |r| r.kind.clone())),
        Column::new("model".into(), col(rows, "model", |r| r.model.clone())),
        Column::new("method".into(), col(rows, "method", |r| r.method.clone())),
        Column::new("heal".into(), col(rows, "heal", |r| r.heal.clone())),
        Column::new("fraction".into(), col(rows, "fraction", |r| r.fraction)),
        Column::new("n".into(), col(rows, "n", |r| r.n)),
        Column::new("n_dropped".into(), col(rows, "n_dropped", |r| r.n_dropped)),
        Column::new("layers_dropped".into(), col(rows, "layers_dropped", |r| r.layers_dropped.clone())),
        Column::new("num_layers".into(), col(rows, "num_layers", |r| r.num_layers)),
        Column::new("fraction_dropped".into(), col(rows, "fraction_dropped", |r| r.fraction_dropped)),
        Column::new("task".into(), col(rows, "task", |r| r.task.clone())),
        Column::new("metric".into(), col(rows, "metric", |r| r.metric.clone())),
        Column::new("value".into(), col(rows, "value", |r| r.value)),
        Column::new("seconds".into(), col(rows, "seconds", |r| r.seconds)),
        Column::new("peak_host_bytes".into(), col(rows, "peak_host_bytes", |r| r.peak_host_bytes)),
        Column::new("key".into(), col(rows, "key", |r| r.key.clone())),
        Column::new("model_fingerprint".into(), col(rows, "model_fingerprint", |r| r.model_fingerprint.clone())),
        Column::new("data_fingerprints".into(), col(rows, "data_fingerprints", |r| r.data_fingerprints.clone())),
        Column::new("worker_version".into(), col(rows, "worker_version", |r| r.worker_version.clone())),
        Column::new("worker_commit".into(), col(rows, "worker_commit", |r| r.worker_commit.clone())),
        Column::new("device".into(), col(rows, "device", |r| r.device.clone())),
        Column::new("dtype".into(), col(rows, "dtype", |r| r.dtype.clone())),
        Column::new("wall_seconds".into(), col(rows, "wall_seconds", |r| r.wall_seconds)),
        Column::new("spec".into(), col(rows, "spec", |r| r.spec.clone())),
    ];
    Ok(DataFrame::new_infer_height(columns)?)
}

/// Write the table to `path`.
pub fn write(rows: &[ExportRow], format: Format, path: &Path) -> Result<(), ExportError> {
    write_frame(&mut to_dataframe(rows)?, format, path)
}

fn write_frame(df: &mut DataFrame, format: Format, path: &Path) -> Result<(), ExportError> {
    let io = |source| ExportError::Io { path: path.display().to_string(), source };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let file = std::fs::File::create(path).map_err(io)?;
    match format {
        Format::Csv => CsvWriter::new(file).finish(df)?,
        Format::Parquet => {
            ParquetWriter::new(file).finish(df)?;
        }
    }
    Ok(())
}

/// One exported row of a score job's distance table (`distances.csv`): what the sweep's heatmaps
/// are drawn from.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DistanceExportRow {
    /// Sweep name.
    pub sweep: String,
    /// The score job's id.
    pub job_id: i64,
    /// Model name.
    pub model: String,
    /// `angular` (d(l, n)) or `block_influence` (one layer's, n = 1).
    pub metric: String,
    /// Block length.
    pub n: u32,
    /// First layer of the block (0-based).
    pub l: u32,
    /// The value.
    pub value: f64,
}

impl DistanceExportRow {
    /// The row as the store's (and the heatmap's) distance entry.
    pub fn to_distance(&self) -> DistanceRow {
        DistanceRow { metric: self.metric.clone(), n: self.n, l: self.l, value: self.value }
    }
}

/// The score jobs' distance tables from a `ListResults` reply, one row per entry.
pub fn distance_rows_from_pb(sweep: &str, jobs: &[pb::JobResult]) -> Vec<DistanceExportRow> {
    let mut rows = Vec::new();
    for job in jobs {
        let model = job.spec.as_ref().and_then(|s| s.model.as_ref()).map(|m| m.name.clone()).unwrap_or_default();
        rows.extend(job.distances.iter().map(|d| DistanceExportRow {
            sweep: sweep.to_string(),
            job_id: job.job_id,
            model: model.clone(),
            metric: d.metric().snake_name(),
            n: d.n,
            l: d.l,
            value: d.value,
        }));
    }
    rows
}

/// Writes the distance rows as CSV to `path`.
pub fn write_distances(rows: &[DistanceExportRow], path: &Path) -> Result<(), ExportError> {
    let columns = vec![
        Column::new("sweep".into(), rows.iter().map(|r| r.sweep.clone()).collect::<Vec<_>>()),
        Column::new("job_id".into(), rows.iter().map(|r| r.job_id).collect::<Vec<_>>()),
        Column::new("model".into(), rows.iter().map(|r| r.model.clone()).collect::<Vec<_>>()),
        Column::new("metric".into(), rows.iter().map(|r| r.metric.clone()).collect::<Vec<_>>()),
        Column::new("n".into(), rows.iter().map(|r| r.n).collect::<Vec<_>>()),
        Column::new("l".into(), rows.iter().map(|r| r.l).collect::<Vec<_>>()),
        Column::new("value".into(), rows.iter().map(|r| r.value).collect::<Vec<_>>()),
    ];
    write_frame(&mut DataFrame::new_infer_height(columns)?, Format::Csv, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_has_one_line_per_row() {
        let rows = vec![
            ExportRow {
                sweep: "s".into(),
                job_id: 1,
                task: "mmlu".into(),
                metric: "accuracy".into(),
                value: 0.5,
                ..Default::default()
            },
            ExportRow { sweep: "s".into(), job_id: 2, fraction: Some(0.25), n_dropped: Some(2), ..Default::default() },
        ];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.csv");
        write(&rows, Format::Csv, &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.starts_with("sweep,job_id,kind,model,method,heal,fraction,n,n_dropped"), "{text}");
        write(&rows, Format::Parquet, &dir.path().join("out.parquet")).unwrap();
    }

    #[test]
    fn a_written_table_reads_back_as_the_same_rows() {
        let rows = vec![
            ExportRow {
                sweep: "s".into(),
                job_id: 3,
                kind: "cell".into(),
                model: "m".into(),
                method: "angular".into(),
                heal: "qlora".into(),
                fraction: Some(0.1),
                n: None,
                n_dropped: Some(3),
                layers_dropped: "13,14,15".into(),
                num_layers: Some(30),
                fraction_dropped: Some(0.1),
                task: "boolq".into(),
                metric: "accuracy".into(),
                value: 0.615,
                seconds: Some(12.25),
                peak_host_bytes: Some((5 << 30) + 123),
                key: "k".into(),
                model_fingerprint: "sha256:ab".into(),
                data_fingerprints: "{\"a,b\":\"sha256:ff\"}".into(),
                worker_version: "0.1.0".into(),
                worker_commit: "abc-dirty".into(),
                device: "cpu".into(),
                dtype: "f32".into(),
                wall_seconds: Some(1.0 / 3.0),
                spec: "{\"kind\":\"cell\",\"note\":\"a \\\"quoted\\\" word, and a comma\"}".into(),
            },
            ExportRow {
                sweep: "s".into(),
                job_id: 1,
                kind: "baseline".into(),
                value: 3.712_345_678_901_234_5,
                ..Default::default()
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        for (format, name) in [(Format::Csv, "r.csv"), (Format::Parquet, "r.parquet")] {
            let path = dir.path().join(name);
            write(&rows, format, &path).unwrap();
            assert_eq!(read(&path).unwrap(), rows, "{name}");
        }
        let distances = vec![DistanceExportRow {
            sweep: "s".into(),
            job_id: 1,
            model: "m".into(),
            metric: "angular".into(),
            n: 2,
            l: 5,
            value: 0.123_456_789,
        }];
        let path = dir.path().join("distances.csv");
        write_distances(&distances, &path).unwrap();
        assert_eq!(read_distances(&path).unwrap(), distances);
        let e = read_distances(&dir.path().join("r.csv")).unwrap_err().to_string();
        assert!(e.contains("r.csv (column `l`)"), "{e}");
        // An export from before the provenance columns reads with them empty.
        let old = dir.path().join("old.csv");
        let header = "sweep,job_id,kind,model,method,heal,fraction,n,n_dropped,layers_dropped,num_layers,\
                      fraction_dropped,task,metric,value,seconds";
        std::fs::write(&old, format!("{header}\ns,1,baseline,m,none,none,0.0,0,0,,30,0.0,boolq,accuracy,0.5,1.0\n"))
            .unwrap();
        let old = read(&old).unwrap();
        assert_eq!((old[0].value, old[0].key.as_str(), old[0].wall_seconds), (0.5, "", None));
    }

    #[test]
    fn every_row_carries_its_jobs_provenance_and_spec() {
        let job = pb::JobResult {
            job_id: 7,
            kind: pb::JobKind::Cell as i32,
            spec: Some(pb::JobSpec {
                key: "abc".into(),
                kind: pb::JobKind::Cell as i32,
                spec_json: "{\"kind\":\"cell\"}".into(),
                ..Default::default()
            }),
            results: vec![pb::ResultRow { task: "boolq".into(), metric: "accuracy".into(), value: 0.7 }],
            provenance: Some(pb::Provenance {
                model_fingerprint: "hf:org/m@0123".into(),
                data_fingerprints: [("d.jsonl".to_string(), "sha256:ff".to_string())].into_iter().collect(),
                worker_version: "0.1.0".into(),
                worker_commit: "deadbeef".into(),
                device: "cuda:0".into(),
                dtype: "bf16".into(),
                wall_seconds: 12.5,
            }),
            ..Default::default()
        };
        let rows = rows_from_pb("s", &[job]);
        let r = &rows[0];
        assert_eq!((r.key.as_str(), r.model_fingerprint.as_str()), ("abc", "hf:org/m@0123"));
        assert_eq!(r.data_fingerprints, "{\"d.jsonl\":\"sha256:ff\"}");
        assert_eq!((r.worker_commit.as_str(), r.device.as_str(), r.dtype.as_str()), ("deadbeef", "cuda:0", "bf16"));
        assert_eq!((r.wall_seconds, r.spec.as_str()), (Some(12.5), "{\"kind\":\"cell\"}"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.csv");
        write(&rows, Format::Csv, &path).unwrap();
        let header = std::fs::read_to_string(&path).unwrap().lines().next().unwrap().to_string();
        assert!(
            header.ends_with(
                "key,model_fingerprint,data_fingerprints,worker_version,worker_commit,device,dtype,wall_seconds,spec"
            ),
            "{header}"
        );
    }
}
