#!/usr/bin/env bash
# Every check and test of the workspace. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh fonts-dejavu-core
# The real kube-apiserver and etcd for the Kubernetes tests (built once, then cached).
K8S_TESTENV_DIR=$(scripts/k8s-testenv/build.sh | tail -n 1)
export K8S_TESTENV_DIR
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The Helm chart, with real Helm (helm-python-sdk) from a project-local virtualenv.
venv=$(scripts/python-env.sh | tail -n 1)
"$venv/bin/python" -m pytest -q -p no:cacheprovider charts/tests
# The quick start must keep working: run it once and check that the curl answered.
demo_out=$(mktemp)
trap 'rm -f "$demo_out"' EXIT
DEMO_ONESHOT=1 GATEWAY_PORT=28988 METRICS_PORT=29091 scripts/demo.sh >"$demo_out" 2>&1 || { cat "$demo_out"; exit 1; }
if ! grep -q "Hello from the demo sandbox" "$demo_out"; then
  cat "$demo_out"
  echo "the quick start did not answer through the gateway" >&2
  exit 1
fi
echo "the quick start answered through the gateway"
# The three images, built without a Docker daemon, each run once with runc.
scripts/images.sh
scripts/image-smoke.sh
# Load tests in their short form, each printing its verdict (the long forms: make k6, make bench).
loadtest/k6.sh short
K6_DURATION=20s loadtest/k6.sh soak
ROUNDS=1 DURATION=3s SAVE=0 loadtest/run.sh
