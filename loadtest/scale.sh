#!/usr/bin/env bash
# The gateway with many sandboxes in its file: route-table memory per sandbox and time to ready
# (YAML and JSON files), then throughput with COUNT sandboxes against 1,000, each request naming
# a random sandbox, side by side in one run (pinned as in run.sh: gateway alone on CPU 0, wrk and
# the upstream on CPU 1; ROUNDS interleaved rounds, medians).
#
# Env: COUNT (1000000), ROUNDS (5), DURATION (5s), CONNECTIONS (50), SAVE (1).
set -euo pipefail
cd "$(dirname "$0")/.."

COUNT=${COUNT:-1000000}
SMALL=1000
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-5s}
CONNECTIONS=${CONNECTIONS:-50}
PROXY_CPU=0
LOAD_CPU=1

scripts/setup.sh wrk nginx
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release -p gateway --bin sandbox-gateway >/dev/null
GATEWAY=target/release/sandbox-gateway
. loadtest/lib.sh

UP=$(free_port)
nginx_conf upstream "server { listen 127.0.0.1:$UP; location / { default_type text/plain; return 200 'ok'; } }"
taskset -c $LOAD_CPU "$NGINX" -c "$work/upstream/nginx.conf" & pids+=($!)

# Sandboxes sbx-0000000.. in 500 namespaces, every tenth with a token, all served by the upstream.
generate() { # count, format (yaml|json), file
  awk -v n="$1" -v format="$2" 'BEGIN {
    if (format == "json") print "{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": ["
    else print "apiVersion: v1\nkind: List\nitems:"
    for (i = 0; i < n; i++) {
      token = (i % 10 == 0) ? sprintf("tok-%07d", i) : ""
      if (format == "json") {
        printf "{\"apiVersion\": \"sandbox.opensandbox.io/v1alpha1\", \"kind\": \"BatchSandbox\", \"metadata\": {\"name\": \"sbx-%07d\", \"namespace\": \"ns-%03d\", \"annotations\": {\"sandbox.opensandbox.io/endpoints\": \"[\\\"127.0.0.1\\\"]\"", i, i % 500
        if (token != "") printf ", \"opensandbox.io/secure-access-token\": \"%s\"", token
        printf "}}, \"status\": {\"replicas\": 1, \"ready\": 1}}%s\n", (i < n - 1 ? "," : "")
      } else {
        printf "- apiVersion: sandbox.opensandbox.io/v1alpha1\n  kind: BatchSandbox\n"
        printf "  metadata:\n    name: sbx-%07d\n    namespace: ns-%03d\n", i, i % 500
        printf "    annotations:\n      sandbox.opensandbox.io/endpoints: %c[\"127.0.0.1\"]%c\n", 39, 39
        if (token != "") printf "      opensandbox.io/secure-access-token: %s\n", token
        printf "  status:\n    replicas: 1\n    ready: 1\n"
      }
    }
    if (format == "json") print "]}"
  }' > "$3"
}

started_pid=""; started_port=""; started_ms=""
start() { # file; sets started_pid, started_port and started_ms (time to ready)
  local port mport start end
  port=$(free_port); mport=$(free_port)
  start=$(date +%s%N)
  taskset -c $PROXY_CPU "$GATEWAY" --provider-type file --sandbox-file "$1" --bind 127.0.0.1 \
    --port "$port" --metrics-port "$mport" --threads 1 --access-log=false >/dev/null 2>&1 &
  started_pid=$!; pids+=($started_pid)
  until curl -fs "http://127.0.0.1:$mport/readyz" >/dev/null 2>&1; do
    kill -0 "$started_pid" 2>/dev/null || { echo "gateway exited loading $1" >&2; exit 1; }
    sleep 0.02
  done
  end=$(date +%s%N)
  local size
  size=$(curl -fs "http://127.0.0.1:$mport/metrics" | awk '$1 == "sandbox_gateway_route_table_sandboxes" { print $2 }')
  [ "$size" = "$(grep -c 'sbx-' "$1")" ] || { echo "table holds $size sandboxes, the file more" >&2; exit 1; }
  started_port=$port; started_ms=$(( (end - start) / 1000000 ))
}
stop() { kill "$1"; wait "$1" 2>/dev/null || true; }

