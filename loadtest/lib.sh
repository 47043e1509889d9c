# Shared by the proxy benchmarks (run.sh, scale.sh): a scratch directory `work` and a list
# `pids` of started processes, both cleaned up at exit; ports, nginx configs, wrk rounds, CPU and
# memory of the process under test, medians.

work=$(mktemp -d)
pids=()
cleanup() {
  # A script's own first step (e.g. letting a helper shut down cleanly).
  if declare -F before_cleanup >/dev/null; then before_cleanup || true; fi
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # A process that outlives SIGTERM by 5 s (the reference ingress keeps serving) is killed.
  local _
  for _ in $(seq 1 50); do
    local alive=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# A port no socket uses, never handed out twice by this script. Taken from below the kernel's
# ephemeral range, so an outgoing connection cannot be holding it by the time it is bound.
free_port() {
  local first lo hi p
  read -r first _ < /proc/sys/net/ipv4/ip_local_port_range
  if [ "$first" -gt 22000 ]; then lo=$((first - 12000)); hi=$((first - 1)); else lo=10000; hi=19999; fi
  touch "$work/ports"
  while :; do
    p=$(( lo + RANDOM % (hi - lo + 1) ))
    grep -qx "$p" "$work/ports" && continue
    [ -n "$(ss -Htan "sport = :$p" 2>/dev/null)" ] && continue
    echo "$p" >> "$work/ports"
    echo "$p"
    return
  done
}

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

to_ms() { # wrk latency like 1.23ms / 456.00us / 1.02s
  awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/, "", v); print v/1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v); print v+0 } else { sub(/s$/, "", v); print v*1000 } }'
}

cpu_ticks() { # user + system clock ticks of the given processes
  local total=0 p
  for p in "$@"; do
    total=$(( total + $(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$p/stat") ))
  done
  echo "$total"
}

rss_kib() { # summed VmRSS of the given processes
  local total=0 p
  for p in "$@"; do total=$(( total + $(awk '/VmRSS/ { print $2 }' "/proc/$p/status") )); done
  echo "$total"
}

median() { tr ' ' '\n' <<<"$1" | awk 'NF' | sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

# One wrk run on CPU $LOAD_CPU against url, charging the CPU of the watched pids (may be none).
# Prints "req/s requests p50_ms p99_ms errors req_per_cpu_s" (req_per_cpu_s: - when unwatched).
wrk_round() { # url, watched pids (space separated), extra wrk args...
  local url=$1 watched=$2; shift 2
  local -a pids
  read -r -a pids <<<"$watched"
  local before=0 after=0 out
  [ ${#pids[@]} -gt 0 ] && before=$(cpu_ticks "${pids[@]}")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "$@" "$url")
  [ ${#pids[@]} -gt 0 ] && after=$(cpu_ticks "${pids[@]}")
  local r total l m e c=-
  r=$(awk '/Requests\/sec/ { print $2 }' <<<"$out")
  total=$(awk '/requests in/ { print $1 }' <<<"$out")
  l=$(to_ms "$(awk '$1 == "99%" { print $2 }' <<<"$out")")
  m=$(to_ms "$(awk '$1 == "50%" { print $2 }' <<<"$out")")
  e=$(awk '/Non-2xx/ { n += $NF } /Socket errors/ { for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) n += $i } END { print n + 0 }' <<<"$out")
  if [ "$after" -gt "$before" ]; then
    c=$(awk -v n="$total" -v t=$(( after - before )) -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.0f", n / (t / hz) }')
  fi
  echo "$r $total $m $l $e $c"
}
