//! Text documents for calibration (scoring), healing and held-out loss, and [`records`]: the one
//! reader of JSON lines and Parquet that the evaluation sets (MMLU, BoolQ) also read through.
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
    /// The path is not a regular file (a directory, a device such as `/dev/zero`, a pipe).
    #[error("{}: not a regular file; give a data file", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// A line or a text file is larger than the reader accepts.
    #[error("{}: {what} is larger than {limit} bytes; is this the right file?", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// What is too large (`line 3`, `the file`).
        what: String,
        /// The limit.
        limit: u64,
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

/// The longest JSON line read (a C4 document is a few KiB; a file with no newlines is not JSON lines).
const MAX_LINE_BYTES: u64 = 64 << 20;
/// The largest plain-text file read whole.
const MAX_TEXT_BYTES: u64 = 1 << 30;

/// Opens a data file, refusing what is not a regular file (a device would be read forever).
fn open(path: &Path) -> Result<std::fs::File, DataError> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    if !file.metadata().map_err(io(path))?.is_file() {
        return Err(DataError::NotAFile { path: path.to_path_buf() });
    }
    Ok(file)
}

/// One record of a JSON lines or Parquet file.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// 1-based line (JSON lines) or row (Parquet), for error messages.
    pub line: u64,
    /// The record's fields.
    pub value: serde_json::Value,
}

/// How a data file is read, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    JsonLines { gzip: bool },
    Parquet,
    PlainText,
}

fn format(path: &Path) -> Format {
    let name = path.file_name().map(|n| n.to_string_lossy().to_lowercase()).unwrap_or_default();
    if name.ends_with(".parquet") {
        Format::Parquet
    } else if name.ends_with(".jsonl.gz") || name.ends_with(".json.gz") {
        Format::JsonLines { gzip: true }
    } else if name.ends_with(".jsonl") || name.ends_with(".json") {
        Format::JsonLines { gzip: false }
    } else {
        Format::PlainText
    }
}

/// The first `limit` records of a JSON lines file (`.jsonl`, `.json`, optionally `.gz`: one
/// object a line, blank lines skipped) or a Parquet file (each row as an object; only `columns`
/// are read when given), in file order. Other names are read as JSON lines.
pub fn records(path: &Path, columns: Option<&[&str]>, limit: usize) -> Result<Vec<Record>, DataError> {
    match format(path) {
        Format::Parquet => read_parquet_records(path, columns, limit),
        Format::JsonLines { gzip: true } => {
            read_json_lines(path, BufReader::new(flate2::read::GzDecoder::new(open(path)?)), limit)
        }
        Format::JsonLines { gzip: false } | Format::PlainText => {
            read_json_lines(path, BufReader::new(open(path)?), limit)
        }
    }
}

