//! `deploy/`: the Kubernetes manifests parse and carry what a cluster needs, and the Dockerfiles
//! build what the build scripts build. No `kubectl` or `docker` here: this checks the files.
//!
//! Every YAML document under `deploy/k8s/` (multi-document files split on `---`) is parsed with
//! serde-saphyr into `serde_json::Value`, then:
//! - every object has `apiVersion`, `kind`, `metadata.name` (and the namespace, where namespaced);
//! - the coordinator Deployment serves on 0.0.0.0:50051, probes readiness and liveness with
//!   Kubernetes' gRPC probe on that port, and takes its Postgres URL and both token files from a
//!   Secret (one the templates define, with those keys); its Service routes to it on 50051;
//! - the worker Deployment requests `nvidia.com/gpu: 1`, waits ≥ 120 s for a healing checkpoint
//!   on SIGTERM, passes `--device cuda:0`, `--work-dir` on a mounted writable volume (a
//!   ReadWriteMany claim or an emptyDir), model and data roots on mounted volumes, a token file
//!   from a Secret, and the coordinator Service's address;
//! - every container runs as non-root without privilege escalation;
//! - kustomization.yaml lists every manifest but the Secret templates, and only files that exist.
//!
//! Each check returns its complaints instead of panicking, so `checks_catch_broken_manifests`
//! can break a copy of the manifests (drop a probe, the GPU limit, the grace period...) and see
//! each complaint appear.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

const NAMESPACE: &str = "prunesweep";
const COORDINATOR: &str = "prunesweep-coordinator";
const WORKER: &str = "prunesweep-worker";
const GRPC_PORT: i64 = 50051;
/// The least grace period that leaves a healing job time to checkpoint.
const MIN_WORKER_GRACE_SECS: i64 = 120;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// One parsed YAML document and the file it came from.
#[derive(Clone)]
struct Doc {
    file: String,
    value: Value,
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
}

/// Every non-empty document of every YAML file under deploy/k8s.
fn load_docs() -> Vec<Doc> {
    let root = repo().join("deploy/k8s");
    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    assert!(!files.is_empty(), "no YAML under {}", root.display());
    let mut docs = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let file = path.strip_prefix(&root).unwrap().to_string_lossy().into_owned();
        let values: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
        let before = docs.len();
        docs.extend(values.into_iter().filter(|v| !v.is_null()).map(|value| Doc { file: file.clone(), value }));
        assert!(docs.len() > before, "{file}: no YAML document in it");
    }
    docs
}

fn s<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// An integer written as a number or a string (`1` or `"1"`).
fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

fn arr<'a>(v: &'a Value, pointer: &str) -> &'a [Value] {
    v.pointer(pointer).and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

fn kind_name(doc: &Doc) -> (String, String) {
    let v = &doc.value;
    (s(v, "/kind").unwrap_or("?").to_string(), s(v, "/metadata/name").unwrap_or("?").to_string())
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> Option<&'a Doc> {
    docs.iter().find(|d| kind_name(d) == (kind.to_string(), name.to_string()))
}

/// The value after `flag` in `args` (`--flag value` or `--flag=value`).
fn flag<'a>(args: &'a [Value], name: &str) -> Option<&'a str> {
    let args: Vec<&str> = args.iter().filter_map(Value::as_str).collect();
    for (i, a) in args.iter().enumerate() {
        if *a == name {
            return args.get(i + 1).copied();
        }
        if let Some(v) = a.strip_prefix(name).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}

/// The pod spec of a workload, if it is one.
fn pod_spec(v: &Value) -> Option<&Value> {
    match s(v, "/kind")? {
        "Pod" => v.pointer("/spec"),
        "CronJob" => v.pointer("/spec/jobTemplate/spec/template/spec"),
        "Deployment" | "StatefulSet" | "DaemonSet" | "Job" | "ReplicaSet" => v.pointer("/spec/template/spec"),
        _ => None,
    }
}

