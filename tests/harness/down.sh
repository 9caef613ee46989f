#!/usr/bin/env bash
# Stops every server up.sh started (TERM, then KILL after 10 s) and, unless KEEP=1, removes the
# run directory. Logs are copied to $VP_RUN.logs first so a failed run can be diagnosed.
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
. "$here/common.sh"

[ -d "$VP_RUN/pid" ] || exit 0
# The real node first: the kubelet (so it restarts nothing), then every container containerd runs.
if [ -f "$VP_RUN/pid/kubelet" ]; then
  pid=$(cat "$VP_RUN/pid/kubelet")
  kill "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$VP_RUN/pid/kubelet"
fi
if [ -f "$VP_RUN/pid/containerd" ] && kill -0 "$(cat "$VP_RUN/pid/containerd")" 2>/dev/null; then
  ctr="ctr --address $VP_RUN/node/containerd.sock -n k8s.io"
  for task in $($ctr tasks ls -q 2>/dev/null); do $ctr tasks kill -s KILL "$task" 2>/dev/null; done
  sleep 1
  for task in $($ctr tasks ls -q 2>/dev/null); do $ctr tasks rm -f "$task" >/dev/null 2>&1; done
  for container in $($ctr containers ls -q 2>/dev/null); do $ctr containers rm "$container" >/dev/null 2>&1; done
fi
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
if [ -d "$VP_RUN/node" ]; then
  # Pod volumes, sandbox shm and container root filesystems, deepest first; then the cgroups
  # the kubelet and containerd made, and the paths they use outside the run directory.
  grep -o " $VP_RUN/node[^ ]*" /proc/self/mountinfo | sort -r | while read -r mount; do
    umount -l "$mount" 2>/dev/null
  done
  for hierarchy in /sys/fs/cgroup/*/; do
    [ -d "${hierarchy}kubepods" ] && find "${hierarchy}kubepods" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  rm -rf /run/containerd /var/lib/kubelet /var/log/containers 2>/dev/null
fi
if [ -d "$VP_RUN/log" ]; then
  rm -rf "$VP_RUN.logs"
  cp -r "$VP_RUN/log" "$VP_RUN.logs"
fi
[ "${KEEP:-0}" = 1 ] || rm -rf "$VP_RUN"
log "harness down (logs kept in $VP_RUN.logs)"