/// Reads up to `limit` documents (all when `None`) from `path`, in file order: the `text` field
/// of JSON lines and Parquet records, or plain text.
pub fn read_documents(path: &Path, limit: Option<usize>) -> Result<Vec<String>, DataError> {
    let limit = limit.unwrap_or(usize::MAX);
    let docs: Vec<String> = if format(path) == Format::PlainText {
        let mut text = String::new();
        open(path)?.take(MAX_TEXT_BYTES + 1).read_to_string(&mut text).map_err(io(path))?;
        if text.len() as u64 > MAX_TEXT_BYTES {
            let what = "the file".to_string();
            return Err(DataError::TooLarge { path: path.to_path_buf(), what, limit: MAX_TEXT_BYTES });
        }
        split_plain_text(&text).into_iter().take(limit).collect()
    } else {
        // The text is moved out of its record, not copied (healing reads every document).
        let text = |mut r: Record| match r.value.get_mut("text").map(serde_json::Value::take) {
            Some(serde_json::Value::String(t)) => Ok(t),
            _ => Err(DataError::Line {
                path: path.to_path_buf(),
                line: r.line as usize,
                message: "no string field `text`".into(),
            }),
        };
        records(path, Some(&["text"]), limit)?.into_iter().map(text).collect::<Result<_, _>>()?
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

fn read_json_lines(path: &Path, mut reader: impl BufRead, limit: usize) -> Result<Vec<Record>, DataError> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let mut line = 0u64;
    while out.len() < limit {
        buf.clear();
        let n = (&mut reader).take(MAX_LINE_BYTES + 1).read_until(b'\n', &mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        line += 1;
        if n as u64 > MAX_LINE_BYTES {
            let what = format!("line {line}");
            return Err(DataError::TooLarge { path: path.to_path_buf(), what, limit: MAX_LINE_BYTES });
        }
        let err = |message: String| DataError::Line { path: path.to_path_buf(), line: line as usize, message };
        let text = std::str::from_utf8(&buf).map_err(|e| err(format!("not UTF-8: {e}")))?;
        if text.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
        out.push(Record { line, value });
    }
    Ok(out)
}

fn read_parquet_records(path: &Path, columns: Option<&[&str]>, limit: usize) -> Result<Vec<Record>, DataError> {
    use polars::prelude::*;
    let err = |message: String| DataError::Parquet { path: path.to_path_buf(), message };
    let mut reader = ParquetReader::new(open(path)?).with_slice(Some((0, limit)));
    if let Some(columns) = columns {
        reader = reader.with_columns(Some(columns.iter().map(|c| c.to_string()).collect()));
    }
    let df = reader.finish().map_err(|e| {
        let need = columns.map_or(String::new(), |c| {
            format!(" (need columns {})", c.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "))
        });
        err(format!("cannot read Parquet{need}: {e}"))
    })?;
    let mut out = Vec::with_capacity(df.height());
    for i in 0..df.height() {
        let mut fields = serde_json::Map::new();
        for column in df.columns() {
            let cell = column.get(i).map_err(|e| err(format!("row {}: {e}", i + 1)))?;
            fields.insert(column.name().to_string(), any_value_json(&cell));
        }
        out.push(Record { line: i as u64 + 1, value: serde_json::Value::Object(fields) });
    }
    Ok(out)
}

/// A Parquet cell as JSON: strings, booleans, numbers, lists and nulls (what the data sets hold).
fn any_value_json(v: &polars::prelude::AnyValue) -> serde_json::Value {
    use polars::prelude::AnyValue;
    use serde_json::Value;
    match v {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(*b),
        AnyValue::String(s) => Value::String(s.to_string()),
        AnyValue::StringOwned(s) => Value::String(s.to_string()),
        AnyValue::List(series) => Value::Array(series.iter().map(|x| any_value_json(&x)).collect()),
        other => {
            if let Some(i) = other.extract::<i64>() {
                Value::from(i)
            } else if let Some(f) = other.extract::<f64>() {
                Value::from(f)
            } else {
                Value::String(other.to_string())
            }
        }
    }
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
    fn devices_and_oversized_lines_are_refused() {
        let e = read_documents(Path::new("/dev/zero"), Some(1)).unwrap_err().to_string();
        assert_eq!(e, "/dev/zero: not a regular file; give a data file");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(MAX_LINE_BYTES + 10).unwrap(); // one line of zero bytes, no newline
        let e = read_documents(&p, Some(1)).unwrap_err().to_string();
        assert!(
            e.ends_with(&format!("d.jsonl: line 1 is larger than {MAX_LINE_BYTES} bytes; is this the right file?")),
            "{e}"
        );
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
        // Records keep every column of a row, lists and numbers included.
        let mut df = df!("q" => ["a?", "b?"], "n" => [1i64, 2]).unwrap();
        ParquetWriter::new(std::fs::File::create(&pq).unwrap()).finish(&mut df).unwrap();
        let rows = records(&pq, None, 9).unwrap();
        assert_eq!(rows[1], Record { line: 2, value: serde_json::json!({"q": "b?", "n": 2}) });
    }
}
