#!/usr/bin/env bash
# Kubernetes provider benchmarks against a real kube-apiserver. `loadtest/k8s.sh` (make
# k8s-bench): route propagation latency (p50/p99 over UPDATES endpoint changes) and RSS / time to
# ready with SANDBOXES objects. `loadtest/k8s.sh fanout` (make fanout): GATEWAYS gateways start
# at once against FANOUT_SANDBOXES objects, with paged and with streaming initial lists; the API
# server's CPU per gateway sync, then per object update with none and with GATEWAYS gateways
# watching. Prints tables and verdict lines and writes them to loadtest/results/.
# Env: UPDATES (500), SANDBOXES (100000), FANOUT_SANDBOXES (20000), GATEWAYS (9).
set -euo pipefail
cd "$(dirname "$0")/.."

UPDATES=${UPDATES:-500}
SANDBOXES=${SANDBOXES:-100000}
FANOUT_SANDBOXES=${FANOUT_SANDBOXES:-20000}
GATEWAYS=${GATEWAYS:-9}
scripts/setup.sh
K8S_TESTENV_DIR=$(scripts/k8s-testenv/build.sh | tail -n 1)
export K8S_TESTENV_DIR
cargo build --release -p gateway --bin sandbox-gateway --example k8s-bench >/dev/null
export SANDBOX_GATEWAY_BIN=$PWD/target/release/sandbox-gateway

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ "${1:-}" = fanout ]; then
  name=fanout
  run() { target/release/examples/k8s-bench fanout "$FANOUT_SANDBOXES" "$GATEWAYS"; }
else
  name=k8s
  run() {
    target/release/examples/k8s-bench propagation "$UPDATES"
    echo
    target/release/examples/k8s-bench scale "$SANDBOXES"
  }
fi
report=$(
  echo "date $(date -u +%F), commit $commit, kube-apiserver $(basename "$K8S_TESTENV_DIR"), release build"
  echo
  run
)
echo "$report"
mkdir -p loadtest/results
echo "$report" > "loadtest/results/$(date -u +%F)-$commit-$name.md"
