# Shared settings for the harness scripts (sourced, not run).
# VP_CACHE keeps heavy builds (Go binaries, jars, Rust targets) between runs on one machine.
VP_CACHE="${VP_CACHE:-$HOME/.cache/vectorpipe}"
# VP_RUN holds the state of one test run: logs, pids, ports, kubeconfig.
VP_RUN="${VP_RUN:-${TMPDIR:-/tmp}/vectorpipe-harness}"
mkdir -p "$VP_CACHE"
log() { printf '[harness %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
