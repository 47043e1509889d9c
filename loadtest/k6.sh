#!/usr/bin/env bash
# The k6 load tests: every scenario of loadtest/k6/gateway.js against the release gateway on a
# sandbox file, with the tests' upstream (HTTP, SSE, WebSocket). Prints a table and a verdict.
#
# `loadtest/k6.sh [short|full] [scenario...]` (short: 1,000 sandboxes, 200 iterations/s, 5 s per
# scenario; full: 10,000 sandboxes, 1,000/s, 30 s). Env: K6_RATE, K6_DURATION override the form.
set -euo pipefail
cd "$(dirname "$0")/.."

form=${1:-short}
shift || true
venv=$(scripts/python-env.sh | tail -n 1)
cargo build --release -p gateway --bin sandbox-gateway --example k6-load >/dev/null
K6_BIN="$venv/bin/k6" SANDBOX_GATEWAY_BIN=target/release/sandbox-gateway \
  target/release/examples/k6-load "$form" "$@"
