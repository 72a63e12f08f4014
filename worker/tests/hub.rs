//! Models by Hub name, against a local server that answers the Hub's URLs from a folder holding
//! the tiny llama fixture (the real Hub is unreachable here): `/api/models/{org}/{name}/revision/
//! {rev}` (the commit and the file list) and `/{org}/{name}/resolve/{rev}/{file}` (the file, with
//! `Range`, `X-Repo-Commit` and an ETag that is the SHA-256 for weights, as the Hub's LFS files have).
//!
//! Checked: a download lands in the standard cache layout at the pinned commit and loads; a second
//! fetch downloads nothing; an interrupted weight file resumes from its `.part`; a gated model
//! without a token, an unknown model, an unknown revision and HF_HUB_OFFLINE without the cache give
//! errors that name the fix; a corrupted download is caught by its checksum; `worker score --model
//! org/name@rev` downloads and runs end to end.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use prunesweep_worker::model::hub::{fetch, HubConfig, HubError};
use sha2::{Digest, Sha256};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_secret";

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// What the server saw: (path, Range header) per request.
type Log = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// A Hub lookalike on 127.0.0.1: `org/tiny` (open) and `org/gated` (needs TOKEN), both at
/// revision `main` = COMMIT, serving the fixture's files. `corrupt` serves weights whose bytes do
/// not match their ETag.
struct FakeHub {
    url: String,
    log: Log,
}

impl FakeHub {
    fn start(corrupt: bool) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let files: HashMap<String, Vec<u8>> =
            ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
                .iter()
                .map(|f| (f.to_string(), std::fs::read(fixture().join(f)).unwrap()))
                .collect();
        let files = Arc::new(files);
        let log: Log = Arc::default();
        let server_log = log.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (files, log) = (files.clone(), server_log.clone());
                std::thread::spawn(move || {
                    let _ = serve(stream, &files, &log, corrupt);
                });
            }
        });
        FakeHub { url, log }
    }

    fn requests(&self) -> Vec<(String, Option<String>)> {
        self.log.lock().unwrap().clone()
    }

    fn config(&self, cache: &Path) -> HubConfig {
        HubConfig {
            endpoint: self.url.clone(),
            token: None,
            offline: false,
            cache: cache.to_path_buf(),
            progress: false,
        }
    }
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One request per connection (`Connection: close`).
fn serve(stream: TcpStream, files: &HashMap<String, Vec<u8>>, log: &Log, corrupt: bool) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let range = headers.get("range").cloned();
    log.lock().unwrap().push((path.clone(), range.clone()));
    let authorized = headers.get("authorization").is_some_and(|a| a == &format!("Bearer {TOKEN}"));
    let mut out = stream;
    let respond = |out: &mut TcpStream, status: &str, extra: &[(String, String)], body: &[u8]| -> std::io::Result<()> {
        write!(out, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len())?;
        for (k, v) in extra {
            write!(out, "{k}: {v}\r\n")?;
        }
        write!(out, "\r\n")?;
        out.write_all(body)?;
        out.flush()
    };
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    // /api/models/{org}/{name}/revision/{rev}
    let (repo, rest): (String, Vec<&str>) = match parts.as_slice() {
        ["api", "models", org, name, "revision", rev] => (format!("{org}/{name}"), vec!["api", rev]),
        [org, name, "resolve", rev, file] => (format!("{org}/{name}"), vec!["file", rev, file]),
        _ => return respond(&mut out, "404 Not Found", &[], b"{\"error\":\"not found\"}"),
    };
    let known = repo == "org/tiny" || repo == "org/gated";
    if repo == "org/gated" && !authorized {
        return respond(&mut out, "401 Unauthorized", &[], b"{\"error\":\"gated\"}");
    }
    let rev_ok = |rev: &str| rev == "main" || rev == COMMIT;
    match rest.as_slice() {
        ["api", rev] if known && rev_ok(rev) => {
            let siblings: Vec<_> = files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
            let body = serde_json::json!({ "sha": COMMIT, "siblings": siblings }).to_string();
            respond(&mut out, "200 OK", &[], body.as_bytes())
        }
        ["file", rev, file] if known && rev_ok(rev) => {
            let Some(bytes) = files.get(*file) else { return respond(&mut out, "404 Not Found", &[], b"") };
            let mut body = bytes.clone();
            let etag = if file.ends_with(".safetensors") {
                if corrupt {
                    let n = body.len();
                    body[n / 2] ^= 0xff;
                }
                format!("\"{}\"", sha256(bytes))
            } else {
                format!("\"git-{}\"", &sha256(bytes)[..40])
            };
            let mut extra = vec![("X-Repo-Commit".to_string(), COMMIT.to_string()), ("ETag".to_string(), etag)];
            let total = body.len();
            let (status, slice) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                Some(r) => {
                    let (a, b) = r.split_once('-').unwrap();
                    let start: usize = a.parse().unwrap();
                    let end: usize = if b.is_empty() { total - 1 } else { b.parse().unwrap() };
                    extra.push(("Content-Range".to_string(), format!("bytes {start}-{end}/{total}")));
                    ("206 Partial Content", &body[start..=end])
                }
                None => ("200 OK", &body[..]),
            };
            respond(&mut out, status, &extra, slice)
        }
        _ => respond(&mut out, "404 Not Found", &[], b"{\"error\":\"Repository not found\"}"),
    }
}

