#!/usr/bin/env bash
# Egress sidecar DNS: latency (p50/p99, cached and uncached) and queries per second of the
# proxy against asking dnsmasq directly, side by side in one run, plus policy evaluation time
# at 10 and 10,000 rules. Runs in two network namespaces of its own (documentation addresses,
# no route out), removed at exit. Needs root.
#
# The sidecar runs in dns+nft mode with "*.bench.test" allowed, so every uncached answer also
# goes through the nftables writer. The sidecar runs in a cgroup of its own, as in a pod; the
# benchmark client runs in that cgroup too and its direct queries carry the proxy's socket mark,
# so they pass the port-53 redirect as the proxy's own do (mark and cgroup, see the README).
#
# A third scenario asks AAAA for names that each have their own address (a dnsmasq hosts file
# of FRESH names in 2001:db8:1::/48), so every answer must reach the nftables set first.
#
# Env: QUERIES (latency samples per scenario, 5000), SECONDS_QPS (5), CONCURRENCY (16),
# FRESH (400000); BASELINE_SIDECAR_BIN: another build of the sidecar (e.g. an earlier commit's)
# measured first in the same run, on the same namespaces and dnsmasq, for a before/after table.
set -euo pipefail
cd "$(dirname "$0")/.."

QUERIES=${QUERIES:-5000}
SECONDS_QPS=${SECONDS_QPS:-5}
CONCURRENCY=${CONCURRENCY:-16}
FRESH=${FRESH:-400000}
export FRESH

scripts/setup.sh
cargo build --release -p sidecar --bin egress-sidecar --example dns-bench --example policy-bench >/dev/null

id=$$
sb=egbsb$id
up=egbup$id
work=$(mktemp -d)
cg=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)/egress-bench-$id
mkdir -p "$cg"
# in_sidecar CMD...: runs CMD in the sandbox namespace and the sidecar's cgroup (nsenter keeps
# the host's /sys, where the cgroup hierarchy is).
# Call it in a subshell: it execs, so a background one's $! is the program itself.
in_sidecar() { exec nsenter --net="/run/netns/$sb" sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg" "$@"; }
cleanup() {
  for ns in "$sb" "$up"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
  rmdir "$cg" 2>/dev/null || true
}
trap cleanup EXIT

ip netns add "$sb"
ip netns add "$up"
ip link add "vb$id" netns "$sb" type veth peer name "vu$id" netns "$up"
ip -n "$sb" addr add 198.51.100.1/24 dev "vb$id"
ip -n "$up" addr add 198.51.100.2/24 dev "vu$id"
for ns in "$sb" "$up"; do ip -n "$ns" link set lo up; done
ip -n "$sb" link set "vb$id" up
ip -n "$up" link set "vu$id" up

awk -v n="$FRESH" 'BEGIN { for (i = 0; i < n; i++) printf "2001:db8:1::%x:%x f%d.fresh.test\n", int(i / 65536), i % 65536, i }' >"$work/fresh.hosts"
ip netns exec "$up" dnsmasq --no-daemon --no-resolv --no-hosts --bind-interfaces \
  --listen-address=198.51.100.2 --local-ttl=300 --cache-size=10000 \
  --address=/bench.test/198.51.100.30 --addn-hosts="$work/fresh.hosts" --pid-file= >"$work/dnsmasq.log" 2>&1 &
mkdir -p "$work/rules"
sidecar_pid=
# start_sidecar BIN: starts BIN as the sidecar and waits for its API.
start_sidecar() {
  (in_sidecar env \
    OPENSANDBOX_EGRESS_MODE=dns+nft \
    OPENSANDBOX_EGRESS_DNS_UPSTREAM=198.51.100.2 \
    OPENSANDBOX_EGRESS_RULES='{"defaultAction":"deny","egress":[{"action":"allow","target":"*.bench.test"},{"action":"allow","target":"*.fresh.test"}]}' \
    OPENSANDBOX_EGRESS_RULES_DIR="$work/rules" \
    OPENSANDBOX_EGRESS_HTTP_ADDR=127.0.0.1:18080 \
    OPENSANDBOX_EGRESS_LOG_LEVEL=warn \
    "$1") >>"$work/sidecar.log" 2>&1 &
  sidecar_pid=$!   # nsenter and sh exec the sidecar: same process
  for _ in $(seq 100); do
    if ip netns exec "$sb" curl -s -m 1 http://127.0.0.1:18080/healthz 2>/dev/null | grep -q ok; then return; fi
    sleep 0.1
  done
  echo "sidecar $1 did not become healthy:" >&2
  cat "$work/sidecar.log" >&2
  exit 1
}
# stop_sidecar: kills it and removes its rules, so the next one starts clean.
stop_sidecar() {
  kill -9 "$sidecar_pid" 2>/dev/null || true
  wait "$sidecar_pid" 2>/dev/null || true
  ip netns exec "$sb" nft flush ruleset
}
measure() {
  (in_sidecar target/release/examples/dns-bench 127.0.0.1:15353 198.51.100.2:53 \
    "$QUERIES" "$SECONDS_QPS" "$CONCURRENCY")
}
baseline=
if [ -n "${BASELINE_SIDECAR_BIN:-}" ]; then
  start_sidecar "$BASELINE_SIDECAR_BIN"
  baseline=$(measure)
  stop_sidecar
fi
start_sidecar "$PWD/target/release/egress-sidecar"

commit=$(git rev-parse --short HEAD)
out="loadtest/results/$(date +%F)-$commit-dns.md"
{
  echo "date $(date +%F), commit $commit, release build, $(nproc) cores; proxy, dnsmasq and client share them"
  echo "latency: $QUERIES sequential queries per cell; q/s: $CONCURRENCY clients for ${SECONDS_QPS}s"
  echo
  if [ -n "$baseline" ]; then
    echo "baseline sidecar (BASELINE_SIDECAR_BIN, measured first):"
    echo
    echo "$baseline"
    echo
    echo "this commit's sidecar:"
    echo
  fi
  measure
  echo
  target/release/examples/policy-bench
  echo
  learned=$(ip netns exec "$sb" curl -s http://127.0.0.1:18080/metrics | grep -E '^egress_nft_updates_total' || true)
  echo "nftables transactions during the run (learned addresses are batched per transaction):"
  echo "$learned" | sed 's/^/    /'
  rss_kib=$(ps -o rss= -p "$sidecar_pid" | tr -d ' ')
  addrs=$(ip netns exec "$sb" curl -s http://127.0.0.1:18080/metrics | awk '/^egress_nft_learned_addresses/ {print $2}')
  echo "sidecar RSS after the run: $((rss_kib / 1024)) MiB, with $addrs learned addresses tracked"
} | tee "$out"
echo "written to $out"
