#!/usr/bin/env bash
# Builds the operator and worker images from binaries cargo already built, without a registry or
# a container builder, and (with --import) loads them into the real node's containerd.
#
# The layout is the runtime stage of operator/Dockerfile and worker/Dockerfile: the binary at
# /usr/local/bin/<name>, entrypoint that binary, command `run`, user 65532:65532, the CA bundle
# at /etc/ssl/certs/ca-certificates.crt, /etc/passwd and /etc/group with the nonroot user, the
# shared libraries the binary links (distroless "cc" carries glibc, libgcc and libssl) and no
# shell. tests/tests/images.rs checks that the Dockerfiles and this script agree.
#
# usage: images.sh BIN_DIR OUT_DIR [--import]
#   BIN_DIR  holds vectorpipe-operator and vectorpipe-worker (e.g. target/debug)
# Image names are the chart's defaults: ghcr.io/vectorpipe/vectorpipe-{operator,worker}:<version>.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

bin_dir=${1:?usage: images.sh BIN_DIR OUT_DIR [--import]}
out=${2:?usage: images.sh BIN_DIR OUT_DIR [--import]}
import=${3:-}
version=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$here/../../charts/vectorpipe/Chart.yaml")
mkdir -p "$out"

# image NAME PORT: the image of one binary.
image() {
  local name=$1 port=$2 root="$out/$1-rootfs"
  rm -rf "$root"
  mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp"
  chmod 1777 "$root/tmp"
  install -m 0755 "$bin_dir/$name" "$root/usr/local/bin/$name"
  cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
  mkdir -p "$root/home/nonroot"
  # The shared libraries the binary links, at the paths the dynamic loader looks them up.
  local lib
  for lib in $(ldd "$bin_dir/$name" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
  python3 "$here/mkimage.py" "$root" "$out/$name.tar" "ghcr.io/vectorpipe/$name:$version" \
    --entrypoint "[\"/usr/local/bin/$name\"]" --cmd '["run"]' --user 65532:65532 \
    --expose "$port/tcp" >&2
  rm -rf "$root"
}

image vectorpipe-operator 8080
image vectorpipe-worker 9090
if [ "$import" = --import ]; then
  for name in vectorpipe-operator vectorpipe-worker; do
    ctr -n k8s.io images import "$out/$name.tar" >/dev/null
  done
  log "images: imported ghcr.io/vectorpipe/vectorpipe-{operator,worker}:$version"
fi
