//! Reports not yet accepted by a coordinator, kept on disk so that finished work outlives the
//! coordinator's outage and the worker's own restart.
//!
//! Before a worker reports a job, it writes the report (`CompleteJob` or `FailJob`, protobuf-encoded)
//! to `work_dir/outbox/<job id>-<lease id>.pb` (written to a temporary file, fsynced, renamed,
//! directory fsynced), and removes it once a coordinator accepted it or refused it for good (a
//! stale lease, a cancelled sweep). A worker replays what is left when it starts and before
//! each lease, so a result finished while the coordinator was down is delivered when it returns.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use prunesweep_proto::v1::{CompleteJobRequest, FailJobRequest};

/// One report to deliver.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    /// The job finished with results (boxed: far larger than a failure).
    Complete(Box<CompleteJobRequest>),
    /// The job failed.
    Fail(FailJobRequest),
}

impl Report {
    /// The job it reports.
    pub fn job_id(&self) -> i64 {
        match self {
            Report::Complete(r) => r.job_id,
            Report::Fail(r) => r.job_id,
        }
    }

    fn lease_id(&self) -> &str {
        match self {
            Report::Complete(r) => &r.lease_id,
            Report::Fail(r) => &r.lease_id,
        }
    }

    fn encode(&self) -> Vec<u8> {
        let (tag, body) = match self {
            Report::Complete(r) => (b'C', r.encode_to_vec()),
            Report::Fail(r) => (b'F', r.encode_to_vec()),
        };
        std::iter::once(tag).chain(body).collect()
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        match bytes.split_first()? {
            (b'C', body) => CompleteJobRequest::decode(body).ok().map(|r| Report::Complete(Box::new(r))),
            (b'F', body) => FailJobRequest::decode(body).ok().map(Report::Fail),
            _ => None,
        }
    }
}

/// The folder of undelivered reports.
#[derive(Debug, Clone)]
pub struct Outbox {
    dir: PathBuf,
}

/// A stored report and where it lies.
#[derive(Debug, Clone)]
pub struct Stored {
    /// Its file.
    pub path: PathBuf,
    /// The report.
    pub report: Report,
}

impl Outbox {
    /// The outbox under `work_dir` (created on first write).
    pub fn new(work_dir: &Path) -> Self {
        Outbox { dir: work_dir.join("outbox") }
    }

    /// Writes `report` durably; returns its file.
    pub fn put(&self, report: &Report) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(&self.dir)?;
        let name = format!("{}-{}.pb", report.job_id(), sanitize(report.lease_id()));
        let path = self.dir.join(&name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&report.encode())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }

    /// Every stored report, oldest job first. An unreadable file is set aside as `*.bad` (and
    /// logged) rather than blocking the others.
    pub fn pending(&self) -> Vec<Stored> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut out = Vec::new();
        for path in entries.flatten().map(|e| e.path()) {
            if path.extension().and_then(|e| e.to_str()) != Some("pb") {
                continue;
            }
            match std::fs::read(&path).ok().and_then(|b| Report::decode(&b)) {
                Some(report) => out.push(Stored { path, report }),
                None => {
                    tracing::error!(path = %path.display(), "an unreadable report; set aside as .bad");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                }
            }
        }
        out.sort_by_key(|s| s.report.job_id());
        out
    }

    /// Forgets a delivered (or refused) report.
    pub fn remove(&self, path: &Path) {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a delivered report");
        }
    }
}

/// A lease id as part of a file name.
fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prunesweep_proto::v1::ResultRow;

    #[test]
    fn reports_survive_on_disk_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let outbox = Outbox::new(dir.path());
        assert!(outbox.pending().is_empty(), "no folder yet: nothing pending");
        let done = Report::Complete(Box::new(CompleteJobRequest {
            worker_id: "w".into(),
            lease_id: "lease/1".into(),
            job_id: 9,
            results: vec![ResultRow { task: "c4-loss".into(), metric: "loss".into(), value: 3.25 }],
            ..CompleteJobRequest::default()
        }));
        let failed = Report::Fail(FailJobRequest { job_id: 4, lease_id: "l2".into(), ..FailJobRequest::default() });
        let path = outbox.put(&done).unwrap();
        outbox.put(&failed).unwrap();
        std::fs::write(dir.path().join("outbox/7-x.pb"), b"garbage").unwrap();
        // A fresh outbox on the same folder (a restarted worker) sees both, oldest job first.
        let pending = Outbox::new(dir.path()).pending();
        assert_eq!(pending.iter().map(|s| s.report.clone()).collect::<Vec<_>>(), [failed, done]);
        assert!(dir.path().join("outbox/7-x.bad").exists(), "the unreadable one is set aside");
        outbox.remove(&path);
        assert_eq!(outbox.pending().len(), 1);
    }
}
