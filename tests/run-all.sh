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
# A CI run builds everything once: incremental compilation's caches would only cost time there.
if [ -n "${CI:-}" ]; then export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"; fi
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

# The servers' builds (Go from the module proxy, jars from Maven Central) and the laptop mode's
# model do not need cargo's output: they run in the background while cargo lints and builds, which
# leaves neither core idle while the other waits on the network or on one long crate. Each job
# logs to $VP_RUN/prepare-<name>.log; a failed one stops the run before the tests with its log.
mkdir -p "$VP_RUN"
jobs_started=()
background() {
  local name=$1
  shift
  # Its own process group, so that stopping it also stops the go, mvn or pip it runs.
  setsid "$@" >"$VP_RUN/prepare-$name.out" 2>"$VP_RUN/prepare-$name.log" &
  jobs_started+=("$name:$!")
}
await() {
  local job name pid
  for job in "${jobs_started[@]}"; do
    name=${job%%:*} pid=${job#*:}
    if ! wait "$pid"; then
      log "preparing $name failed; last lines of $VP_RUN/prepare-$name.log:"
      tail -n 30 "$VP_RUN/prepare-$name.log" >&2
      exit 1
    fi
  done
  jobs_started=()
}
stop_background() {
  local job
  for job in "${jobs_started[@]}"; do kill -- "-${job#*:}" 2>/dev/null || true; done
}
trap stop_background EXIT
step "preparing in the background: control plane, kubectl, Kafka, OpenSearch, the local model"
background k8s tests/harness/build-k8s.sh
background kubectl tests/harness/build-kubectl.sh
background jars sh -c 'tests/harness/build-kafka.sh && tests/harness/build-opensearch.sh'
background model env VECTORPIPE_CACHE="$VP_CACHE" examples/laptop/install-model.sh

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --features vectorpipe-tests/harness -q -- -D warnings
step "building the binaries and the tests"
# The end-to-end tests run vectorpipe-worker as its own process, so the binary must exist.
cargo build --workspace --bins --features vectorpipe-tests/harness -q
cargo test --workspace --features vectorpipe-tests/harness --no-run -q

step "waiting for the background preparation"
await
VECTORPIPE_MODEL_DIR="$(cat "$VP_RUN/prepare-model.out")"
export VECTORPIPE_MODEL_DIR

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
