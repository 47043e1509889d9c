#!/usr/bin/env bash
# Installs what building and testing need on a fresh Debian machine; a no-op when present.
# Usage: scripts/setup.sh [extra Debian packages...]
set -euo pipefail

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)      # Pingora builds zlib-ng through cmake
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)   # service-account key of the test API server
# The egress sidecar's tests: network namespaces, nftables, dnsmasq as upstream, dig as client.
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]; }
have ip || need+=(iproute2)
have nft || need+=(nftables)
have dnsmasq || need+=(dnsmasq-base)
have dig || need+=(dnsutils)
have setpriv || need+=(util-linux)
# The conntrack table read in a namespace (the sidecar's own flows must not carry sandbox packets).
have conntrack || need+=(conntrack)
# Renew intents: the gateway and controller tests start a real redis-server.
have redis-server || need+=(redis-server)
for pkg in "$@"; do
  case "$pkg" in
    nginx) command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light) ;;
    fonts-dejavu-core) [ -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core) ;;
    *) command -v "$pkg" >/dev/null 2>&1 || need+=("$pkg") ;;
  esac
done

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if ! command -v go >/dev/null 2>&1; then
  echo "go not found: the Kubernetes tests build kube-apiserver and etcd with it" >&2
  exit 1
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install a stable Rust toolchain (rustup) first" >&2
  exit 1
fi
