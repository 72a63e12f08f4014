//! A written export read back (`results.csv` / `.parquet`, `distances.csv`): what `coordinator
//! plot --from` draws, with no coordinator. Every column is converted by name, so a missing or
//! unconvertible one is an error naming the file and the column.

use std::path::Path;

use polars::prelude::*;

use super::{DistanceExportRow, ExportError, ExportRow};

/// The columns the export gained with provenance, and the measured peak memory after them: an
/// export made before them reads with them empty.
const NEWER_COLUMNS: [&str; 10] = [
    "peak_host_bytes",
    "key",
    "model_fingerprint",
    "data_fingerprints",
    "worker_version",
    "worker_commit",
    "device",
    "dtype",
    "wall_seconds",
    "spec",
];

/// A written table read back: `.parquet` by its schema, anything else as CSV with every column
/// read as text first and converted by [`Columns`] (no type guessing from the first rows).
fn read_frame(path: &Path) -> Result<DataFrame, ExportError> {
    let read = |source| ExportError::Read { path: path.display().to_string(), source };
    if path.extension().is_some_and(|e| e == "parquet") {
        let file =
            std::fs::File::open(path).map_err(|source| ExportError::Io { path: path.display().to_string(), source })?;
        ParquetReader::new(file).finish().map_err(read)
    } else {
        CsvReadOptions::default()
            .with_has_header(true)
            .with_infer_schema_length(Some(0))
            .try_into_reader_with_file_path(Some(path.to_path_buf()))
            .and_then(|r| r.finish())
            .map_err(read)
    }
}

/// A read table's columns, converted to what the rows hold; a missing or unconvertible column
/// is an error naming the file and the column.
struct Columns<'a> {
    df: &'a DataFrame,
    path: &'a Path,
}

impl Columns<'_> {
    fn error(&self, name: &str, source: PolarsError) -> ExportError {
        ExportError::Read { path: format!("{} (column `{name}`)", self.path.display()), source }
    }

    /// The column as `dtype`. A newer column an older export lacks reads as nulls (empty
    /// strings, no numbers); any other missing column is an error.
    fn cast(&self, name: &str, dtype: &DataType) -> Result<Column, ExportError> {
        match self.df.column(name) {
            Err(_) if NEWER_COLUMNS.contains(&name) => Ok(Column::full_null(name.into(), self.df.height(), dtype)),
            column => column.and_then(|c| c.cast(dtype)).map_err(|e| self.error(name, e)),
        }
    }

    fn strings(&self, name: &str) -> Result<Vec<String>, ExportError> {
        let c = self.cast(name, &DataType::String)?;
        Ok(c.str().map_err(|e| self.error(name, e))?.iter().map(|v| v.unwrap_or_default().to_string()).collect())
    }

    fn floats(&self, name: &str) -> Result<Vec<Option<f64>>, ExportError> {
        let c = self.cast(name, &DataType::Float64)?;
        Ok(c.f64().map_err(|e| self.error(name, e))?.iter().collect())
    }

    fn ints(&self, name: &str) -> Result<Vec<Option<i64>>, ExportError> {
        let c = self.cast(name, &DataType::Int64)?;
        Ok(c.i64().map_err(|e| self.error(name, e))?.iter().collect())
    }

    fn u32s(&self, name: &str) -> Result<Vec<Option<u32>>, ExportError> {
        Ok(self.ints(name)?.into_iter().map(|v| v.and_then(|v| u32::try_from(v).ok())).collect())
    }
}

/// An exported results table (`results.csv` or `results.parquet`) read back into rows: what
/// `coordinator plot --from` draws, with no coordinator.
pub fn read(path: &Path) -> Result<Vec<ExportRow>, ExportError> {
    let df = read_frame(path)?;
    let c = Columns { df: &df, path };
    let (sweep, job_id, kind, model) =
        (c.strings("sweep")?, c.ints("job_id")?, c.strings("kind")?, c.strings("model")?);
    let (method, heal, fraction, n) = (c.strings("method")?, c.strings("heal")?, c.floats("fraction")?, c.u32s("n")?);
    let (n_dropped, layers_dropped, num_layers) =
        (c.u32s("n_dropped")?, c.strings("layers_dropped")?, c.u32s("num_layers")?);
    let (fraction_dropped, task, metric, value) =
        (c.floats("fraction_dropped")?, c.strings("task")?, c.strings("metric")?, c.floats("value")?);
    let (seconds, key, model_fingerprint) = (c.floats("seconds")?, c.strings("key")?, c.strings("model_fingerprint")?);
    let peak_host_bytes = c.ints("peak_host_bytes")?;
    let (data_fingerprints, worker_version, worker_commit) =
        (c.strings("data_fingerprints")?, c.strings("worker_version")?, c.strings("worker_commit")?);
    let (device, dtype, wall_seconds, spec) =
        (c.strings("device")?, c.strings("dtype")?, c.floats("wall_seconds")?, c.strings("spec")?);
    Ok((0..df.height())
        .map(|i| ExportRow {
            sweep: sweep[i].clone(),
            job_id: job_id[i].unwrap_or_default(),
            kind: kind[i].clone(),
            model: model[i].clone(),
            method: method[i].clone(),
            heal: heal[i].clone(),
            fraction: fraction[i],
            n: n[i],
            n_dropped: n_dropped[i],
            layers_dropped: layers_dropped[i].clone(),
            num_layers: num_layers[i],
            fraction_dropped: fraction_dropped[i],
            task: task[i].clone(),
            metric: metric[i].clone(),
            value: value[i].unwrap_or(f64::NAN),
            seconds: seconds[i],
            peak_host_bytes: peak_host_bytes[i].and_then(|v| u64::try_from(v).ok()),
            key: key[i].clone(),
            model_fingerprint: model_fingerprint[i].clone(),
            data_fingerprints: data_fingerprints[i].clone(),
            worker_version: worker_version[i].clone(),
            worker_commit: worker_commit[i].clone(),
            device: device[i].clone(),
            dtype: dtype[i].clone(),
            wall_seconds: wall_seconds[i],
            spec: spec[i].clone(),
        })
        .collect())
}

/// A `distances.csv` read back.
pub fn read_distances(path: &Path) -> Result<Vec<DistanceExportRow>, ExportError> {
    let df = read_frame(path)?;
    let c = Columns { df: &df, path };
    let (sweep, job_id, model, metric) =
        (c.strings("sweep")?, c.ints("job_id")?, c.strings("model")?, c.strings("metric")?);
    let (n, l, value) = (c.u32s("n")?, c.u32s("l")?, c.floats("value")?);
    Ok((0..df.height())
        .map(|i| DistanceExportRow {
            sweep: sweep[i].clone(),
            job_id: job_id[i].unwrap_or_default(),
            model: model[i].clone(),
            metric: metric[i].clone(),
            n: n[i].unwrap_or_default(),
            l: l[i].unwrap_or_default(),
            value: value[i].unwrap_or(f64::NAN),
        })
        .collect())
}
