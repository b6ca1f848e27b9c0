#!/usr/bin/env bash
# down.sh - stop the local Slurm cluster started by slurm/local/up.sh, each
# daemon by the PID in its pid file (no pkill/killall). Packages stay installed.
# Safe to run when nothing (or only part of it) is running. Run as root:
#
#   sudo bash slurm/local/down.sh           # cancel jobs, stop daemons; keep state, logs, DB
#   sudo bash slurm/local/down.sh --purge   # also delete Slurm state, logs and the accounting DB
#
# munged and MariaDB are stopped only if up.sh started them (a workstation may
# run its own).
set -uo pipefail
PURGE=0
case "${1:-}" in
  --purge) PURGE=1 ;;
  "") ;;
  *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "down.sh: must run as root (sudo bash $0)" >&2; exit 1; }
NODES=(node1 node2 node3 node4)
OWNED=/run/deepscaler-slurm-local
T_START=${EPOCHREALTIME/./}
log() { local d=$(( ${EPOCHREALTIME/./} - T_START )); printf '[down %3d.%01ds] %s\n' $((d/1000000)) $((d%1000000/100000)) "$*"; }

# running = the pid names a live, non-zombie process: PID 1 may reap orphans
# lazily, and kill -0 succeeds on a zombie.
live_pid() { [ -r "/proc/$1/stat" ] && ! awk '{exit $3!="Z"}' "/proc/$1/stat" 2>/dev/null; }
alive() { [ -s "$1" ] && live_pid "$(cat "$1")"; }
stop_pidfile() {
  local pf=$1 name=$2 pid i
  if ! alive "$pf"; then rm -f "$pf"; return 0; fi
  pid=$(cat "$pf"); kill "$pid" 2>/dev/null
  for i in $(seq 1 150); do live_pid "$pid" || { log "stopped $name ($pid)"; rm -f "$pf"; return 0; }; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null; log "killed -9 $name ($pid)"; rm -f "$pf"
}
mariadb_up() { alive /run/mysqld/mysqld.pid; }

# 1. cancel every job so that slurmstepd processes exit cleanly
if alive /run/slurmctld.pid; then
  ids=$(timeout 10 squeue -h -o '%A' 2>/dev/null | sort -u)
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null
    for i in $(seq 1 100); do [ -z "$(timeout 10 squeue -h -t R,CG -o %A 2>/dev/null)" ] && break; sleep 0.2; done
    log "cancelled jobs: $(echo $ids)"
  fi
fi

# 2. slurm daemons, then accounting, then munge
for n in "${NODES[@]}"; do stop_pidfile "/run/slurmd-$n.pid" "slurmd $n"; done
stop_pidfile /run/slurmctld.pid slurmctld
stop_pidfile /run/slurmdbd.pid slurmdbd

if [ "$PURGE" = 1 ] && [ -x /etc/init.d/mariadb ]; then
  # Drop the job records even if MariaDB is down: job ids restart at 1 after a
  # purge, and stale records would then answer sacct for the new jobs.
  if ! mariadb_up; then /etc/init.d/mariadb start >/dev/null 2>&1 && touch "$OWNED/mariadb" 2>/dev/null; fi
  if mariadb_up && mysql -e "DROP DATABASE IF EXISTS slurm_acct_db;"; then log "dropped slurm_acct_db"; fi
fi
if [ -e "$OWNED/mariadb" ] && mariadb_up; then
  /etc/init.d/mariadb stop >/dev/null && log "stopped mariadb"
fi
rm -f "$OWNED/mariadb"
if [ -e "$OWNED/munged" ]; then stop_pidfile /run/munge/munged.pid munged; fi
rm -f "$OWNED/munged"

if [ "$PURGE" = 1 ]; then
  rm -rf /var/spool/slurmctld /var/spool/slurmd /var/log/slurm/*
  log "purged slurm state and logs"
fi
log "down"
