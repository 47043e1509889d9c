#!/usr/bin/env bash
# Gateway vs nginx proxy_pass vs the upstream directly, side by side in one run on loopback.
# Reports req/s, requests per CPU-second of the proxy process (user + system time over the run,
# all its threads; nginx: master and worker), p50/p99, errors and the proxy's RSS; writes a
# markdown table and a JSON file to loadtest/results/.
#
# Pinning: the proxy under test (gateway with --threads 1, or nginx with one worker) runs alone
# on CPU 0; wrk and the upstream (nginx, one worker) share CPU 1. Each target is measured
# ROUNDS times, interleaved, and the medians are reported. Prints a table and a verdict line
# and writes both to loadtest/results/, with the JSON result and a PNG chart of it.
#
# With REFERENCE_INGRESS_BIN set to a build of the reference ingress (see the README), the
# project's test API server is started with one BatchSandbox pointing at the upstream, and two
# more targets run on it: the gateway on the Kubernetes provider and the reference ingress
# (GOMAXPROCS=1, its default logging), pinned like the others.
#
# With BASE set to a git revision, the gateway as built at that revision (scripts/gateway-at.sh)
# runs beside today's with the same flags, and a verdict gives today's throughput per CPU-second
# as a ratio of it: a before/after comparison in one run.
#
# Env: ROUNDS (3), DURATION (10s), CONNECTIONS (50), PAYLOAD (bytes in the upstream body, 128),
# SAVE (1: write the report to loadtest/results/; the test command's short run sets 0),
# REFERENCE_INGRESS_BIN (unset: no Kubernetes targets), BASE (unset: no before/after target).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
PAYLOAD=${PAYLOAD:-128}
PROXY_CPU=0
LOAD_CPU=1

scripts/setup.sh wrk nginx fonts-dejavu-core
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release -p gateway --bin sandbox-gateway >/dev/null
GATEWAY=target/release/sandbox-gateway
if [ -n "${BASE:-}" ]; then
  BASELINE=$(scripts/gateway-at.sh "$BASE" | tail -n 1)
  base_commit=$(git rev-parse --short "$BASE^{commit}")
fi

. loadtest/lib.sh

UP=$(free_port); NGX=$(free_port); GW=$(free_port); GWM=$(free_port); GWL=$(free_port); GWLM=$(free_port); GWF=$(free_port); GWFM=$(free_port)
body=$(head -c "$PAYLOAD" /dev/zero | tr '\0' 'x')

