#!/usr/bin/env bash
# Stops every server up.sh started (TERM, then KILL after 10 s) and, unless KEEP=1, removes the
# run directory. Logs are copied to $VP_RUN.logs first so a failed run can be diagnosed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

[ -d "$VP_RUN/pid" ] || exit 0
for pidfile in "$VP_RUN"/pid/*; do
  [ -f "$pidfile" ] || continue
  kill "$(cat "$pidfile")" 2>/dev/null
done
for pidfile in "$VP_RUN"/pid/*; do
  [ -f "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$pidfile"
done
if [ -d "$VP_RUN/log" ]; then
  rm -rf "$VP_RUN.logs"
  cp -r "$VP_RUN/log" "$VP_RUN.logs"
fi
[ "${KEEP:-0}" = 1 ] || rm -rf "$VP_RUN"
log "harness down (logs kept in $VP_RUN.logs)"
