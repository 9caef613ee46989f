#!/usr/bin/env bash
# The test command: installs what the tests need, checks formatting and lints, starts the real
# servers (tests/harness/up.sh), runs every test, and stops the servers again, also on failure.
# Heavy builds are cached in $VP_CACHE (default ~/.cache/vectorpipe), so a second run is fast.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# Each run gets its own state directory, so a harness started by hand is left alone.
export VP_RUN="${VP_RUN:-$(mktemp -d "${TMPDIR:-/tmp}/vectorpipe-run.XXXXXX")}"
. tests/harness/common.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$VP_CACHE/target}"
started=$SECONDS
step() { log "[$((SECONDS - started))s] $*"; }

step "prerequisites"
missing=()
command -v prometheus >/dev/null || missing+=(prometheus)
command -v openssl >/dev/null || missing+=(openssl)
command -v curl >/dev/null || missing+=(curl)
# Argo CD health checks are Lua 5.1 (gopher-lua); the tests run them with Debian's interpreter.
command -v lua5.1 >/dev/null || missing+=(lua5.1)
# librdkafka's TLS and SCRAM link the system OpenSSL.
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
command -v pkg-config >/dev/null || missing+=(pkg-config)
# The real node (tests/harness/up.sh node): Debian's containerd and runc, and the CNI loopback plugin.
command -v containerd >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
[ -x /usr/lib/cni/loopback ] || missing+=(containernetworking-plugins)
# The query server's page is tested in headless Chromium.
[ -x /usr/bin/chromium ] || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    step "installing Debian packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    log "missing: ${missing[*]}; install them with: sudo apt-get install -y ${missing[*]}"
    exit 1
  fi
fi
for tool in cargo go java mvn python3; do
  command -v "$tool" >/dev/null || { log "$tool is required and not installed"; exit 1; }
done

step "the laptop mode's local model"
VECTORPIPE_MODEL_DIR="$(VECTORPIPE_CACHE="$VP_CACHE" examples/laptop/install-model.sh)"
export VECTORPIPE_MODEL_DIR

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --features vectorpipe-tests/harness -q -- -D warnings
step "building the binaries and the tests"
# The end-to-end tests run vectorpipe-worker as its own process, so the binary must exist.
cargo build --workspace --bins --features vectorpipe-tests/harness -q
cargo test --workspace --features vectorpipe-tests/harness --no-run -q

step "starting the harness servers"
trap 'step "stopping the harness servers"; tests/harness/down.sh' EXIT
tests/harness/up.sh k8s kafka prometheus opensearch node
. "$VP_RUN/env"

step "running the tests"
status=0
cargo test --workspace --features vectorpipe-tests/harness --no-fail-fast 2>&1 | tee "$VP_RUN/test-output.txt" || status=$?
passed=$(grep -E '^test result:' "$VP_RUN/test-output.txt" | awk '{s += $4} END {print s + 0}')
failed=$(grep -E '^test result:' "$VP_RUN/test-output.txt" | awk '{s += $6} END {print s + 0}')
ignored=$(grep -E '^test result:' "$VP_RUN/test-output.txt" | awk '{s += $8} END {print s + 0}')
step "done"
echo "vectorpipe: $passed passed, $failed failed, $ignored skipped"
exit "$status"
