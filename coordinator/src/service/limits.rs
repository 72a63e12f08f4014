//! What one RPC may carry: message sizes, string lengths and list lengths of worker calls, the
//! size of a `ListResults` page, finite values in a completion. Checked before the store is
//! touched; each refusal is `INVALID_ARGUMENT` and names the field, the size given and the limit.

use prunesweep_proto::v1 as pb;
use tonic::Status;

/// The largest request either service decodes (tonic's default is 4 MiB): a sweep file is at
/// most 4 MiB of YAML, and a score job's distance table is well under this.
pub const MAX_DECODING_MESSAGE_SIZE: usize = 8 * 1024 * 1024;
/// The largest reply either service encodes; `ListResults` pages stay far below it.
pub const MAX_ENCODING_MESSAGE_SIZE: usize = 8 * 1024 * 1024;
/// The most jobs in one `ListResults` page (a `page_size` of 0 or above it gives this).
pub const MAX_RESULTS_PAGE_SIZE: u32 = 1000;
/// A `ListResults` page stops adding jobs once its encoding passes this many bytes, so a page of
/// jobs with long specs still fits in a client's default 4 MiB limit.
pub const RESULTS_PAGE_BYTES: usize = 2 * 1024 * 1024;
/// The longest worker name, device, version, phase, error kind, task or metric name, in bytes.
pub const MAX_WORKER_STRING_LEN: usize = 256;
/// The longest model source in `held_models` (a path), in bytes.
pub const MAX_HELD_MODEL_LEN: usize = 4096;
/// The most `held_models` in one `LeaseJob`.
pub const MAX_HELD_MODELS: usize = 256;
/// A `FailJob` message longer than this is cut to it (on a character boundary) and marked: the
/// failure is recorded all the same.
pub const MAX_FAILURE_MESSAGE_LEN: usize = 16 * 1024;
/// The most result rows, timings and dropped layers in one `CompleteJob`.
pub const MAX_RESULT_ROWS: usize = 10_000;
/// The most distance rows in one `CompleteJob` (a score job of a 1,000-layer model has ~500,000).
pub const MAX_DISTANCE_ROWS: usize = 1_000_000;

/// `field` is at most `max` bytes.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!("`{field}` is {} bytes long; the limit is {max}", value.len())));
    }
    Ok(())
}

/// `field` lists at most `max` entries.
pub fn check_count(field: &str, len: usize, max: usize) -> Result<(), Status> {
    if len > max {
        return Err(Status::invalid_argument(format!("`{field}` has {len} entries; the limit is {max}")));
    }
    Ok(())
}

/// A name that ends up in file names and table headers (task, metric, phase): 1 to
/// [`MAX_WORKER_STRING_LEN`] characters from `[A-Za-z0-9._-]`, starting with a letter or digit
/// (so never `..`).
pub fn check_name(field: &str, value: &str) -> Result<(), Status> {
    let ok = value.len() <= MAX_WORKER_STRING_LEN
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !ok {
        let shown: String = value.chars().take(64).collect();
        return Err(Status::invalid_argument(format!(
            "`{field}` must be 1-{MAX_WORKER_STRING_LEN} characters from [A-Za-z0-9._-], starting with a letter or \
             digit. Given: {shown:?}{}",
            if shown.len() < value.len() { "…" } else { "" }
        )));
    }
    Ok(())
}

/// A value stored as a result must be a number: `results[3].value is NaN`.
fn check_finite(field: &str, value: f64) -> Result<(), Status> {
    if !value.is_finite() {
        return Err(Status::invalid_argument(format!(
            "{field} is {value}: only finite values are stored; report a job whose outputs are not finite \
             with FailJob"
        )));
    }
    Ok(())
}

/// The checks on a `CompleteJob` before anything is written: sizes, names, finite numbers.
pub fn check_completion(req: &pb::CompleteJobRequest) -> Result<(), Status> {
    check_len("lease_id", &req.lease_id, MAX_WORKER_STRING_LEN)?;
    check_count("results", req.results.len(), MAX_RESULT_ROWS)?;
    check_count("timings", req.timings.len(), MAX_RESULT_ROWS)?;
    check_count("layers_dropped", req.layers_dropped.len(), MAX_RESULT_ROWS)?;
    check_count("distances", req.distances.len(), MAX_DISTANCE_ROWS)?;
    for (i, r) in req.results.iter().enumerate() {
        check_name(&format!("results[{i}].task"), &r.task)?;
        check_name(&format!("results[{i}].metric"), &r.metric)?;
        check_finite(&format!("results[{i}].value"), r.value)?;
    }
    for (i, d) in req.distances.iter().enumerate() {
        check_finite(&format!("distances[{i}].value"), d.value)?;
    }
    for (i, t) in req.timings.iter().enumerate() {
        check_name(&format!("timings[{i}].phase"), &t.phase)?;
        check_finite(&format!("timings[{i}].seconds"), t.seconds)?;
    }
    Ok(())
}

/// `Register`'s strings.
pub fn check_register(req: &pb::RegisterRequest) -> Result<(), Status> {
    check_len("name", &req.name, MAX_WORKER_STRING_LEN)?;
    check_len("device", &req.device, MAX_WORKER_STRING_LEN)?;
    check_len("version", &req.version, MAX_WORKER_STRING_LEN)
}

/// `LeaseJob`'s worker id and held models.
pub fn check_lease(req: &pb::LeaseJobRequest) -> Result<(), Status> {
    check_len("worker_id", &req.worker_id, MAX_WORKER_STRING_LEN)?;
    check_count("held_models", req.held_models.len(), MAX_HELD_MODELS)?;
    for (i, m) in req.held_models.iter().enumerate() {
        check_len(&format!("held_models[{i}]"), m, MAX_HELD_MODEL_LEN)?;
    }
    Ok(())
}

/// `Heartbeat`'s ids and phase.
pub fn check_heartbeat(req: &pb::HeartbeatRequest) -> Result<(), Status> {
    check_len("worker_id", &req.worker_id, MAX_WORKER_STRING_LEN)?;
    check_len("lease_id", &req.lease_id, MAX_WORKER_STRING_LEN)?;
    if let Some(phase) = &req.phase {
        check_len("phase", phase, MAX_WORKER_STRING_LEN)?;
    }
    Ok(())
}

/// `FailJob`'s ids and error kind are checked; its message is cut to [`MAX_FAILURE_MESSAGE_LEN`]
/// (the failure still counts: refusing it would leave the job leased until its lease expires).
pub fn check_failure(req: &mut pb::FailJobRequest) -> Result<(), Status> {
    check_len("worker_id", &req.worker_id, MAX_WORKER_STRING_LEN)?;
    check_len("lease_id", &req.lease_id, MAX_WORKER_STRING_LEN)?;
    check_len("error_kind", &req.error_kind, MAX_WORKER_STRING_LEN)?;
    if req.message.len() > MAX_FAILURE_MESSAGE_LEN {
        let mut end = MAX_FAILURE_MESSAGE_LEN;
        while !req.message.is_char_boundary(end) {
            end -= 1;
        }
        let total = req.message.len();
        req.message.truncate(end);
        req.message.push_str(&format!(" … [cut: {total} bytes in all]"));
    }
    Ok(())
}