nginx_conf upstream "server { listen 127.0.0.1:$UP; location / { default_type text/plain; return 200 '$body'; } }"
nginx_conf proxy "upstream sandbox { server 127.0.0.1:$UP; keepalive 256; }
  server { listen 127.0.0.1:$NGX; location / {
    proxy_pass http://sandbox; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } }"

taskset -c $LOAD_CPU "$NGINX" -c "$work/upstream/nginx.conf" & pids+=($!)
taskset -c $PROXY_CPU "$NGINX" -c "$work/proxy/nginx.conf" & pids+=($!)
nginx_proxy_pid=$!

cat > "$work/sandboxes.yaml" <<YAML
apiVersion: sandbox.opensandbox.io/v1alpha1
kind: BatchSandbox
metadata:
  name: bench
  namespace: default
  annotations:
    sandbox.opensandbox.io/endpoints: '["127.0.0.1"]'
status:
  ready: 1
YAML
gw_args=(--provider-type file --sandbox-file "$work/sandboxes.yaml" --bind 127.0.0.1 --threads 1)
taskset -c $PROXY_CPU "$GATEWAY" "${gw_args[@]}" --port "$GW" --metrics-port "$GWM" --access-log=false >/dev/null & pids+=($!)
gateway_pid=$!
taskset -c $PROXY_CPU "$GATEWAY" "${gw_args[@]}" --port "$GWL" --metrics-port "$GWLM" >/dev/null & pids+=($!)
gateway_log_pid=$!
# Every request through the full Pingora proxy: what the lean path saves.
taskset -c $PROXY_CPU "$GATEWAY" "${gw_args[@]}" --port "$GWF" --metrics-port "$GWFM" --access-log=false --lean-path=false >/dev/null & pids+=($!)
gateway_full_pid=$!
if [ -n "${BASE:-}" ]; then
  GWB=$(free_port); GWBM=$(free_port)
  taskset -c $PROXY_CPU "$BASELINE" "${gw_args[@]}" --port "$GWB" --metrics-port "$GWBM" --access-log=false >/dev/null & pids+=($!)
  gateway_base_pid=$!
  for _ in $(seq 1 100); do curl -fs "http://127.0.0.1:$GWBM/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
fi

for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$GWM/readyz" >/dev/null 2>&1 && curl -fs "http://127.0.0.1:$GWLM/readyz" >/dev/null 2>&1 \
    && curl -fs "http://127.0.0.1:$GWFM/readyz" >/dev/null 2>&1 \
    && curl -fs "http://127.0.0.1:$NGX/" >/dev/null 2>&1 && break
  sleep 0.1
done
route="OpenSandbox-Ingress-To: bench-$UP"
curl -fs -H "$route" "http://127.0.0.1:$GW/" | grep -q x || { echo "gateway does not answer" >&2; exit 1; }

targets=(direct nginx gateway gateway_log gateway_full)
[ -n "${BASE:-}" ] && targets+=(gateway_base)
if [ -n "${REFERENCE_INGRESS_BIN:-}" ]; then
  [ -x "$REFERENCE_INGRESS_BIN" ] || { echo "REFERENCE_INGRESS_BIN=$REFERENCE_INGRESS_BIN is not an executable" >&2; exit 1; }
  K8S_TESTENV_DIR=$(scripts/k8s-testenv/build.sh | tail -n 1)
  export K8S_TESTENV_DIR
  cargo build --release -p gateway --example k8s-bench >/dev/null
  # The control plane lives as long as this script holds the pipe open; closing it lets the
  # helper stop etcd and kube-apiserver itself (a signal would leave them running).
  mkfifo "$work/hold"
  taskset -c $LOAD_CPU target/release/examples/k8s-bench serve "$work/kubeconfig" <"$work/hold" &
  serve_pid=$!
  exec 7>"$work/hold"
  before_cleanup() {
    exec 7>&-
    local _
    for _ in $(seq 1 100); do kill -0 "$serve_pid" 2>/dev/null || return 0; sleep 0.1; done
    kill "$serve_pid"
  }
  for _ in $(seq 1 600); do [ -s "$work/kubeconfig" ] && break; sleep 0.1; done
  [ -s "$work/kubeconfig" ] || { echo "test API server did not start" >&2; exit 1; }
  REF=$(free_port); GWK=$(free_port); GWKM=$(free_port)
  taskset -c $PROXY_CPU env GOMAXPROCS=1 KUBECONFIG="$work/kubeconfig" "$REFERENCE_INGRESS_BIN" \
    --port "$REF" --provider-type batchsandbox --mode header >"$work/reference.log" 2>&1 7>&- & pids+=($!)
  reference_pid=$!
  taskset -c $PROXY_CPU "$GATEWAY" --provider-type batchsandbox --kubeconfig "$work/kubeconfig" \
    --allowed-upstream-cidrs 127.0.0.1/32 --bind 127.0.0.1 --threads 1 --port "$GWK" --metrics-port "$GWKM" \
    --access-log=false >/dev/null 7>&- & pids+=($!)
  gateway_kube_pid=$!
  for _ in $(seq 1 300); do
    curl -fs -H "$route" "http://127.0.0.1:$REF/" 2>/dev/null | grep -q x \
      && curl -fs -H "$route" "http://127.0.0.1:$GWK/" 2>/dev/null | grep -q x && break
    sleep 0.1
  done
  curl -fs -H "$route" "http://127.0.0.1:$REF/" | grep -q x || { echo "reference ingress does not answer:" >&2; tail -5 "$work/reference.log" >&2; exit 1; }
  curl -fs -H "$route" "http://127.0.0.1:$GWK/" | grep -q x || { echo "gateway (Kubernetes provider) does not answer" >&2; exit 1; }
  targets+=(gateway_kube reference)
fi

# The processes whose CPU a target's requests cost (the proxy; none for the upstream itself).
proxy_pids() {
  case $1 in
    direct) ;;
    nginx) echo "$nginx_proxy_pid $(pgrep -P "$nginx_proxy_pid" | tr '\n' ' ')" ;;
    gateway) echo "$gateway_pid" ;;
    gateway_log) echo "$gateway_log_pid" ;;
    gateway_full) echo "$gateway_full_pid" ;;
    gateway_base) echo "$gateway_base_pid" ;;
    gateway_kube) echo "$gateway_kube_pid" ;;
    reference) echo "$reference_pid" ;;
  esac
}
declare -A rps p99 p50 per_cpu errs rss
url_of() {
  case $1 in
    direct) echo "http://127.0.0.1:$UP/" ;;
    nginx) echo "http://127.0.0.1:$NGX/" ;;
    gateway) echo "http://127.0.0.1:$GW/" ;;
    gateway_log) echo "http://127.0.0.1:$GWL/" ;;
    gateway_full) echo "http://127.0.0.1:$GWF/" ;;
    gateway_base) echo "http://127.0.0.1:$GWB/" ;;
    gateway_kube) echo "http://127.0.0.1:$GWK/" ;;
    reference) echo "http://127.0.0.1:$REF/" ;;
  esac
}
for round in $(seq 1 "$ROUNDS"); do
  for t in "${targets[@]}"; do
    watched=$(proxy_pids "$t")
    read -r r _ m l e c <<<"$(wrk_round "$(url_of "$t")" "$watched" -H "$route")"
    [ "$e" = 0 ] || echo "warning: $t round $round: $e errors" >&2
    rps[$t]+="$r "
    p99[$t]+="$l "
    p50[$t]+="$m "
    errs[$t]+="$e "
    if [ "$c" != - ]; then
      per_cpu[$t]+="$c "
      read -r -a watched_pids <<<"$watched"
      rss[$t]=$(rss_kib "${watched_pids[@]}")
    fi
    echo "round $round $t: $r req/s, p99 $l ms" >&2
  done