fn containers(pod: &Value) -> Vec<&Value> {
    arr(pod, "/initContainers").iter().chain(arr(pod, "/containers")).collect()
}

/// `Secret name → its keys` (from `data` and `stringData`).
fn secrets(docs: &[Doc]) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for d in docs.iter().filter(|d| s(&d.value, "/kind") == Some("Secret")) {
        let mut keys = Vec::new();
        for field in ["/data", "/stringData"] {
            if let Some(map) = d.value.pointer(field).and_then(Value::as_object) {
                keys.extend(map.keys().cloned());
            }
        }
        out.insert(s(&d.value, "/metadata/name").unwrap_or("?").to_string(), keys);
    }
    out
}

/// Where `path` comes from in this container: the volume mounted at it or at a folder above it,
/// and the mount.
fn mount_for<'a>(pod: &'a Value, container: &'a Value, path: &str) -> Option<(&'a Value, &'a Value)> {
    let mount = arr(container, "/volumeMounts")
        .iter()
        .filter(|m| {
            let at = s(m, "/mountPath").unwrap_or("\u{0}").trim_end_matches('/');
            path == at || path.starts_with(&format!("{at}/"))
        })
        .max_by_key(|m| s(m, "/mountPath").unwrap_or("").len())?;
    let name = s(mount, "/name")?;
    let volume = arr(pod, "/volumes").iter().find(|v| s(v, "/name") == Some(name))?;
    Some((volume, mount))
}

/// `path` is a file of a Secret volume that a template defines with that key.
fn check_secret_file(
    errors: &mut Vec<String>,
    what: &str,
    pod: &Value,
    container: &Value,
    path: &str,
    secrets: &BTreeMap<String, Vec<String>>,
) {
    let Some((volume, mount)) = mount_for(pod, container, path) else {
        return errors.push(format!("{what}: {path} is on no mounted volume"));
    };
    let Some(secret) = s(volume, "/secret/secretName") else {
        return errors.push(format!("{what}: {path} is not on a Secret volume"));
    };
    let Some(keys) = secrets.get(secret) else {
        return errors.push(format!("{what}: Secret {secret} is in no template under deploy/k8s"));
    };
    let at = s(mount, "/mountPath").unwrap_or("").trim_end_matches('/');
    let file = path[at.len()..].trim_start_matches('/');
    let items = arr(volume, "/secret/items");
    let key = if items.is_empty() {
        Some(file)
    } else {
        items.iter().find(|i| s(i, "/path") == Some(file)).and_then(|i| s(i, "/key"))
    };
    match key {
        Some(k) if keys.iter().any(|have| have == k) => {}
        _ => errors.push(format!("{what}: {path} is no key of Secret {secret} (keys: {keys:?})")),
    }
}

// --- the checks ---------------------------------------------------------------------------------

/// apiVersion, kind, metadata.name everywhere; the namespace on namespaced objects.
fn check_metadata(docs: &[Doc]) -> Vec<String> {
    let mut errors = Vec::new();
    for d in docs {
        let v = &d.value;
        if s(v, "/kind") == Some("Kustomization") {
            continue; // not an object the API server sees
        }
        for field in ["/apiVersion", "/kind", "/metadata/name"] {
            if s(v, field).is_none_or(str::is_empty) {
                errors.push(format!("{}: a document without {field}", d.file));
            }
        }
        let cluster_scoped = matches!(s(v, "/kind"), Some("Namespace" | "ClusterRole" | "ClusterRoleBinding"));
        if !cluster_scoped && s(v, "/metadata/namespace") != Some(NAMESPACE) {
            let (kind, name) = kind_name(d);
            errors.push(format!("{}: {kind} {name} is not in namespace {NAMESPACE}", d.file));
        }
    }
    if !docs.iter().any(|d| kind_name(d) == ("Namespace".into(), NAMESPACE.into())) {
        errors.push(format!("no Namespace {NAMESPACE}"));
    }
    errors
}

