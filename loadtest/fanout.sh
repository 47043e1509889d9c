#!/usr/bin/env bash
# Many gateways on one API server (a DaemonSet is one watch per node): GATEWAYS gateways start
# at once against SANDBOXES BatchSandboxes, with paged and with streaming initial lists; prints
# the API server's CPU per gateway sync and the times to ready, and writes them to
# loadtest/results/. Env: SANDBOXES (20000), GATEWAYS (9).
set -euo pipefail
cd "$(dirname "$0")/.."

SANDBOXES=${SANDBOXES:-20000}
GATEWAYS=${GATEWAYS:-9}
scripts/setup.sh
K8S_TESTENV_DIR=$(scripts/k8s-testenv/build.sh | tail -n 1)
export K8S_TESTENV_DIR
cargo build --release -p gateway --bin sandbox-gateway --example k8s-bench >/dev/null
export SANDBOX_GATEWAY_BIN=$PWD/target/release/sandbox-gateway

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
report=$(
  echo "date $(date -u +%F), commit $commit, kube-apiserver $(basename "$K8S_TESTENV_DIR"), release build"
  echo
  target/release/examples/k8s-bench fanout "$SANDBOXES" "$GATEWAYS"
)
echo "$report"
mkdir -p loadtest/results
echo "$report" > "loadtest/results/$(date -u +%F)-$commit-fanout.md"
