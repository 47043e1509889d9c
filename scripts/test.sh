#!/usr/bin/env bash
# Every check and test of the workspace. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
# The quick start must keep working: run it once and check that the curl answered.
DEMO_ONESHOT=1 GATEWAY_PORT=28988 METRICS_PORT=29091 scripts/demo.sh | tee /dev/stderr | grep -q "Hello from the demo sandbox"
echo "the quick start answered through the gateway"