/// The coordinator: listen address, gRPC probes, Postgres URL and tokens from a Secret, Service.
fn check_coordinator(docs: &[Doc]) -> Vec<String> {
    let mut errors = Vec::new();
    let Some(deploy) = find(docs, "Deployment", COORDINATOR) else {
        return vec![format!("no Deployment {COORDINATOR}")];
    };
    let v = &deploy.value;
    if int(v.pointer("/spec/replicas")).is_some_and(|r| r < 1) {
        errors.push("coordinator: replicas < 1".into());
    }
    let pod = pod_spec(v).unwrap();
    let Some(c) = arr(pod, "/containers").first() else {
        return vec!["coordinator: no container".into()];
    };
    let args = arr(c, "/args");
    if args.first().and_then(Value::as_str) != Some("serve") {
        errors.push(format!("coordinator: args do not start with `serve`: {args:?}"));
    }
    match flag(args, "--listen") {
        Some(l) if l == format!("0.0.0.0:{GRPC_PORT}") || l == format!("[::]:{GRPC_PORT}") => {}
        other => errors.push(format!("coordinator: --listen {other:?}, not 0.0.0.0:{GRPC_PORT}")),
    }
    if !arr(c, "/ports").iter().any(|p| int(p.get("containerPort")) == Some(GRPC_PORT)) {
        errors.push(format!("coordinator: no containerPort {GRPC_PORT}"));
    }
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        let Some(p) = c.get(probe) else {
            if probe != "startupProbe" {
                errors.push(format!("coordinator: no {probe}"));
            }
            continue;
        };
        if int(p.pointer("/grpc/port")) != Some(GRPC_PORT) {
            errors.push(format!("coordinator: {probe} is not a grpc probe on port {GRPC_PORT}: {p}"));
        }
    }
    let secrets = secrets(docs);
    // The Postgres URL: PRUNESWEEP_DATABASE from a Secret key that a template defines, and no
    // URL written into the manifest (`--database`, if given, only expands that variable).
    let db_env = arr(c, "/env").iter().find(|e| s(e, "/name") == Some("PRUNESWEEP_DATABASE"));
    match db_env.map(|e| (s(e, "/valueFrom/secretKeyRef/name"), s(e, "/valueFrom/secretKeyRef/key"))) {
        Some((Some(secret), Some(key))) => {
            if !secrets.get(secret).is_some_and(|keys| keys.iter().any(|k| k == key)) {
                errors.push(format!("coordinator: PRUNESWEEP_DATABASE from {secret}/{key}, which no template defines"));
            }
        }
        _ => errors.push("coordinator: PRUNESWEEP_DATABASE does not come from a secretKeyRef".into()),
    }
    if let Some(db) = flag(args, "--database") {
        if db != "$(PRUNESWEEP_DATABASE)" {
            errors.push(format!("coordinator: --database {db}, not $(PRUNESWEEP_DATABASE)"));
        }
    }
    if c.to_string().contains("postgres://") {
        errors.push("coordinator: a postgres:// URL written in the Deployment".into());
    }
    // Both token files, from a Secret.
    for f in ["--token-file", "--worker-token-file"] {
        match flag(args, f) {
            Some(path) => check_secret_file(&mut errors, &format!("coordinator {f}"), pod, c, path, &secrets),
            None => errors.push(format!("coordinator: no {f}")),
        }
    }
    if int(pod.get("terminationGracePeriodSeconds")).is_none() {
        errors.push("coordinator: no terminationGracePeriodSeconds".into());
    }
    if c.pointer("/resources/requests").is_none() {
        errors.push("coordinator: no resource requests".into());
    }
    // The Service in front of it.
    match find(docs, "Service", COORDINATOR) {
        None => errors.push(format!("no Service {COORDINATOR}")),
        Some(svc) => {
            let svc = &svc.value;
            if !matches!(s(svc, "/spec/type"), None | Some("ClusterIP")) {
                errors.push("coordinator Service is not ClusterIP".into());
            }
            let labels = v.pointer("/spec/template/metadata/labels").and_then(Value::as_object);
            let selector = svc.pointer("/spec/selector").and_then(Value::as_object);
            match (selector, labels) {
                (Some(sel), Some(labels)) if !sel.is_empty() && sel.iter().all(|(k, x)| labels.get(k) == Some(x)) => {}
                _ => errors.push("coordinator Service's selector does not match the pod's labels".into()),
            }
            let port = arr(svc, "/spec/ports").iter().find(|p| int(p.get("port")) == Some(GRPC_PORT));
            match port.and_then(|p| p.get("targetPort")) {
                None => errors.push(format!("coordinator Service: no port {GRPC_PORT}")),
                Some(Value::String(name)) if arr(c, "/ports").iter().any(|p| s(p, "/name") == Some(name)) => {}
                Some(t) if int(Some(t)) == Some(GRPC_PORT) => {}
                Some(t) => {
                    errors.push(format!("coordinator Service: targetPort {t} is not the container's {GRPC_PORT}"))
                }
            }
        }
    }
    errors
}

