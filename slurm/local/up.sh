#!/usr/bin/env bash
# up.sh - bring up the project's local single-host Slurm 22.05 cluster (Debian
# packages) without systemd: munged, MariaDB + slurmdbd (for sacct), slurmctld,
# and four slurmd processes serving logical nodes node1..node4, each with two
# fake GPUs; an account, deepscaler-test, for the tests to charge. Installs the
# packages when missing. Idempotent: re-running leaves running daemons alone
# unless the configuration changed, and adds the account only if missing. Run
# as root:
#
#   sudo bash slurm/local/up.sh        # then: sinfo, sbatch, sacct, ...
#   sudo bash slurm/local/down.sh      # stop it (--purge: also state, logs, DB)
#
#   SLURM_LOCAL_WAIT=60    seconds to wait for the nodes and sacct (default 60)
#   SLURM_LOCAL_FORCE=1    overwrite an /etc/slurm/slurm.conf not written by up.sh
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WAIT_S=${SLURM_LOCAL_WAIT:-60}
NODES=(node1 node2 node3 node4)
TEST_ACCOUNT=deepscaler-test        # tests/slurm_cluster.py's TEST_ACCOUNT
MARK='# deepscaler slurm/local: managed by slurm/local/up.sh'
OWNED=/run/deepscaler-slurm-local   # which shared daemons up.sh started (down.sh stops only those)
T_START=${EPOCHREALTIME/./}          # microseconds (bash >= 5)
log() { local d=$(( ${EPOCHREALTIME/./} - T_START )); printf '[up %3d.%01ds] %s\n' $((d/1000000)) $((d%1000000/100000)) "$*"; }
die() { echo "up.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (sudo bash $0)"

# --- 1. packages ----------------------------------------------------------------
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "apt-get not found: this script needs Debian 12 (or a derivative with Slurm 22.05)"
  log "installing: ${missing[*]}"
  # Never let package scripts start daemons (no init system here, or a
  # workstation's systemd that should not own these daemons).
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1
  fi
  rc=0
  { apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } || rc=$?
  [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  [ "$rc" = 0 ] || die "apt-get failed (exit $rc)"
  log "packages installed"
else
  log "packages already installed"
fi

# --- 2. configuration -------------------------------------------------------------
if [ -e /etc/slurm/slurm.conf ] && ! head -n1 /etc/slurm/slurm.conf | grep -qF "$MARK" \
   && [ "${SLURM_LOCAL_FORCE:-0}" != 1 ]; then
  die "/etc/slurm/slurm.conf was not written by up.sh (another cluster's config?); move it away or set SLURM_LOCAL_FORCE=1"
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm "$OWNED"
for n in "${NODES[@]}"; do mkdir -p "/var/spool/slurmd/$n"; done
# fake GPUs: gres/gpu needs one character device per GPU (File= is mandatory,
# regular files are rejected); c 1 3 is /dev/null's device number.
for i in 0 1 2 3 4 5 6 7; do
  [ -c "/var/spool/slurmd/fakegpu$i" ] || mknod -m 666 "/var/spool/slurmd/fakegpu$i" c 1 3
done

tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cp "$HERE/slurm.conf" "$tmp/slurm.conf"
cat > "$tmp/gres.conf" <<'EOF'
NodeName=node1 Name=gpu File=/var/spool/slurmd/fakegpu[0-1]
NodeName=node2 Name=gpu File=/var/spool/slurmd/fakegpu[2-3]
NodeName=node3 Name=gpu File=/var/spool/slurmd/fakegpu[4-5]
NodeName=node4 Name=gpu File=/var/spool/slurmd/fakegpu[6-7]
EOF
cat > "$tmp/slurmdbd.conf" <<'EOF'
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
PidFile=/run/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=slurmdbpass
StorageLoc=slurm_acct_db
EOF
changed=0
for f in slurm.conf gres.conf slurmdbd.conf; do
  if ! cmp -s "$tmp/$f" "/etc/slurm/$f"; then install -m 0644 "$tmp/$f" "/etc/slurm/$f"; changed=1; fi
done
chmod 600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses a world-readable file

# --- helpers ------------------------------------------------------------------------
# running = the pid names a live, non-zombie process: PID 1 may reap orphans
# lazily, and kill -0 succeeds on a zombie.
live_pid() { [ -r "/proc/$1/stat" ] && ! awk '{exit $3!="Z"}' "/proc/$1/stat" 2>/dev/null; }
alive() { [ -s "$1" ] && live_pid "$(cat "$1")"; }
stop_pidfile() {   # stop one daemon by its pid file
  local pf=$1 pid i
  alive "$pf" || return 0
  pid=$(cat "$pf"); kill "$pid" 2>/dev/null || true
  for i in $(seq 1 100); do live_pid "$pid" || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
wait_port() {      # wait until something listens on 127.0.0.1:$1
  local i
  for i in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  die "nothing listening on port $1 (see /var/log/slurm/)"
}

if [ "$changed" = 1 ]; then
  # new configuration: restart the slurm daemons that may be running
  for n in "${NODES[@]}"; do stop_pidfile "/run/slurmd-$n.pid"; done
  stop_pidfile /run/slurmctld.pid
  stop_pidfile /run/slurmdbd.pid
  log "configuration written to /etc/slurm"
fi

# --- 3. munge -----------------------------------------------------------------------
if [ ! -s /etc/munge/munge.key ]; then
  runuser -u munge -- /usr/sbin/mungekey --create
fi
if ! alive /run/munge/munged.pid; then
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$OWNED/munged"
  log "munged started (pid $(cat /run/munge/munged.pid))"
fi
munge -n | unmunge >/dev/null || die "munge does not work"

# --- 4. MariaDB + slurmdbd -------------------------------------------------------------
if ! alive /run/mysqld/mysqld.pid; then
  /etc/init.d/mariadb start >/dev/null      # the package's own sysv script
  touch "$OWNED/mariadb"
  log "mariadb started (pid $(cat /run/mysqld/mysqld.pid))"
fi
mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurmdbpass';
          GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
if ! alive /run/slurmdbd.pid; then
  /usr/sbin/slurmdbd
  wait_port 6819
  log "slurmdbd started (pid $(cat /run/slurmdbd.pid))"
fi

# --- 5. slurmctld + slurmd ----------------------------------------------------------------
if ! alive /run/slurmctld.pid; then
  /usr/sbin/slurmctld          # registers the cluster in slurmdbd by itself
  wait_port 6817
  log "slurmctld started (pid $(cat /run/slurmctld.pid))"
fi
for n in "${NODES[@]}"; do
  if ! alive "/run/slurmd-$n.pid"; then
    /usr/sbin/slurmd -N "$n"
    wait_port "$(sed -n "s/^NodeName=$n .*Port=\([0-9]*\).*/\1/p" /etc/slurm/slurm.conf)"
    for i in $(seq 1 50); do [ -s "/run/slurmd-$n.pid" ] && break; sleep 0.1; done
    log "slurmd $n started (pid $(cat "/run/slurmd-$n.pid"))"
  fi
done

# --- 6. wait until every node is usable and sacct answers ------------------------------------
deadline=$(( $(date +%s) + WAIT_S )); resumed=0
while :; do
  states=$(sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
  bad=$(sinfo -h -N -o '%N %t' 2>/dev/null | awk '$2 !~ /^(idle|mix|alloc|comp)$/' || true)
  [ -n "$states" ] && [ -z "$bad" ] && break
  if [ "$resumed" = 0 ] && echo "$bad" | grep -qE 'down|drain|drng|fail'; then
    scontrol update nodename="$(IFS=,; echo "${NODES[*]}")" state=resume 2>/dev/null || true
    resumed=1
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    sinfo -N -l >&2 || true; die "nodes not ready after ${WAIT_S}s (see /var/log/slurm/)"
  fi
  sleep 0.2
done
until sacct -n -X -o JobID -S now >/dev/null 2>&1; do
  if [ "$(date +%s)" -ge "$deadline" ]; then
    sacct -n -X -o JobID -S now >&2 || true; die "sacct not answering after ${WAIT_S}s (see /var/log/slurm/slurmdbd.log)"
  fi
  sleep 0.2
done

# --- 7. the tests' account ------------------------------------------------------------------
# A job may charge it (--account=deepscaler-test): the site-file test does. Without
# AccountingStorageEnforce Slurm takes an account it does not know and records the user's
# default one (root) instead, silently. For root, and for the user who ran `sudo` (who runs
# the tests on a workstation); a user's existing default account stays. slurmctld registers the
# cluster in slurmdbd soon after it starts: an account needs that cluster.
until [ "$(sacctmgr -n -P show cluster localcluster format=Cluster 2>/dev/null)" = localcluster ]; do
  [ "$(date +%s)" -lt "$deadline" ] || die "cluster 'localcluster' not registered in slurmdbd after ${WAIT_S}s"
  sleep 0.2
done
users=(root)
[ -n "${SUDO_USER:-}" ] && [ "$SUDO_USER" != root ] && users+=("$SUDO_USER")
if [ -z "$(sacctmgr -n -P show account names="$TEST_ACCOUNT" format=Account)" ]; then
  sacctmgr -i add account "$TEST_ACCOUNT" description="deepscaler tests" organization=deepscaler >/dev/null
  log "account $TEST_ACCOUNT added"
fi
for u in "${users[@]}"; do
  if [ -z "$(sacctmgr -n -P show associations accounts="$TEST_ACCOUNT" users="$u" format=User)" ]; then
    sacctmgr -i add user "$u" account="$TEST_ACCOUNT" >/dev/null
    log "user $u may charge account $TEST_ACCOUNT"
  fi
done
log "cluster ready: $(sinfo -h -N -o '%N=%t' | tr '\n' ' ')partition $(sinfo -h -o %P | tr '\n' ' ')sacct ok, account $TEST_ACCOUNT"
