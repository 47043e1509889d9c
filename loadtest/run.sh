#!/usr/bin/env bash
# Gateway vs nginx proxy_pass vs the upstream directly, side by side in one run on loopback.
#
# Pinning: the proxy under test (gateway with --threads 1, or nginx with one worker) runs alone
# on CPU 0; wrk and the upstream (nginx, one worker) share CPU 1. Each target is measured
# ROUNDS times, interleaved, and the medians are reported. Prints a table and a verdict line
# and writes both to loadtest/results/.
#
# Env: ROUNDS (3), DURATION (10s), CONNECTIONS (50), PAYLOAD (bytes in the upstream body, 128),
# SAVE (1: write the report to loadtest/results/; the test command's short run sets 0).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-50}
PAYLOAD=${PAYLOAD:-128}
PROXY_CPU=0
LOAD_CPU=1

scripts/setup.sh wrk nginx
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
cargo build --release -p gateway --bin sandbox-gateway >/dev/null
GATEWAY=target/release/sandbox-gateway

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  local p
  while :; do
    p=$(( (RANDOM % 20000) + 30000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
}

UP=$(free_port); NGX=$(free_port); GW=$(free_port); GWM=$(free_port); GWL=$(free_port); GWLM=$(free_port)
body=$(head -c "$PAYLOAD" /dev/zero | tr '\0' 'x')

nginx_conf() { # name, body of the http block
  mkdir -p "$work/$1"
  cat > "$work/$1/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/$1/nginx.pid;
error_log $work/$1/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/$1;
  proxy_temp_path $work/$1;
  fastcgi_temp_path $work/$1;
  uwsgi_temp_path $work/$1;
  scgi_temp_path $work/$1;
  keepalive_requests 1000000;
  $2
}
CONF
}

nginx_conf upstream "server { listen 127.0.0.1:$UP; location / { default_type text/plain; return 200 '$body'; } }"
nginx_conf proxy "upstream sandbox { server 127.0.0.1:$UP; keepalive 256; }
  server { listen 127.0.0.1:$NGX; location / {
    proxy_pass http://sandbox; proxy_http_version 1.1; proxy_set_header Connection \"\";
    proxy_set_header Host \$host; proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for; } }"

taskset -c $LOAD_CPU "$NGINX" -c "$work/upstream/nginx.conf" & pids+=($!)
taskset -c $PROXY_CPU "$NGINX" -c "$work/proxy/nginx.conf" & pids+=($!)

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
taskset -c $PROXY_CPU "$GATEWAY" "${gw_args[@]}" --port "$GWL" --metrics-port "$GWLM" >/dev/null & pids+=($!)

for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$GWM/readyz" >/dev/null 2>&1 && curl -fs "http://127.0.0.1:$GWLM/readyz" >/dev/null 2>&1 \
    && curl -fs "http://127.0.0.1:$NGX/" >/dev/null 2>&1 && break
  sleep 0.1
done
route="OpenSandbox-Ingress-To: bench-$UP"
curl -fs -H "$route" "http://127.0.0.1:$GW/" | grep -q x || { echo "gateway does not answer" >&2; exit 1; }

to_ms() { # wrk latency like 1.23ms / 456.00us / 1.02s
  awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/, "", v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v); print v+0 } else { sub(/s$/, "", v); print v*1000 } }'
}

declare -A rps p99
targets=(direct nginx gateway gateway_log)
url_of() {
  case $1 in
    direct) echo "http://127.0.0.1:$UP/" ;;
    nginx) echo "http://127.0.0.1:$NGX/" ;;
    gateway) echo "http://127.0.0.1:$GW/" ;;
    gateway_log) echo "http://127.0.0.1:$GWL/" ;;
  esac
}
for round in $(seq 1 "$ROUNDS"); do
  for t in "${targets[@]}"; do
    out=$(taskset -c $LOAD_CPU wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -H "$route" "$(url_of "$t")")
    r=$(awk '/Requests\/sec/ { print $2 }' <<<"$out")
    l=$(awk '$1 == "99%" { print $2 }' <<<"$out")
    errors=$(awk '/Non-2xx|Socket errors/' <<<"$out")
    [ -z "$errors" ] || echo "warning: $t round $round: $errors" >&2
    rps[$t]+="$r "
    p99[$t]+="$(to_ms "$l") "
    echo "round $round $t: $r req/s, p99 $l" >&2
  done
done

median() { tr ' ' '\n' <<<"$1" | grep -v '^$' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
direct_rps=$(median "${rps[direct]}")
nginx_rps=$(median "${rps[nginx]}")
report=$(
  echo "date $(date -u +%F), commit $commit, $ROUNDS rounds x $DURATION, $CONNECTIONS connections, ${PAYLOAD}-byte body"
  echo "proxy on CPU $PROXY_CPU alone; wrk and upstream nginx on CPU $LOAD_CPU"
  echo
  printf '| %-28s | %12s | %9s | %10s | %9s |\n' target "req/s" "p99 ms" "vs nginx" "vs direct"
  printf '|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..30})" "$(printf -- '-%.0s' {1..14})" "$(printf -- '-%.0s' {1..11})" "$(printf -- '-%.0s' {1..12})" "$(printf -- '-%.0s' {1..11})"
  for t in "${targets[@]}"; do
    r=$(median "${rps[$t]}"); l=$(median "${p99[$t]}")
    name=$t
    case $t in
      direct) name="upstream directly" ;;
      nginx) name="nginx proxy_pass (keepalive)" ;;
      gateway) name="sandbox-gateway" ;;
      gateway_log) name="sandbox-gateway, access log" ;;
    esac
    printf '| %-28s | %12.0f | %9.2f | %10s | %9s |\n' "$name" "$r" "$l" \
      "$(awk -v a="$r" -v b="$nginx_rps" 'BEGIN { printf "%.2fx", a / b }')" \
      "$(awk -v a="$r" -v b="$direct_rps" 'BEGIN { printf "%.2fx", a / b }')"
  done
  gw=$(median "${rps[gateway]}")
  echo
  awk -v a="$gw" -v b="$nginx_rps" 'BEGIN { r = a / b; printf "verdict: sandbox-gateway reaches %.0f%% of nginx proxy_pass throughput (%s)\n", r * 100, (r >= 1 ? "at or above nginx" : "below nginx") }'
)
echo "$report"
if [ "${SAVE:-1}" = 1 ]; then
  mkdir -p loadtest/results
  echo "$report" > "loadtest/results/$(date -u +%F)-$commit-proxy.md"
fi
