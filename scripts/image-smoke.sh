#!/usr/bin/env bash
# Runs each image built by scripts/images.sh with runc (no Docker daemon; podman cannot run
# containers on these machines) on a bundle whose root is the mounted image, read-only, as the
# image's user, with no capability unless stated:
#   - every image answers --version with its name and the workspace version;
#   - the gateway, on the file provider, answers /status.ok and /readyz;
#   - the sidecar, in a network namespace of its own, started as the controller starts it (root
#     with NET_ADMIN, SETUID and SETGID alone, no privilege escalation, OPENSANDBOX_EGRESS_RUN_AS),
#     becomes uid 65533 with NET_ADMIN alone, programs nftables with the image's own nft and
#     answers /healthz.
# Needs root. Prints one "ok: ..." line per check; exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh buildah runc jq
# vfs storage: works as root wherever overlay mounts are not allowed.
buildah() { command buildah --storage-driver vfs "$@"; }
prefix=${IMAGE_PREFIX:-localhost/opensandbox}
version=$(awk -F'"' '/^version = / { print $2; exit }' Cargo.toml)
tag=${IMAGE_TAG:-$version}

work=$(mktemp -d)
id=smoke$$
netns=egsmoke$$
containers=()
cleanup() {
  for c in $(runc list -q 2>/dev/null | grep "^$id-" || true); do
    runc kill "$c" KILL 2>/dev/null || true
    runc delete -f "$c" 2>/dev/null || true
  done
  for c in "${containers[@]}"; do
    buildah umount "$c" >/dev/null 2>&1 || true
    buildah rm "$c" >/dev/null 2>&1 || true
  done
  ip netns del "$netns" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  exit 1
}

# bundle NAME IMAGE ARGS_JSON CAPS_JSON NETNS: writes $work/NAME/config.json for IMAGE.
bundle() {
  local name=$1 image=$2 args=$3 caps=$4 ns=$5 ctr mnt user entry
  ctr=$(buildah from --pull=never "$image")
  containers+=("$ctr")
  mnt=$(buildah mount "$ctr")
  user=$(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "$image")
  entry=$(buildah inspect --type image --format '{{index .OCIv1.Config.Entrypoint 0}}' "$image")
  mkdir -p "$work/$name"
  (cd "$work/$name" && runc spec)
  jq --arg root "$mnt" --arg entry "$entry" --argjson args "$args" --argjson caps "$caps" \
    --arg uid "${user%%:*}" --arg gid "${user##*:}" --arg ns "$ns" '
      .root = {path: $root, readonly: true}
      | .process.terminal = false
      | .process.user = {uid: ($uid | tonumber), gid: ($gid | tonumber)}
      | .process.args = [$entry] + $args
      | .process.env = ["PATH=/usr/local/bin:/usr/sbin:/usr/bin"]
      | del(.process.rlimits)
      | .process.noNewPrivileges = true
      | .process.capabilities = {bounding: $caps, effective: $caps, permitted: $caps}
      | .mounts += [{destination: "/tmp", type: "tmpfs", source: "tmpfs", options: ["nosuid", "nodev", "size=16m"]}]
      | .linux.namespaces = [.linux.namespaces[] | select(.type != "network")]
        + (if $ns == "host" then [] else [{type: "network", path: $ns}] end)
    ' "$work/$name/config.json" >"$work/$name/config.new"
  mv "$work/$name/config.new" "$work/$name/config.json"
}

# version NAME BINARY: the image answers --version.
version() {
  local name=$1 binary=$2 out
  bundle "$name-version" "$prefix/$name:$tag" '["--version"]' '[]' host
  out=$(runc run -b "$work/$name-version" "$id-$name-version" 2>&1) || fail "$name --version: $out"
  [ "$out" = "$binary $version" ] || fail "$name --version printed \"$out\", not \"$binary $version\""
  echo "ok: $name image answers --version ($out)"
}

# wait_http URL [NETNS]: waits up to 20 s for a 200.
wait_http() {
  local url=$1 ns=${2:-} i
  for i in $(seq 200); do
    if [ -n "$ns" ]; then
      ip netns exec "$ns" curl -fsS -m 1 "$url" >/dev/null 2>&1 && return 0
    else
      curl -fsS -m 1 "$url" >/dev/null 2>&1 && return 0
    fi
    sleep 0.1
  done
  return 1
}

version sandbox-gateway sandbox-gateway
version sandbox-controller sandbox-controller
version egress-sidecar egress-sidecar

