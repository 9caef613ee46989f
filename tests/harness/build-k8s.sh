#!/usr/bin/env bash
# Builds the Kubernetes control plane used by the tests from the Go module proxy:
# kube-apiserver, kube-controller-manager, kube-scheduler and the kubelet of the real node
# (k8s.io/kubernetes), etcd (go.etcd.io/etcd/server/v3) and kwok (sigs.k8s.io/kwok). Binaries land in
# $VP_CACHE/k8s/v$K8S_VERSION and are reused when already there.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

K8S_VERSION="${K8S_VERSION:-1.37.2}"
KWOK_VERSION="${KWOK_VERSION:-v0.7.0}"
out="$VP_CACHE/k8s/v$K8S_VERSION"
wanted=(kube-apiserver kube-controller-manager kube-scheduler kubelet etcd kwok)

all_built() {
  local b
  for b in "${wanted[@]}"; do [ -x "$out/$b" ] || return 1; done
}
if all_built; then
  log "control-plane binaries cached in $out"
  exit 0
fi

export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
mkdir -p "$out"
work="$VP_CACHE/k8s/src-v$K8S_VERSION"
mkdir -p "$work"
cp "$here/k8s/go.mod.in" "$work/go.mod"
cd "$work"

# k8s.io/kubernetes requires its staging modules (k8s.io/api, k8s.io/client-go, ...) at v0.0.0 and
# resolves them with replace directives that only apply inside its own repository. A module that
# depends on it must pin each of them to the published tag, so the list is read from its go.mod.
staging="v0.${K8S_VERSION#1.}"
kmod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
python3 - "$kmod" "$staging" "$K8S_VERSION" >>go.mod <<'PY'
import re, sys
gomod, staging, version = sys.argv[1:]
text = open(gomod).read()
mods = sorted(set(re.findall(r'^\s*(?:require\s+)?(k8s\.io/[\w.-]+)\s+v0\.0\.0(?:\s|$)', text, re.M)))
print(f"\nrequire k8s.io/kubernetes v{version}\n")
print("replace (")
for m in mods:
    print(f"\t{m} => {m} {staging}")
print(")")
PY

log "resolving k8s.io/kubernetes v$K8S_VERSION"
go get "k8s.io/kubernetes@v$K8S_VERSION"
etcd_version="${ETCD_VERSION:-$(go list -m -f '{{.Version}}' go.etcd.io/etcd/api/v3)}"
go get "go.etcd.io/etcd/server/v3@$etcd_version"

minor=$(echo "$K8S_VERSION" | cut -d. -f2)
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X $p.gitVersion=v$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
  ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=2026-01-01T00:00:00Z"
done
log "building kube-apiserver, kube-controller-manager, kube-scheduler, kubelet (slow on a cold machine)"
# The kubelet builds without cgo, like the rest: what the real node uses of it (containerd over
# CRI, cgroupfs) needs none.
go build -trimpath -ldflags "$ldflags" -o "$out/" \
  k8s.io/kubernetes/cmd/kube-apiserver \
  k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler \
  k8s.io/kubernetes/cmd/kubelet
log "building etcd $etcd_version"
go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3

# kwok lives in its own module so its dependency versions never fight kubernetes' own.
log "building kwok $KWOK_VERSION"
GOBIN="$out" go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"

"$out/kube-apiserver" --version
"$out/etcd" --version | sed -n 1p
all_built
