#!/usr/bin/env bash
# Builds the three container images without a Docker daemon: buildah (vfs storage, as root),
# FROM scratch plus exactly the files each binary needs (the binary, the shared libraries ldd
# lists, /etc/passwd and /etc/group; the sidecar also nft and its libraries).
#
#   sandbox-gateway     runs as 65532:65532
#   sandbox-controller  runs as 65532:65532
#   egress-sidecar      runs as 0:0 with, in the pod, NET_ADMIN alone and no privilege
#                       escalation (Kubernetes gives added capabilities to a non-root process
#                       only through file capabilities, which need privilege escalation)
#
# Images are tagged IMAGE_PREFIX/<name>:<version> (default localhost/opensandbox) and, so an
# unchanged build is not redone, labelled with a hash of their files: an image whose hash
# matches is kept. Prints one "image <name> <ref>" line per image.
# Env: IMAGE_PREFIX, IMAGE_TAG (default: the workspace version), IMAGE_SOURCE (the source label;
# default: the git remote `origin` when it is a URL), ARCHIVE_DIR (when set, each
# image is also written there as an OCI archive, <name>.tar, for `skopeo copy` or `ctr import`).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh buildah runc
# vfs storage: works as root wherever overlay mounts are not allowed.
buildah() { command buildah --storage-driver vfs "$@"; }
prefix=${IMAGE_PREFIX:-localhost/opensandbox}
version=$(awk -F'"' '/^version = / { print $2; exit }' Cargo.toml)
tag=${IMAGE_TAG:-$version}
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
source_url=${IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || true)}
# Only a public address: a clone of a local directory has a path there.
case "$source_url" in http://* | https://* | git@*) ;; *) source_url="" ;; esac

cargo build --release --locked -p gateway -p controller -p sidecar \
  --bin sandbox-gateway --bin sandbox-controller --bin egress-sidecar >&2

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# add_with_libs ROOT FILE DEST: copies FILE to ROOT/DEST and every library ldd names for it to
# the same path under ROOT (symlinks resolved).
add_with_libs() {
  local root=$1 file=$2 dest=$3
  install -D -m 0755 "$file" "$root$dest"
  ldd "$file" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' | while read -r lib; do
    local real
    real=$(readlink -f "$lib")
    # Modes kept: the dynamic loader must stay executable.
    install -D -m "$(stat -c %a "$real")" "$real" "$root$lib"
  done
}

# build NAME BINARY UID: stages the image's files, then builds it unless an image with the same
# files exists.
build() {
  local name=$1 binary=$2 uid=$3 root="$work/$1"
  mkdir -p "$root/etc" "$root/tmp"
  chmod 1777 "$root/tmp"
  add_with_libs "$root" "target/release/$binary" "/usr/local/bin/$binary"
  if [ "$name" = egress-sidecar ]; then
    add_with_libs "$root" "$(command -v nft || echo /usr/sbin/nft)" /usr/sbin/nft
  fi
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/sbin/nologin\n' >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  local files
  # Contents, modes and the revision label: any change makes a new image.
  files=$(cd "$root" && { find . -printf '%m %p\n' | sort; find . -type f -print0 | sort -z |
    xargs -0 sha256sum; echo "$revision"; } | sha256sum | cut -c1-16)
  local ref="$prefix/$name:$tag"
  if [ "$(buildah inspect --type image --format '{{index .ImageAnnotations "org.opensandbox.files"}}' "$ref" 2>/dev/null || true)" = "$files" ]; then
    echo "image $name $ref (unchanged)"
  else
    local ctr
    ctr=$(buildah from --pull=never scratch)
    buildah copy --quiet "$ctr" "$root" / >/dev/null
    buildah config \
      --entrypoint "[\"/usr/local/bin/$binary\"]" --cmd '' \
      --user "$uid:$uid" \
      --env PATH=/usr/local/bin:/usr/sbin:/usr/bin \
      --label "org.opencontainers.image.title=$name" \
      --label "org.opencontainers.image.version=$version" \
      --label "org.opencontainers.image.revision=$revision" \
      ${source_url:+--label "org.opencontainers.image.source=$source_url"} \
      --label "org.opencontainers.image.licenses=Apache-2.0" \
      --annotation "org.opensandbox.files=$files" \
      "$ctr"
    buildah commit --quiet --rm "$ctr" "$ref" >/dev/null
    echo "image $name $ref"
  fi
  # The image this tag pointed at before, if any, is dangling now.
  buildah rmi --prune >/dev/null 2>&1 || true
  if [ -n "${ARCHIVE_DIR:-}" ]; then
    mkdir -p "$ARCHIVE_DIR"
    rm -f "$ARCHIVE_DIR/$name.tar"
    buildah push --quiet "$ref" "oci-archive:$ARCHIVE_DIR/$name.tar:$ref" >/dev/null
  fi
}

build sandbox-gateway sandbox-gateway 65532
build sandbox-controller sandbox-controller 65532
build egress-sidecar egress-sidecar 0