fn downloads(hub: &FakeHub) -> Vec<String> {
    hub.requests()
        .into_iter()
        .filter(|(p, r)| p.contains("/resolve/") && r.as_deref() != Some("bytes=0-0"))
        .map(|(p, _)| p)
        .collect()
}

#[test]
fn a_model_by_hub_name_lands_in_the_cache_at_its_commit_once() {
    let hub = FakeHub::start(false);
    let cache = tempfile::tempdir().unwrap();
    let model = fetch("org/tiny", None, &hub.config(cache.path())).unwrap();
    assert_eq!(model.commit, COMMIT);
    assert_eq!(model.revision, "main");
    let folder = cache.path().join("models--org--tiny");
    assert_eq!(model.dir, folder.join("snapshots").join(COMMIT));
    assert_eq!(std::fs::read_to_string(folder.join("refs/main")).unwrap().trim(), COMMIT);
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert_eq!(std::fs::read(model.dir.join(f)).unwrap(), std::fs::read(fixture().join(f)).unwrap(), "{f}");
    }
    // The weights' blob is named by its SHA-256, as the Hub's LFS files are.
    let weights = std::fs::read(fixture().join("model.safetensors")).unwrap();
    assert!(folder.join("blobs").join(sha256(&weights)).is_file());
    // The snapshot is an HF directory the worker loads.
    let loaded = prunesweep_worker::model::Model::load(&model.dir, &candle_core::Device::Cpu).unwrap();
    assert_eq!(loaded.decoder.num_blocks(), 4);

    // Again: the branch is pinned anew (one API call), nothing is downloaded; by commit, no call.
    let before = downloads(&hub).len();
    assert_eq!(fetch("org/tiny", Some("main"), &hub.config(cache.path())).unwrap(), model);
    assert_eq!(downloads(&hub).len(), before, "a cached model is not downloaded again");
    let calls = hub.requests().len();
    fetch("org/tiny", Some(COMMIT), &hub.config(cache.path())).unwrap();
    assert_eq!(hub.requests().len(), calls, "a cached commit needs no network");
    // Offline, from the cache.
    let offline = HubConfig { offline: true, endpoint: "http://127.0.0.1:9".into(), ..hub.config(cache.path()) };
    assert_eq!(fetch("org/tiny", None, &offline).unwrap().dir, model.dir);
}

