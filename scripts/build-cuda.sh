#!/usr/bin/env bash
# Builds the worker with `--features cuda` on a machine without a GPU or a CUDA install, from
# PyPI alone: NVIDIA's CUDA 13.0 wheels unpacked into one folder used as CUDA_ROOT, plus a
# link-time stub of the driver library. Idempotent: the toolkit is cached and unpacked once,
# cargo rebuilds only what changed.
#
#   scripts/build-cuda.sh
#
# Environment:
#   CUDA_COMPUTE_CAP        GPU architecture the kernels are built for (default 90 = H100/H200;
#                           80 = A100, 89 = L4/L40/RTX 40xx)
#   PRUNESWEEP_CUDA_CACHE   toolkit cache (default ~/.cache/prunesweep/cuda-13.0)
#   CARGO_TARGET_DIR        default target/cuda, so the CPU build in target/ is left alone
#   CUDAFORGE_THREADS       parallel nvcc processes for candle's kernels (default 1)
#   NICE                    niceness of the build (default 10; 0 to run at normal priority)
#
# Why CUDA 13.0: the H200 boxes run the R580 driver (CUDA 13.0); a binary built against a newer
# toolkit would need a newer driver. cudarc 0.19.10 (candle 0.11.1) accepts toolkits up to 13.4.
#
# Output: target/cuda/release/worker (+ the launcher worker-cuda next to it) and
# target/cuda/worker-cuda.gz (stripped, gzipped: the file to copy to a GPU box). The build log,
# with timestamps, is target/cuda/build.log.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

cache="${PRUNESWEEP_CUDA_CACHE:-$HOME/.cache/prunesweep/cuda-13.0}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$repo/target/cuda}"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-1}"
nice_level="${NICE:-10}"

# The toolkit: exact versions, all of the 13.0 line. nvrtc is there for the link only: candle's
# cudarc passes -lnvrtc, but nothing calls it, so the binary does not load it at run time.
wheels=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
)
root="$cache/root"
stamp="$root/.prunesweep-wheels"

log() { printf '[build-cuda %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- 1. the toolkit ----------------------------------------------------------------------------
if [[ -f "$stamp" && "$(cat "$stamp")" == "${wheels[*]}" ]]; then
    log "toolkit: $root (cached)"
else
    command -v python3 >/dev/null || die "python3 (with pip) is needed to download NVIDIA's wheels"
    mkdir -p "$cache/wheels"
    log "toolkit: downloading ${#wheels[@]} wheels from PyPI into $cache/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$cache/wheels" "${wheels[@]}" \
        || die "pip download failed (is PyPI reachable?)"
    rm -rf "$root.tmp"
    mkdir -p "$root.tmp"
    # Unpack every wheel's nvidia/cu13/ into one folder, keeping the files' modes (the wheels
    # record them; zipfile does not restore them).
    python3 - "$cache/wheels" "$root.tmp" "${wheels[@]}" <<'PY'
import os, sys, zipfile
wheel_dir, dest, specs = sys.argv[1], sys.argv[2], sys.argv[3:]
prefix = "nvidia/cu13/"
for spec in specs:
    name, version = spec.split("==")
    stem = name.replace("-", "_") + "-" + version + "-"
    matches = [f for f in os.listdir(wheel_dir) if f.startswith(stem) and f.endswith(".whl")]
    if not matches:
        sys.exit(f"no wheel for {spec} in {wheel_dir}")
    with zipfile.ZipFile(os.path.join(wheel_dir, sorted(matches)[-1])) as z:
        for info in z.infolist():
            if not info.filename.startswith(prefix) or info.is_dir():
                continue
            rel = info.filename[len(prefix):]
            path = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with z.open(info) as src, open(path, "wb") as out:
                out.write(src.read())
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                os.chmod(path, mode)
PY
    # Executables whatever the wheels said.
    chmod +x "$root.tmp"/bin/* "$root.tmp"/nvvm/bin/* 2>/dev/null || true
    chmod -x "$root.tmp"/bin/*.profile 2>/dev/null || true
    # Unversioned names for the linker (libcublas.so -> libcublas.so.13), and lib64 -> lib.
    for so in "$root.tmp"/lib/lib*.so.*; do
        base="${so##*/}"
        plain="${base%%.so.*}.so"
        [[ -e "$root.tmp/lib/$plain" ]] || ln -s "$base" "$root.tmp/lib/$plain"
    done
    ln -sfn lib "$root.tmp/lib64"
    rm -rf "$root"
    mv "$root.tmp" "$root"
    echo "${wheels[*]}" >"$stamp"
    log "toolkit: unpacked into $root"
