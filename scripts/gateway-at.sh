#!/usr/bin/env bash
# Build the gateway as it was at a git revision, for a before/after benchmark
# (`make bench BASE=<rev>`). The revision is checked out in a temporary worktree
# and built in release mode with a target directory kept in the cache, so a
# second build of any revision reuses the compiled dependencies.
#
# Output: ${XDG_CACHE_HOME:-$HOME/.cache}/opensandbox-rs/gateway-at/<commit>/sandbox-gateway
# The build is skipped when that binary exists. The last line printed on stdout
# is the binary's path; everything else goes to stderr.
set -euo pipefail
cd "$(dirname "$0")/.."

rev=${1:?usage: scripts/gateway-at.sh <git revision>}
commit=$(git rev-parse --verify --short=12 "$rev^{commit}")
cache="${XDG_CACHE_HOME:-$HOME/.cache}/opensandbox-rs"
out="$cache/gateway-at/$commit"
if [ ! -x "$out/sandbox-gateway" ]; then
  tree=$(mktemp -d)
  trap 'git worktree remove --force "$tree" >/dev/null 2>&1 || rm -rf "$tree"' EXIT
  git worktree add --detach "$tree" "$commit" >&2
  echo "building the gateway at $commit (release)..." >&2
  (cd "$tree" && CARGO_TARGET_DIR="$cache/gateway-at/target" \
    cargo build --release --locked -p gateway --bin sandbox-gateway >&2)
  mkdir -p "$out"
  cp "$cache/gateway-at/target/release/sandbox-gateway" "$out/sandbox-gateway.new"
  mv "$out/sandbox-gateway.new" "$out/sandbox-gateway"
fi
echo "$out/sandbox-gateway"