# Memory and time to ready: one sandbox, then COUNT as YAML and as JSON.
generate 1 yaml "$work/one.yaml"
start "$work/one.yaml"; sleep 1; base_rss=$(rss_kib "$started_pid"); stop "$started_pid"
declare -A ready rss
for format in yaml json; do
  generate "$COUNT" "$format" "$work/big.$format"
  start "$work/big.$format"
  pid=$started_pid; ready[$format]=$started_ms
  sleep 1
  rss[$format]=$(rss_kib "$pid")
  [ "$format" = json ] && big_pid=$pid || { stop "$pid"; rm -f "$work/big.$format"; }
done
big_port=$started_port

# Throughput: COUNT sandboxes (the JSON gateway, still running) against SMALL.
generate "$SMALL" json "$work/small.json"
start "$work/small.json"
small_port=$started_port; small_pid=$started_pid
cat > "$work/random.lua" <<LUA
local n = tonumber(os.getenv("SANDBOXES"))
math.randomseed(os.time())
request = function()
  -- Every tenth sandbox asks for a token: the next one is taken instead.
  local i = math.random(0, n - 1)
  if i % 10 == 0 then i = i + 1 end
  return wrk.format(nil, nil, { ["OpenSandbox-Ingress-To"] = string.format("sbx-%07d-$UP", i) })
end
LUA
declare -A rps per_cpu p99 errs
for round in $(seq 1 "$ROUNDS"); do
  for t in small big; do
    if [ $t = small ]; then port=$small_port; pid=$small_pid; n=$SMALL; else port=$big_port; pid=$big_pid; n=$COUNT; fi
    read -r r _ _ l e c <<<"$(SANDBOXES=$n wrk_round "http://127.0.0.1:$port/" "$pid" -s "$work/random.lua")"
    rps[$t]+="$r "; per_cpu[$t]+="$c "; p99[$t]+="$l "; errs[$t]+="$e "
    echo "round $round, $n sandboxes: $r req/s, $c req/CPU-s, p99 $l ms, $e non-2xx/errors" >&2
  done
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
per_sandbox() { awk -v a="$base_rss" -v b="$1" -v n="$COUNT" 'BEGIN { printf "%.0f", (b - a) * 1024 / n }'; }
report=$(
  echo "date $(date -u +%F), commit $commit, file provider, release build, gateway --threads 1"
  echo
  echo "| sandboxes in the file | RSS MiB | bytes of RSS per sandbox | time to ready ms |"
  echo "|---|---|---|---|"
  awk -v r="$base_rss" 'BEGIN { printf "| 1 | %.1f | - | - |\n", r / 1024 }'
  for format in yaml json; do
    awk -v n="$COUNT" -v f="$format" -v r="${rss[$format]}" -v t="${ready[$format]}" -v b="$(per_sandbox "${rss[$format]}")" \
      'BEGIN { printf "| %d (%s) | %.1f | %d | %d |\n", n, toupper(f), r / 1024, b, t }'
  done
  echo
  echo "| sandboxes, each request to a random one | req/s | req per CPU-s | p99 ms | non-2xx or errors |"
  echo "|---|---|---|---|---|"
  for t in small big; do
    n=$([ $t = small ] && echo "$SMALL" || echo "$COUNT")
    printf '| %d | %.0f | %s | %.2f | %s |\n' "$n" "$(median "${rps[$t]}")" "$(median "${per_cpu[$t]}")" \
      "$(median "${p99[$t]}")" "$(tr ' ' '\n' <<<"${errs[$t]}" | awk '{ n += $1 } END { print n + 0 }')"
  done
  echo
  json_b=$(per_sandbox "${rss[json]}")
  ratio=$(awk -v a="$(median "${per_cpu[big]}")" -v b="$(median "${per_cpu[small]}")" 'BEGIN { printf "%.3f", a / b }')
  awk -v b="$json_b" -v t="${ready[json]}" -v r="$ratio" -v n="$COUNT" 'BEGIN {
    ok = (b <= 300 && t <= 5000 && r >= 0.95)
    printf "verdict: %d sandboxes: %d bytes of RSS each (goal 300), ready in %d ms from JSON (goal 5000), throughput %.3fx of 1,000 sandboxes per CPU-second (goal 0.95x): %s\n", n, b, t, r, (ok ? "met" : "not met") }'
)
echo "$report"
if [ "${SAVE:-1}" = 1 ]; then
  mkdir -p loadtest/results
  echo "$report" > "loadtest/results/$(date -u +%F)-$commit-scale.md"
fi