/// The workers: GPU, grace period, device, work dir, roots, token, coordinator address.
fn check_worker(docs: &[Doc]) -> Vec<String> {
    let mut errors = Vec::new();
    let workload = docs.iter().find(|d| {
        matches!(s(&d.value, "/kind"), Some("Deployment" | "Job" | "StatefulSet"))
            && s(&d.value, "/metadata/name") == Some(WORKER)
    });
    let Some(workload) = workload else {
        return vec![format!("no Deployment/Job {WORKER}")];
    };
    let pod = pod_spec(&workload.value).unwrap();
    let Some(c) = arr(pod, "/containers").first() else {
        return vec!["worker: no container".into()];
    };
    let args = arr(c, "/args");
    if args.first().and_then(Value::as_str) != Some("serve") {
        errors.push(format!("worker: args do not start with `serve`: {args:?}"));
    }
    if int(c.pointer("/resources/limits/nvidia.com~1gpu")) != Some(1) {
        errors.push("worker: resources.limits has no `nvidia.com/gpu: 1`".into());
    }
    match int(pod.get("terminationGracePeriodSeconds")) {
        Some(g) if g >= MIN_WORKER_GRACE_SECS => {}
        g => errors.push(format!(
            "worker: terminationGracePeriodSeconds {g:?} < {MIN_WORKER_GRACE_SECS} (a healing job needs time to checkpoint)"
        )),
    }
    if flag(args, "--device") != Some("cuda:0") {
        errors.push(format!("worker: --device {:?}, not cuda:0", flag(args, "--device")));
    }
    // The work dir: on a mounted, writable volume that outlives the container.
    match flag(args, "--work-dir") {
        None => errors.push("worker: no --work-dir".into()),
        Some(dir) => match mount_for(pod, c, dir) {
            None => errors.push(format!("worker: --work-dir {dir} is on no mounted volume")),
            Some((volume, mount)) => {
                if mount.get("readOnly").and_then(Value::as_bool) == Some(true) {
                    errors.push(format!("worker: --work-dir {dir} is mounted read-only"));
                }
                if let Some(claim) = s(volume, "/persistentVolumeClaim/claimName") {
                    match find(docs, "PersistentVolumeClaim", claim) {
                        None => errors.push(format!("worker: work-dir claim {claim} is defined nowhere")),
                        Some(pvc) => {
                            if !arr(&pvc.value, "/spec/accessModes").iter().any(|m| m == "ReadWriteMany") {
                                errors.push(format!("worker: work-dir claim {claim} is not ReadWriteMany"));
                            }
                        }
                    }
                } else if volume.get("emptyDir").is_none() {
                    errors.push(format!("worker: --work-dir {dir} is on neither a PVC nor an emptyDir"));
                }
            }
        },
    }
    for root in ["--model-root", "--data-root"] {
        match flag(args, root) {
            None => errors.push(format!("worker: no {root}")),
            Some(dir) => {
                if mount_for(pod, c, dir).is_none() {
                    errors.push(format!("worker: {root} {dir} is on no mounted volume"));
                }
            }
        }
    }
    // The token file: PRUNESWEEP_TOKEN_FILE or --token-file, on a Secret volume.
    let env_file =
        arr(c, "/env").iter().find(|e| s(e, "/name") == Some("PRUNESWEEP_TOKEN_FILE")).and_then(|e| s(e, "/value"));
    match flag(args, "--token-file").or(env_file) {
        None => errors.push("worker: no token file (PRUNESWEEP_TOKEN_FILE or --token-file)".into()),
        Some(path) => check_secret_file(&mut errors, "worker token file", pod, c, path, &secrets(docs)),
    }
    // The coordinator: its Service, on the gRPC port.
    match flag(args, "--coordinator") {
        None => errors.push("worker: no --coordinator".into()),
        Some(url) => {
            let host_port = url.split("://").nth(1).unwrap_or(url);
            let (host, port) = host_port.rsplit_once(':').unwrap_or((host_port, ""));
            let host = host.split('.').next().unwrap_or(host);
            if host != COORDINATOR || port.trim_end_matches('/') != GRPC_PORT.to_string() {
                errors.push(format!("worker: --coordinator {url} is not the Service {COORDINATOR}:{GRPC_PORT}"));
            }
        }
    }
    errors
}

