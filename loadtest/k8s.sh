#!/usr/bin/env bash
# Kubernetes provider benchmarks against a real kube-apiserver: route propagation latency
# (p50/p99 over UPDATES endpoint changes) and RSS / time to ready with SANDBOXES objects.
# Prints tables and verdict lines and writes them to loadtest/results/.
# Env: UPDATES (500), SANDBOXES (100000).
set -euo pipefail
cd "$(dirname "$0")/.."

UPDATES=${UPDATES:-500}
SANDBOXES=${SANDBOXES:-100000}
scripts/setup.sh
K8S_TESTENV_DIR=$(scripts/k8s-testenv/build.sh | tail -n 1)
export K8S_TESTENV_DIR
cargo build --release -p gateway --bin sandbox-gateway --example k8s-bench >/dev/null
export SANDBOX_GATEWAY_BIN=$PWD/target/release/sandbox-gateway

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
report=$(
  echo "date $(date -u +%F), commit $commit, kube-apiserver $(basename "$K8S_TESTENV_DIR"), release build"
  echo
  target/release/examples/k8s-bench propagation "$UPDATES"
  echo
  target/release/examples/k8s-bench scale "$SANDBOXES"
)
echo "$report"
mkdir -p loadtest/results
echo "$report" > "loadtest/results/$(date -u +%F)-$commit-k8s.md"