fi
nvcc_version="$("$root/bin/nvcc" --version)" || die "$root/bin/nvcc does not run (delete $root and rerun)"
[[ "$nvcc_version" == *"release 13.0"* ]] || die "$root/bin/nvcc is not CUDA 13.0 (delete $root and rerun)"

# --- 2. the driver stub (link time only) -------------------------------------------------------
# candle links the driver library (libcuda.so.1). On a machine without one, link against a stub
# generated from cudarc's bindings (scripts/cuda/gen-libcuda-stub.sh). It lives in
# CUDA_ROOT/lib/stubs, where cudarc's build script points the linker, and nowhere the loader
# looks: the binary loads the real driver's libcuda.so.1 on the GPU box.
stub_src="$repo/scripts/cuda/libcuda-stub.c"
stub="$root/lib/stubs/libcuda.so"
if [[ ! -f "$stub" || "$stub_src" -nt "$stub" ]]; then
    mkdir -p "$root/lib/stubs"
    cc -shared -fPIC -O2 -Wl,-soname,libcuda.so.1 -o "$stub" "$stub_src"
    log "driver stub: $stub ($(nm -D --defined-only "$stub" | grep -c ' T cu') entry points)"
fi

# --- 3. the build ------------------------------------------------------------------------------
export CUDA_ROOT="$root" CUDA_HOME="$root" CUDA_PATH="$root"
export NVCC="$root/bin/nvcc"
export PATH="$root/bin:$PATH"
mkdir -p "$CARGO_TARGET_DIR"
build_log="$CARGO_TARGET_DIR/build.log"
log "cargo build --release -p prunesweep-worker --features cuda  (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR, log $build_log)"
start=$(date +%s)
set +e
nice -n "$nice_level" cargo build --release -p prunesweep-worker --features cuda 2>&1 |
    while IFS= read -r line; do printf '%s %s\n' "$(date -u +%H:%M:%S)" "$line"; done | tee -a "$build_log"
status=${PIPESTATUS[0]}
set -e
elapsed=$(( $(date +%s) - start ))
[[ $status -eq 0 ]] || die "cargo build failed after ${elapsed}s (exit $status); see $build_log"
log "built in $((elapsed / 60)) min $((elapsed % 60)) s"

# --- 4. the artefacts --------------------------------------------------------------------------
bin="$CARGO_TARGET_DIR/release/worker"
install -m 0755 "$repo/scripts/cuda/worker-cuda" "$CARGO_TARGET_DIR/release/worker-cuda"
strip -o "$CARGO_TARGET_DIR/worker-cuda.stripped" "$bin"
gzip -9 -c "$CARGO_TARGET_DIR/worker-cuda.stripped" >"$CARGO_TARGET_DIR/worker-cuda.gz"
mib() { awk -v b="$(stat -c %s "$1")" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
needed="$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | grep -E 'cuda|cublas|curand|nvrtc' | tr '\n' ' ')"
[[ "$needed" == *libcublas.so* ]] && needed+="libcublasLt.so.13 (for libcublas)"

cat <<MSG

CUDA worker (CUDA 13.0, compute capability $CUDA_COMPUTE_CAP):
  binary      $bin  ($(mib "$bin"))
  launcher    $CARGO_TARGET_DIR/release/worker-cuda  (checks the libraries, then runs ./worker)
  to copy     $CARGO_TARGET_DIR/worker-cuda.gz  ($(mib "$CARGO_TARGET_DIR/worker-cuda.gz"), stripped $(mib "$CARGO_TARGET_DIR/worker-cuda.stripped"))
  needs       $needed
              (libcuda.so.1 from the NVIDIA driver, R580 / CUDA 13.0 or newer; the others from
              CUDA 13 — a PyTorch cu130 install has them in its nvidia/cu13/lib:
              python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')

On the GPU box:
  gunzip -c worker-cuda.gz > worker && chmod +x worker     # next to scripts/cuda/worker-cuda
  ./worker-cuda doctor --device cuda:0                       # finds the libraries, or says which are missing
  LD_LIBRARY_PATH=<dir with the CUDA 13 libraries> ./worker doctor --device cuda:0   # without the launcher
MSG