/// Every container of every workload runs as non-root and cannot gain privileges.
fn check_non_root(docs: &[Doc]) -> Vec<String> {
    let mut errors = Vec::new();
    let mut workloads = 0;
    for d in docs {
        let Some(pod) = pod_spec(&d.value) else { continue };
        workloads += 1;
        let (kind, name) = kind_name(d);
        let pod_sc = pod.get("securityContext");
        for c in containers(pod) {
            let cname = s(c, "/name").unwrap_or("?");
            let what = format!("{kind} {name}, container {cname}");
            let sc = c.get("securityContext");
            let pick = |field: &str| sc.and_then(|x| x.get(field)).or_else(|| pod_sc.and_then(|x| x.get(field)));
            if pick("runAsNonRoot").and_then(Value::as_bool) != Some(true) {
                errors.push(format!("{what}: runAsNonRoot is not true"));
            }
            if int(pick("runAsUser")) == Some(0) {
                errors.push(format!("{what}: runAsUser 0"));
            }
            if sc.and_then(|x| x.get("allowPrivilegeEscalation")).and_then(Value::as_bool) != Some(false) {
                errors.push(format!("{what}: allowPrivilegeEscalation is not false"));
            }
            if sc.and_then(|x| x.get("privileged")).and_then(Value::as_bool) == Some(true) {
                errors.push(format!("{what}: privileged"));
            }
        }
    }
    if workloads == 0 {
        errors.push("no workloads".into());
    }
    errors
}

/// kustomization.yaml names files that exist, and every manifest but the Secret templates.
fn check_kustomization(docs: &[Doc]) -> Vec<String> {
    let root = repo().join("deploy/k8s");
    let Some(k) = docs.iter().find(|d| s(&d.value, "/kind") == Some("Kustomization")) else {
        return vec!["no kustomization.yaml".into()];
    };
    let mut errors = Vec::new();
    let listed: Vec<&str> = arr(&k.value, "/resources").iter().filter_map(Value::as_str).collect();
    for r in &listed {
        if !root.join(r).is_file() {
            errors.push(format!("kustomization: {r} does not exist"));
        }
    }
    for d in docs {
        let is_secret = s(&d.value, "/kind") == Some("Secret");
        let is_kustomization = s(&d.value, "/kind") == Some("Kustomization");
        let in_list = listed.contains(&d.file.as_str());
        if is_secret && in_list {
            errors.push(format!("kustomization: lists {}, which holds Secret placeholders", d.file));
        }
        if !is_secret && !is_kustomization && !in_list {
            errors.push(format!("kustomization: does not list {}", d.file));
        }
    }
    errors
}