# The gateway on the file provider, on the host's loopback.
mkdir -p "$work/files"
cp gateway/examples/sandboxes.yaml "$work/files/sandboxes.yaml"
bundle gateway "$prefix/sandbox-gateway:$tag" \
  '["--provider-type", "file", "--sandbox-file", "/etc/opensandbox/sandboxes.yaml", "--bind", "127.0.0.1", "--port", "28977", "--metrics-port", "29077", "--threads", "1"]' \
  '[]' host
jq --arg src "$work/files" '.mounts += [{destination: "/etc/opensandbox", type: "bind", source: $src, options: ["rbind", "ro"]}]' \
  "$work/gateway/config.json" >"$work/gateway/config.new" && mv "$work/gateway/config.new" "$work/gateway/config.json"
runc run -b "$work/gateway" "$id-gateway" >"$work/gateway.log" 2>&1 &
wait_http http://127.0.0.1:28977/status.ok || { cat "$work/gateway.log" >&2; fail "gateway image: no /status.ok"; }
body=$(curl -fsS http://127.0.0.1:28977/status.ok)
wait_http http://127.0.0.1:29077/readyz || { cat "$work/gateway.log" >&2; fail "gateway image: not ready"; }
echo "ok: gateway image serves /status.ok ($body) and /readyz on the file provider, as uid 65532, read-only root, no capabilities"
runc kill "$id-gateway" TERM
wait

# The sidecar, fenced as the controller fences it.
ip netns add "$netns"
ip -n "$netns" link set lo up
bundle sidecar "$prefix/egress-sidecar:$tag" '[]' '["CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID"]' "/run/netns/$netns"
jq '.process.env += [
      "OPENSANDBOX_EGRESS_MODE=dns+nft",
      "OPENSANDBOX_EGRESS_DNS_UPSTREAM=192.0.2.53",
      "OPENSANDBOX_EGRESS_RULES={\"defaultAction\":\"deny\",\"egress\":[{\"action\":\"allow\",\"target\":\"*.example.test\"}]}",
      "OPENSANDBOX_EGRESS_RULES_DIR=/tmp",
      "OPENSANDBOX_EGRESS_POLICY_FILE=/tmp/policy.json",
      "OPENSANDBOX_EGRESS_TOKEN=smoke-token",
      "OPENSANDBOX_EGRESS_RUN_AS=65533:65533"]' \
  "$work/sidecar/config.json" >"$work/sidecar/config.new" && mv "$work/sidecar/config.new" "$work/sidecar/config.json"
# On a host that still mounts cgroup v1 (cgroup2 only at /sys/fs/cgroup/unified), runc gives the
# container the v1 hierarchies alone; a kubelet on such a node does the same, and the sidecar
# refuses to start there (it needs cgroup v2). Give it the unified hierarchy where the host has it.
cg2=$(awk '$9 == "cgroup2" { print $5; exit }' /proc/self/mountinfo)
if [ -n "$cg2" ] && [ "$cg2" != /sys/fs/cgroup ]; then
  jq --arg at "$cg2" '.mounts += [{destination: $at, type: "cgroup2", source: "cgroup2", options: ["ro", "nosuid", "noexec", "nodev"]}]' \
    "$work/sidecar/config.json" >"$work/sidecar/config.new" && mv "$work/sidecar/config.new" "$work/sidecar/config.json"
fi
runc run -b "$work/sidecar" "$id-sidecar" >"$work/sidecar.log" 2>&1 &
wait_http http://127.0.0.1:18080/healthz "$netns" || { cat "$work/sidecar.log" >&2; fail "sidecar image: no /healthz"; }
ip netns exec "$netns" nft list table inet opensandbox >/dev/null || fail "sidecar image: no nftables table"
pid=$(runc state "$id-sidecar" | jq -r .pid)
caps=$(awk '/^CapEff/ { print $2 }' "/proc/$pid/status")
[ "$caps" = "0000000000001000" ] || fail "sidecar image: effective capabilities $caps, not NET_ADMIN alone"
uid=$(awk '/^Uid/ { print $2 }' "/proc/$pid/status")
[ "$uid" = 65533 ] || fail "sidecar image: runs as uid $uid, not 65533"
echo "ok: sidecar image becomes uid 65533 with NET_ADMIN alone, programs nftables with its own nft and serves /healthz"
runc kill "$id-sidecar" TERM
wait
