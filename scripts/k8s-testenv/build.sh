#!/usr/bin/env bash
# Build the real kube-apiserver and etcd binaries for integration tests from
# the tools module in this directory (go.mod pins k8s.io/kubernetes and
# go.etcd.io/etcd/server/v3; the k8s staging modules are replaced with their
# published v0.Y.Z twins because `go install k8s.io/kubernetes/...@vX` cannot
# cope with upstream's ./staging replace directives).
#
# Output: ${XDG_CACHE_HOME:-$HOME/.cache}/opensandbox-rs/k8s-<version>/{kube-apiserver,etcd}
# The build is skipped when both binaries already exist. The last line printed
# on stdout is the cache directory; everything else goes to stderr.
#
# Env knobs:
#   K8S_TESTENV_BUILD_JOBS  go build -p value (default 2; linking kube-apiserver
#                           takes a few GB of RAM per job)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

command -v go >/dev/null || { echo "build.sh: 'go' not found in PATH" >&2; exit 1; }

# The go.sum in this directory is complete; never let the build rewrite it.
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=readonly"
export CGO_ENABLED="${CGO_ENABLED:-0}"
jobs="${K8S_TESTENV_BUILD_JOBS:-2}"

k8s_version="$(go list -m -f '{{.Version}}' k8s.io/kubernetes)"
etcd_version="$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)"

cache_dir="${XDG_CACHE_HOME:-$HOME/.cache}/opensandbox-rs/k8s-${k8s_version}"
apiserver="$cache_dir/kube-apiserver"
etcd="$cache_dir/etcd"

if [[ -x "$apiserver" && -x "$etcd" ]]; then
    echo "build.sh: kube-apiserver ${k8s_version} and etcd ${etcd_version} already built" >&2
    echo "$cache_dir"
    exit 0
fi

mkdir -p "$cache_dir"

# Same version stamping as upstream hack/lib/version.sh, so /version reports
# the real release instead of v0.0.0-master.
major="${k8s_version#v}"; major="${major%%.*}"
minor="${k8s_version#v*.}"; minor="${minor%%.*}"
ldflags="-s"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=" -X ${pkg}.gitVersion=${k8s_version}"
    ldflags+=" -X ${pkg}.gitMajor=${major}"
    ldflags+=" -X ${pkg}.gitMinor=${minor}"
    ldflags+=" -X ${pkg}.gitTreeState=clean"
done

# build <main package> <output path> [ldflags]: build into a temp file and
# rename, so an interrupted build never leaves a half-written binary behind
# that would make the skip check above pass.
build() {
    local pkg="$1" out="$2" flags="${3:--s}"
    if [[ -x "$out" ]]; then
        echo "build.sh: $(basename "$out") already present" >&2
        return
    fi
    echo "build.sh: building $pkg -> $out (-p $jobs)" >&2
    go build -p "$jobs" -trimpath -ldflags="$flags" -o "$out.tmp.$$" "$pkg" >&2
    mv -f "$out.tmp.$$" "$out"
}

trap 'rm -f "$cache_dir"/*.tmp.$$' EXIT

build go.etcd.io/etcd/server/v3 "$etcd"
build k8s.io/kubernetes/cmd/kube-apiserver "$apiserver" "$ldflags"

echo "build.sh: built kube-apiserver ${k8s_version} and etcd ${etcd_version}" >&2
echo "$cache_dir"
