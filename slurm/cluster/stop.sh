#!/usr/bin/env bash
# Stop the cluster slurm/cluster/start.sh started, by the pids in its state folder (state and config are kept).
set -uo pipefail

DIR=${MULTITUNE_SLURM_DIR:-/tmp/multitune-slurm}
stop() {  # stop NAME PIDFILE: TERM, wait up to 15 s, then KILL
  local name=$1 pidfile=$2 pid
  [ -s "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
  kill -TERM "$pid"
  for _ in $(seq 75); do kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }; sleep 0.2; done
  echo "warning: $name (pid $pid) ignored SIGTERM for 15 s; killing it" >&2
  kill -KILL "$pid" 2>/dev/null
  rm -f "$pidfile"
}
stop slurmd "$DIR/run/slurmd.pid"
stop slurmctld "$DIR/run/slurmctld.pid"
stop slurmdbd "$DIR/run/slurmdbd.pid"
stop mariadbd "$DIR/run/mysqld.pid"
stop munged "$DIR/munge/munged.pid"