fn all_checks(docs: &[Doc]) -> Vec<String> {
    [check_metadata, check_coordinator, check_worker, check_non_root, check_kustomization]
        .iter()
        .flat_map(|check| check(docs))
        .collect()
}

// --- the tests ----------------------------------------------------------------------------------

#[test]
fn k8s_manifests_parse_and_carry_what_the_cluster_needs() {
    let docs = load_docs();
    let errors = all_checks(&docs);
    assert!(errors.is_empty(), "deploy/k8s:\n  {}", errors.join("\n  "));
    // What was checked, for the log.
    for d in &docs {
        let (kind, name) = kind_name(d);
        eprintln!("{}: {kind} {name}", d.file);
    }
}

/// Each check fails on a manifest broken the way it guards against.
#[test]
fn checks_catch_broken_manifests() {
    let docs = load_docs();
    let break_doc = |kind: &str, name: &str, pointer: &str, edit: &dyn Fn(&mut Value)| -> Vec<String> {
        let mut docs = docs.clone();
        let d = docs.iter_mut().find(|d| kind_name(d) == (kind.to_string(), name.to_string())).unwrap();
        edit(d.value.pointer_mut(pointer).unwrap_or_else(|| panic!("{kind} {name}: no {pointer}")));
        all_checks(&docs)
    };
    let remove = |field: &'static str| move |v: &mut Value| drop(v.as_object_mut().unwrap().remove(field));
    let set = |field: &'static str, to: Value| {
        move |v: &mut Value| drop(v.as_object_mut().unwrap().insert(field.into(), to.clone()))
    };
    let container = "/spec/template/spec/containers/0";
    let pod = "/spec/template/spec";
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("no readinessProbe", break_doc("Deployment", COORDINATOR, container, &remove("readinessProbe"))),
        ("no livenessProbe", break_doc("Deployment", COORDINATOR, container, &remove("livenessProbe"))),
        (
            "liveness over HTTP",
            break_doc("Deployment", COORDINATOR, &format!("{container}/livenessProbe"), &|p| {
                *p = serde_json::json!({"httpGet": {"port": GRPC_PORT, "path": "/"}})
            }),
        ),
        (
            "the database URL written in",
            break_doc(
                "Deployment",
                COORDINATOR,
                container,
                &set(
                    "env",
                    serde_json::json!([
                        {"name": "PRUNESWEEP_DATABASE", "value": "postgres://u:p@db/prunesweep"}
                    ]),
                ),
            ),
        ),
        (
            "tokens not from a Secret",
            break_doc("Deployment", COORDINATOR, &format!("{pod}/volumes/0"), &|v| {
                *v = serde_json::json!({"name": "tokens", "emptyDir": {}})
            }),
        ),
        (
            "no GPU limit",
            break_doc("Deployment", WORKER, &format!("{container}/resources/limits"), &remove("nvidia.com/gpu")),
        ),
        (
            "the default grace period",
            break_doc("Deployment", WORKER, pod, &set("terminationGracePeriodSeconds", 30.into())),
        ),
        (
            "work dir not mounted",
            break_doc("Deployment", WORKER, container, &set("volumeMounts", serde_json::json!([]))),
        ),
        (
            "no --device cuda:0",
            break_doc(
                "Deployment",
                WORKER,
                container,
                &set("args", serde_json::json!(["serve", "--work-dir", "/work"])),
            ),
        ),
        (
            "root",
            break_doc(
                "Deployment",
                WORKER,
                &format!("{container}/securityContext"),
                &set("runAsNonRoot", false.into()),
            ),
        ),
        (
            "user 0",
            break_doc("Deployment", COORDINATOR, &format!("{container}/securityContext"), &set("runAsUser", 0.into())),
        ),
        (
            "privilege escalation",
            break_doc(
                "Deployment",
                COORDINATOR,
                &format!("{container}/securityContext"),
                &remove("allowPrivilegeEscalation"),
            ),
        ),
        ("a Secret template in the kustomization", {
            let mut docs = docs.clone();
            let k = docs.iter_mut().find(|d| s(&d.value, "/kind") == Some("Kustomization")).unwrap();
            k.value.pointer_mut("/resources").unwrap().as_array_mut().unwrap().push("secrets.example.yaml".into());
            all_checks(&docs)
        }),
        ("no name", break_doc("Service", COORDINATOR, "/metadata", &remove("name"))),
    ];
    for (case, errors) in cases {
        assert!(!errors.is_empty(), "{case}: the checks found nothing wrong");
        eprintln!("{case}: {}", errors.join("; "));
    }
}

