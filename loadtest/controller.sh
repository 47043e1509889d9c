#!/usr/bin/env bash
# The BatchSandbox controller against the reference controller, each on a fresh kube-apiserver:
# create → pod and pod Ready → endpoints latency (p50/p99) over SANDBOXES objects created back
# to back, the controller's CPU seconds and its API requests per sandbox; ROUNDS rounds with
# the order alternating, medians reported. Prints tables and a verdict line and writes them to
# loadtest/results/.
# Env: SANDBOXES (200), ROUNDS (3); REFERENCE_CONTROLLER_BIN (the reference controller's binary)
# and REFERENCE_CONTROLLER_CRDS (the directory of its CRD YAML files); without both, ours runs
# alone.
set -euo pipefail
cd "$(dirname "$0")/.."

SANDBOXES=${SANDBOXES:-200}
ROUNDS=${ROUNDS:-3}
scripts/setup.sh
K8S_TESTENV_DIR=$(scripts/k8s-testenv/build.sh | tail -n 1)
export K8S_TESTENV_DIR
cargo build --release -p controller --bin sandbox-controller --example controller-bench >/dev/null
export SANDBOX_CONTROLLER_BIN=$PWD/target/release/sandbox-controller

reference="not available (REFERENCE_CONTROLLER_BIN and REFERENCE_CONTROLLER_CRDS unset): ours alone"
if [ -n "${REFERENCE_CONTROLLER_BIN:-}" ] || [ -n "${REFERENCE_CONTROLLER_CRDS:-}" ]; then
  if [ -x "${REFERENCE_CONTROLLER_BIN:-}" ] && [ -d "${REFERENCE_CONTROLLER_CRDS:-}" ]; then
    reference="reference controller (Go build of the reference project's kubernetes/ module)"
  else
    reference="not available (REFERENCE_CONTROLLER_BIN is not an executable or"
    reference="$reference REFERENCE_CONTROLLER_CRDS is not a directory): ours alone"
    unset REFERENCE_CONTROLLER_BIN REFERENCE_CONTROLLER_CRDS
  fi
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
# What the measured binary is built from, when it differs from the commit.
changed=$(git status --porcelain -- controller/src controller/api controller/Cargo.toml Cargo.lock \
  2>/dev/null || true)
tree=""
[ -z "$changed" ] || tree=" (plus uncommitted changes in controller/)"
report=$(
  echo "date $(date -u +%F), commit $commit$tree, kube-apiserver $(basename "$K8S_TESTENV_DIR"),"\
    "release build, $(nproc) cores, no CPU pinning"
  echo "reference: $reference"
  echo
  target/release/examples/controller-bench "$SANDBOXES" "$ROUNDS"
)
echo "$report"
mkdir -p loadtest/results
echo "$report" > "loadtest/results/$(date -u +%F)-$commit-controller.md"
