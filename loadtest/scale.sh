#!/usr/bin/env bash
# Route-table memory and time to ready with many sandboxes in the sandbox file.
# Prints RSS with 1 sandbox and with COUNT sandboxes, the difference per sandbox, and the time
# from start to /readyz 200. Env: COUNT (100000).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-100000}
scripts/setup.sh
cargo build --release -p gateway --bin sandbox-gateway >/dev/null
GATEWAY=target/release/sandbox-gateway
work=$(mktemp -d)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$work"' EXIT

generate() { # count, file
  awk -v n="$1" 'BEGIN {
    print "apiVersion: v1\nkind: List\nitems:"
    for (i = 0; i < n; i++) {
      printf "- apiVersion: sandbox.opensandbox.io/v1alpha1\n  kind: BatchSandbox\n"
      printf "  metadata:\n    name: sbx-%07d\n    namespace: ns-%03d\n", i, i % 500
      printf "    annotations:\n      sandbox.opensandbox.io/endpoints: %c[\"10.%d.%d.%d\"]%c\n", 39, int(i / 65536) % 256, int(i / 256) % 256, i % 256, 39
      if (i % 10 == 0) printf "      opensandbox.io/secure-access-token: tok-%07d\n", i
      printf "  status:\n    replicas: 1\n    ready: 1\n"
    }
  }' > "$2"
}

measure() { # count -> "rss_kib ready_ms"
  local file="$work/s-$1.yaml" port=$((40000 + RANDOM % 10000)) mport=$((50000 + RANDOM % 10000))
  generate "$1" "$file"
  local start end
  start=$(date +%s%N)
  "$GATEWAY" --provider-type file --sandbox-file "$file" --bind 127.0.0.1 --port "$port" \
    --metrics-port "$mport" --threads 1 >/dev/null 2>&1 &
  pid=$!
  until curl -fs "http://127.0.0.1:$mport/readyz" >/dev/null 2>&1; do sleep 0.02; done
  end=$(date +%s%N)
  sleep 1
  local size
  size=$(curl -fs "http://127.0.0.1:$mport/metrics" | awk '$1 == "sandbox_gateway_route_table_sandboxes" { print $2 }')
  [ "$size" = "$1" ] || { echo "table holds $size, expected $1" >&2; exit 1; }
  local rss
  rss=$(awk '/VmRSS/ { print $2 }' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=""
  echo "$rss $(( (end - start) / 1000000 ))"
}

read -r base_rss base_ms < <(measure 1)
read -r big_rss big_ms < <(measure "$COUNT")
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
report=$(
  echo "date $(date -u +%F), commit $commit, file provider, release build"
  echo
  echo "| sandboxes | RSS MiB | time to ready ms |"
  echo "|---|---|---|"
  awk -v r="$base_rss" -v t="$base_ms" 'BEGIN { printf "| 1 | %.1f | %d |\n", r / 1024, t }'
  awk -v n="$COUNT" -v r="$big_rss" -v t="$big_ms" 'BEGIN { printf "| %d | %.1f | %d |\n", n, r / 1024, t }'
  echo
  awk -v n="$COUNT" -v a="$base_rss" -v b="$big_rss" 'BEGIN { printf "verdict: %.0f bytes of RSS per sandbox\n", (b - a) * 1024 / n }'
)
echo "$report"
mkdir -p loadtest/results
echo "$report" > "loadtest/results/$(date -u +%F)-$commit-scale.md"
