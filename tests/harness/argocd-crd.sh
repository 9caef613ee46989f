#!/usr/bin/env bash
# Prints the path of Argo CD's real Application CRD, taken from the argo-cd Go module that the Go
# module proxy serves (the repository's manifests/crds/application-crd.yaml). Cached in
# $VP_CACHE/argocd, so only the first run downloads the module (about 25 MB).
set -euo pipefail
. "$(dirname "$0")/common.sh"
# The newest argo-cd module that the machine's Go (1.26) accepts.
version=v3.1.8
out="$VP_CACHE/argocd/$version/application-crd.yaml"
if [ ! -s "$out" ]; then
  log "argocd: fetching github.com/argoproj/argo-cd/v3@$version for its Application CRD"
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  zip=$(cd "$work" && go mod download -json "github.com/argoproj/argo-cd/v3@$version" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["Zip"])')
  mkdir -p "$(dirname "$out")"
  python3 - "$zip" "github.com/argoproj/argo-cd/v3@$version/manifests/crds/application-crd.yaml" "$out.partial" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[3], "wb") as f:
    f.write(z.read(sys.argv[2]))
PY
  mv "$out.partial" "$out"
fi
printf '%s\n' "$out"