#[test]
fn an_interrupted_download_resumes_from_its_part_file() {
    let hub = FakeHub::start(false);
    let cache = tempfile::tempdir().unwrap();
    let weights = std::fs::read(fixture().join("model.safetensors")).unwrap();
    let blobs = cache.path().join("models--org--tiny/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let half = weights.len() / 2;
    std::fs::write(blobs.join(format!("{}.part", sha256(&weights))), &weights[..half]).unwrap();
    let model = fetch("org/tiny", None, &hub.config(cache.path())).unwrap();
    assert_eq!(std::fs::read(model.dir.join("model.safetensors")).unwrap(), weights);
    let ranges: Vec<_> =
        hub.requests().into_iter().filter(|(p, _)| p.ends_with("model.safetensors")).filter_map(|(_, r)| r).collect();
    assert!(ranges.contains(&format!("bytes={half}-")), "resumed from byte {half}: {ranges:?}");
}

#[test]
fn errors_name_the_model_and_the_fix() {
    let hub = FakeHub::start(false);
    let cache = tempfile::tempdir().unwrap();
    let cfg = hub.config(cache.path());

    let gated = fetch("org/gated", None, &cfg).unwrap_err();
    assert!(matches!(gated, HubError::Gated { status: 401, .. }), "{gated:?}");
    assert!(gated.to_string().contains("HF_TOKEN") && gated.to_string().contains("org/gated"), "{gated}");
    let with_token = HubConfig { token: Some(TOKEN.into()), ..cfg.clone() };
    assert_eq!(fetch("org/gated", None, &with_token).unwrap().commit, COMMIT);

    let unknown = fetch("org/nope", None, &cfg).unwrap_err();
    assert!(matches!(unknown, HubError::NotFound { .. }) && unknown.to_string().contains("org/nope"), "{unknown}");
    let bad_rev = fetch("org/tiny", Some("v9"), &cfg).unwrap_err();
    assert!(bad_rev.to_string().contains("revision v9"), "{bad_rev}");

    let offline = HubConfig { offline: true, ..cfg.clone() };
    let err = fetch("org/other", None, &offline).unwrap_err();
    assert!(err.to_string().contains("HF_HUB_OFFLINE") && err.to_string().contains("org/other@main"), "{err}");

    let down = HubConfig { endpoint: "http://127.0.0.1:9".into(), ..cfg };
    let err = fetch("org/tiny", None, &down).unwrap_err();
    assert!(matches!(err, HubError::Transfer { .. }) && err.to_string().contains("HF_HUB_OFFLINE"), "{err}");
}

#[test]
fn a_corrupted_download_fails_its_checksum_and_is_removed() {
    let hub = FakeHub::start(true);
    let cache = tempfile::tempdir().unwrap();
    let err = fetch("org/tiny", None, &hub.config(cache.path())).unwrap_err();
    assert!(matches!(err, HubError::Checksum { .. }), "{err:?}");
    assert!(err.to_string().contains("run again"), "{err}");
    let snapshot = cache.path().join("models--org--tiny/snapshots").join(COMMIT);
    assert!(!snapshot.join("model.safetensors").exists(), "the bad file is not left in the cache");
}

/// The worker binary with `--model org/name@rev`: HF_ENDPOINT and HF_HUB_CACHE point at the local
/// Hub and a temp cache.
#[test]
fn worker_score_downloads_a_model_named_by_hub_id() {
    let hub = FakeHub::start(false);
    let cache = tempfile::tempdir().unwrap();
    let out = cache.path().join("scores.json");
    let c4 = common::c4_sample();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .args(["score", "--model", &format!("org/tiny@{COMMIT}"), "--samples", "2", "--seq-len", "16", "--data"])
        .arg(&c4)
        .arg("--out")
        .arg(&out)
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_HUB_CACHE", cache.path())
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(cache.path().join("models--org--tiny/snapshots").join(COMMIT).join("model.safetensors").is_file());
    assert!(out.is_file());
}
