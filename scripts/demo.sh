#!/usr/bin/env bash
# Quick start: the gateway on the bundled example sandboxes, in front of a demo upstream.
# Prints curl commands that answer through the gateway; Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
cargo build --release -p gateway --bin sandbox-gateway --example demo-upstream

GATEWAY_PORT=${GATEWAY_PORT:-28888}
METRICS_PORT=${METRICS_PORT:-9091}
UPSTREAM_PORT=18080

target/release/examples/demo-upstream "127.0.0.1:${UPSTREAM_PORT}" &
upstream=$!
target/release/sandbox-gateway --provider-type file --sandbox-file gateway/examples/sandboxes.yaml \
  --bind 127.0.0.1 --port "$GATEWAY_PORT" --metrics-port "$METRICS_PORT" \
  --secure-access-keys "${DEMO_KEYS:-k=cHFycw==}" &
gateway=$!
trap 'kill $gateway $upstream 2>/dev/null; wait 2>/dev/null' EXIT INT TERM

for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:${METRICS_PORT}/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done

cmd="curl -s -H 'OpenSandbox-Ingress-To: demo-${UPSTREAM_PORT}' http://127.0.0.1:${GATEWAY_PORT}/hello?from=quickstart"
echo
echo "\$ $cmd"
eval "$cmd"
cat <<MSG

More to try while it runs (Ctrl-C to stop):
  curl -s -H 'Host: demo-${UPSTREAM_PORT}.sandbox.local' http://127.0.0.1:${GATEWAY_PORT}/
  curl -si -H 'OpenSandbox-Ingress-To: demo-secure-${UPSTREAM_PORT}' http://127.0.0.1:${GATEWAY_PORT}/          # 401
  curl -s -H 'OpenSandbox-Ingress-To: demo-secure-${UPSTREAM_PORT}' -H 'OpenSandbox-Secure-Access: demo-token' http://127.0.0.1:${GATEWAY_PORT}/
  curl -si -H 'OpenSandbox-Ingress-To: pending-${UPSTREAM_PORT}' http://127.0.0.1:${GATEWAY_PORT}/              # 503
  curl -s http://127.0.0.1:${METRICS_PORT}/metrics | grep sandbox_gateway_
Edit gateway/examples/sandboxes.yaml and the routes follow within a second.
MSG
if [ -z "${DEMO_ONESHOT:-}" ]; then
  wait $gateway
fi
