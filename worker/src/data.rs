//! Text documents for calibration (scoring), healing and held-out loss.
//!
//! Formats, chosen by file name:
//! - `*.jsonl`, `*.json`: JSON lines, one object per line with a `text` field (C4's format);
//! - `*.jsonl.gz`, `*.json.gz`: the same, gzip-compressed (C4's shards);
//! - `*.parquet`: a Parquet file with a string column `text` (read with polars);
//! - anything else: plain UTF-8 text, documents separated by blank lines (a file without blank
//!   lines is one document per line, like WikiText).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Why a data file could not be read. Each message names the file (and line).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file cannot be opened or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON line does not parse or lacks the field.
    #[error("{}:{line}: {message}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        message: String,
    },
    /// A Parquet file cannot be read or has no usable column.
    #[error("{}: {message}", path.display())]
    Parquet {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file holds no documents.
    #[error("{}: no documents (empty file, or no non-empty `text`)", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file ends before the first document asked for.
    #[error("{}: holds {held} documents, none from document {first} on; lower `first_doc`", path.display())]
    TooFew {
        /// The file.
        path: PathBuf,
        /// Documents in the file.
        held: usize,
        /// The 0-based index asked to start from.
        first: usize,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io { path: path.to_path_buf(), source }
}

/// Reads up to `limit` documents (all when `None`) from `path`, in file order.
pub fn read_documents(path: &Path, limit: Option<usize>) -> Result<Vec<String>, DataError> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    let limit = limit.unwrap_or(usize::MAX);
    let docs = if name.ends_with(".parquet") {
        read_parquet_text(path, "text", limit)?
    } else if name.ends_with(".jsonl.gz") || name.ends_with(".json.gz") {
        let file = std::fs::File::open(path).map_err(io(path))?;
        read_json_lines(path, BufReader::new(flate2::read::GzDecoder::new(file)), limit)?
    } else if name.ends_with(".jsonl") || name.ends_with(".json") {
        let file = std::fs::File::open(path).map_err(io(path))?;
        read_json_lines(path, BufReader::new(file), limit)?
    } else {
        let mut text = String::new();
        std::fs::File::open(path).map_err(io(path))?.read_to_string(&mut text).map_err(io(path))?;
        split_plain_text(&text).into_iter().take(limit).collect()
    };
    if docs.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    Ok(docs)
}

/// Documents `first ..` of `path`, at most `count` of them (all the rest when `None`): held-out
/// documents for a loss, or healing data kept apart from the documents evaluated.
pub fn read_document_range(path: &Path, first: usize, count: Option<usize>) -> Result<Vec<String>, DataError> {
    let mut docs = read_documents(path, count.map(|n| first.saturating_add(n)))?;
    if docs.len() <= first {
        return Err(DataError::TooFew { path: path.to_path_buf(), held: docs.len(), first });
    }
    docs.drain(..first);
    Ok(docs)
}

fn read_json_lines(path: &Path, reader: impl BufRead, limit: usize) -> Result<Vec<String>, DataError> {
    let mut docs = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        if docs.len() >= limit {
            break;
        }
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let err = |message: String| DataError::Line { path: path.to_path_buf(), line: i + 1, message };
        let value: serde_json::Value = serde_json::from_str(&line).map_err(|e| err(format!("invalid JSON: {e}")))?;
        let text = value
            .get("text")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| err("no string field `text`".into()))?;
        docs.push(text.to_string());
    }
    Ok(docs)
}

/// Reads one string column of a Parquet file.
pub fn read_parquet_text(path: &Path, column: &str, limit: usize) -> Result<Vec<String>, DataError> {
    use polars::prelude::*;
    let err = |message: String| DataError::Parquet { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(io(path))?;
    let df = ParquetReader::new(file)
        .with_columns(Some(vec![column.to_string()]))
        .finish()
        .map_err(|e| err(format!("cannot read Parquet (need a string column `{column}`): {e}")))?;
    let col = df.column(column).map_err(|e| err(e.to_string()))?;
    let strings = col.str().map_err(|_| err(format!("column `{column}` is {}, not a string", col.dtype())))?;
    Ok(strings.iter().flatten().take(limit).map(str::to_string).collect())
}

fn split_plain_text(text: &str) -> Vec<String> {
    let has_blank_line = text.lines().any(|l| l.trim().is_empty());
    if has_blank_line {
        text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect()
    } else {
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
    }
}

/// SHA-256 of a file, hex: recorded with every result derived from a data file.
pub fn file_sha256(path: &Path) -> Result<String, DataError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io(path))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_splits_on_blank_lines_or_lines() {
        assert_eq!(split_plain_text("a b\nc\n\nd\n"), vec!["a b\nc", "d"]);
        assert_eq!(split_plain_text("one\ntwo\n"), vec!["one", "two"]);
    }

    #[test]
    fn json_lines_name_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\n\n{\"txt\": 1}\n").unwrap();
        let e = read_documents(&p, None).unwrap_err().to_string();
        assert!(e.ends_with("d.jsonl:3: no string field `text`"), "{e}");
        assert_eq!(read_documents(&p, Some(1)).unwrap(), vec!["a"]);
        std::fs::write(&p, "").unwrap();
        assert!(read_documents(&p, None).unwrap_err().to_string().contains("no documents"));
    }

    #[test]
    fn document_ranges_skip_and_name_a_start_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(&p, "{\"text\": \"a\"}\n{\"text\": \"b\"}\n{\"text\": \"c\"}\n").unwrap();
        assert_eq!(read_document_range(&p, 1, Some(1)).unwrap(), vec!["b"]);
        assert_eq!(read_document_range(&p, 1, None).unwrap(), vec!["b", "c"]);
        assert_eq!(read_document_range(&p, 0, Some(9)).unwrap(), vec!["a", "b", "c"]);
        let e = read_document_range(&p, 3, Some(2)).unwrap_err().to_string();
        assert!(e.ends_with("d.jsonl: holds 3 documents, none from document 3 on; lower `first_doc`"), "{e}");
    }

    #[test]
    fn gzip_and_parquet_are_read() {
        use polars::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let gz = dir.path().join("d.json.gz");
        let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, b"{\"text\": \"x\"}\n{\"text\": \"y\"}\n").unwrap();
        enc.finish().unwrap();
        assert_eq!(read_documents(&gz, None).unwrap(), vec!["x", "y"]);

        let pq = dir.path().join("d.parquet");
        let mut df = df!("text" => ["p", "q", "r"], "id" => [1, 2, 3]).unwrap();
        ParquetWriter::new(std::fs::File::create(&pq).unwrap()).finish(&mut df).unwrap();
        assert_eq!(read_documents(&pq, Some(2)).unwrap(), vec!["p", "q"]);
        let mut df = df!("body" => ["p"]).unwrap();
        ParquetWriter::new(std::fs::File::create(&pq).unwrap()).finish(&mut df).unwrap();
        assert!(read_documents(&pq, None).unwrap_err().to_string().contains("`text`"));
    }
}