done

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
direct_rps=$(median "${rps[direct]}")
nginx_rps=$(median "${rps[nginx]}")
report=$(
  echo "date $(date -u +%F), commit $commit, $ROUNDS rounds x $DURATION, $CONNECTIONS connections, ${PAYLOAD}-byte body"
  echo "proxy on CPU $PROXY_CPU alone; wrk and upstream nginx on CPU $LOAD_CPU"
  echo
  printf '| %-28s | %8s | %9s | %12s | %7s | %7s | %6s | %7s | %9s |\n' target "req/s" "vs direct" "req/CPU-s" "vs nginx" "p50 ms" "p99 ms" errors "RSS MiB"
  echo "|---|---|---|---|---|---|---|---|---|"
  nginx_cpu=$(median "${per_cpu[nginx]}")
  for t in "${targets[@]}"; do
    r=$(median "${rps[$t]}"); l=$(median "${p99[$t]}"); m=$(median "${p50[$t]}")
    c=$(median "${per_cpu[$t]:-}"); e=$(tr ' ' '\n' <<<"${errs[$t]}" | awk '{ n += $1 } END { print n + 0 }')
    name=$t
    case $t in
      direct) name="upstream directly" ;;
      nginx) name="nginx proxy_pass (keepalive)" ;;
      gateway) name="sandbox-gateway" ;;
      gateway_log) name="sandbox-gateway, access log" ;;
      gateway_full) name="sandbox-gateway, full path" ;;
      gateway_base) name="sandbox-gateway at $base_commit" ;;
      gateway_kube) name="sandbox-gateway, Kubernetes" ;;
      reference) name="reference ingress (Go)" ;;
    esac
    if [ -n "$c" ]; then
      cpu_cell=$c; vs=$(awk -v a="$c" -v b="$nginx_cpu" 'BEGIN { printf "%.2fx", a / b }')
      mem=$(awk -v k="${rss[$t]}" 'BEGIN { printf "%.1f", k / 1024 }')
    else
      cpu_cell=-; vs=-; mem=-
    fi
    printf '| %-28s | %8.0f | %9s | %12s | %7s | %7.2f | %6.2f | %7s | %9s |\n' "$name" "$r" \
      "$(awk -v a="$r" -v b="$direct_rps" 'BEGIN { printf "%.2fx", a / b }')" "$cpu_cell" "$vs" "$m" "$l" "$e" "$mem"
  done
  gw=$(median "${per_cpu[gateway]}")
  echo
  awk -v a="$gw" -v b="$nginx_cpu" -v p="$(median "${p99[gateway]}")" -v q="$(median "${p99[nginx]}")" 'BEGIN {
    r = a / b; l = p / q
    printf "verdict: sandbox-gateway serves %.2fx nginx proxy_pass per CPU-second (goal 0.80x: %s); p99 %.2fx nginx (goal at most 1.5x: %s)\n", r, (r >= 0.8 ? "met" : "not met"), l, (l <= 1.5 ? "met" : "not met") }'
  if [ -n "${BASE:-}" ]; then
    awk -v a="$gw" -v b="$(median "${per_cpu[gateway_base]}")" -v p="$(median "${p99[gateway]}")" \
      -v q="$(median "${p99[gateway_base]}")" -v base="$base_commit" -v now="$commit" 'BEGIN {
      r = a / b; printf "verdict: sandbox-gateway at %s serves %.2fx itself at %s per CPU-second (p99 %.2fx; no drop: %s)\n", now, r, base, p / q, (r >= 0.95 ? "met" : "not met") }'
  fi
  if [ -n "${per_cpu[reference]:-}" ]; then
    awk -v a="$(median "${per_cpu[gateway_kube]}")" -v b="$(median "${per_cpu[reference]}")" 'BEGIN {
      r = a / b; printf "verdict: sandbox-gateway (Kubernetes provider) serves %.1fx the reference ingress per CPU-second (goal 6x: %s)\n", r, (r >= 6 ? "met" : "not met") }'
  fi
)
echo "$report"
json=""
for t in "${targets[@]}"; do
  c=$(median "${per_cpu[$t]:-}")
  json+=$(printf '%s{"target":"%s","rps":%s,"req_per_cpu_s":%s,"p50_ms":%s,"p99_ms":%s,"errors":%s,"rss_kib":%s}' \
    "${json:+,}" "$t" "$(median "${rps[$t]}")" "${c:-null}" "$(median "${p50[$t]}")" \
    "$(median "${p99[$t]}")" "$(tr ' ' '\n' <<<"${errs[$t]}" | awk '{ n += $1 } END { print n + 0 }')" "${rss[$t]:-null}")
done
if [ "${SAVE:-1}" = 1 ]; then
  mkdir -p loadtest/results
  echo "$report" > "loadtest/results/$(date -u +%F)-$commit-proxy.md"
  printf '{"date":"%s","commit":"%s","rounds":%s,"duration":"%s","connections":%s,"payload":%s,"targets":[%s]}\n' \
    "$(date -u +%F)" "$commit" "$ROUNDS" "$DURATION" "$CONNECTIONS" "$PAYLOAD" "$json" \
    > "loadtest/results/$(date -u +%F)-$commit-proxy.json"
  cargo build --release -p bench-chart >/dev/null
  target/release/bench-chart "loadtest/results/$(date -u +%F)-$commit-proxy.json" \
    "loadtest/results/$(date -u +%F)-$commit-proxy.png"
  echo "chart: loadtest/results/$(date -u +%F)-$commit-proxy.png"
fi