#[test]
fn dockerfiles_build_what_the_build_scripts_build() {
    let docker = repo().join("deploy/docker");
    let read =
        |name: &str| std::fs::read_to_string(docker.join(name)).unwrap_or_else(|e| panic!("deploy/docker/{name}: {e}"));
    // Instructions only: comments could mention anything.
    let instructions = |text: &str| -> String {
        text.lines().filter(|l| !l.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n")
    };

    let coord = instructions(&read("coordinator.Dockerfile"));
    for needle in [
        "cargo build --release",
        "-p prunesweep-coordinator",
        "ca-certificates",
        "EXPOSE 50051",
        "ENTRYPOINT [\"/usr/local/bin/coordinator\"]",
    ] {
        assert!(coord.contains(needle), "coordinator.Dockerfile lacks `{needle}`");
    }
    assert!(coord.matches("FROM ").count() >= 2, "coordinator.Dockerfile is not multi-stage");
    assert!(coord.contains("debian:bookworm-slim"), "coordinator.Dockerfile: not a slim Debian runtime");

    let worker = instructions(&read("worker-cuda.Dockerfile"));
    for needle in [
        "scripts/build-cuda.sh",
        "target/cuda/release/worker",
        "scripts/cuda/worker-cuda",
        "CUDA_COMPUTE_CAP",
        "python3-pip",
        "ENTRYPOINT [\"/opt/prunesweep/worker-cuda\"]",
    ] {
        assert!(worker.contains(needle), "worker-cuda.Dockerfile lacks `{needle}`");
    }
    // The runtime is CUDA 13.0, the toolkit build-cuda.sh builds with.
    let script = std::fs::read_to_string(repo().join("scripts/build-cuda.sh")).unwrap();
    assert!(script.contains("nvidia-cuda-runtime==13.0."), "build-cuda.sh no longer builds with CUDA 13.0");
    assert!(worker.contains("nvidia/cuda:13.0."), "worker-cuda.Dockerfile: the runtime is not CUDA 13.0");
    for file in [&coord, &worker] {
        let last_user = file.lines().rfind(|l| l.starts_with("USER "));
        assert!(
            last_user.is_some_and(|u| !u.contains("root") && !u.contains(" 0")),
            "a Dockerfile runs as root: {last_user:?}"
        );
    }
    // The launcher the worker image starts with exists, and the script copies it where it says.
    assert!(repo().join("scripts/cuda/worker-cuda").is_file());
    // The images the manifests run are the ones deploy/docker/README.md builds.
    let readme = read("README.md");
    for tag in ["prunesweep-coordinator", "prunesweep-worker:cuda-sm90"] {
        assert!(readme.contains(tag), "deploy/docker/README.md does not build {tag}");
    }
}
