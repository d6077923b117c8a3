#!/usr/bin/env bash
# Start (installing if missing) a real single-node SLURM cluster: munged, MariaDB on 127.0.0.1, slurmdbd, slurmctld,
# slurmd. Idempotent: daemons already running are kept. Needs root. State, config, logs and pids live under
# $MULTITUNE_SLURM_DIR (default /tmp/multitune-slurm); clients need SLURM_CONF=$MULTITUNE_SLURM_DIR/etc/slurm.conf.
# Prints that SLURM_CONF line on success; on failure one line `error: ...` on stderr and exit 1.
set -euo pipefail

DIR=${MULTITUNE_SLURM_DIR:-/tmp/multitune-slurm}
CLUSTER=multitune
DB_PORT=${MULTITUNE_SLURM_DB_PORT:-23306}
CTLD_PORT=${MULTITUNE_SLURM_PORT:-26817}  # slurmd and slurmdbd take the next two ports
PACKAGES="slurmctld slurmd slurm-client slurmdbd munge mariadb-server"
export SLURM_CONF=$DIR/etc/slurm.conf

fail() { echo "error: slurm cluster: $*" >&2; exit 1; }

# Daemons inherit our open descriptors; a caller's pipe held open by a daemon never reaches EOF (CI would hang).
for fd in /proc/$$/fd/*; do
  fd=${fd##*/}
  if [ "$fd" -gt 2 ] 2>/dev/null; then eval "exec $fd>&-" 2>/dev/null || true; fi
done

[ "$(id -u)" = 0 ] || fail "needs root (daemons run as root, packages install with apt-get)"

missing=""
for cmd in slurmctld slurmd slurmdbd sbatch sacct munged mariadbd; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing="$missing $cmd"
done
if [ -n "$missing" ]; then
  command -v apt-get >/dev/null || fail "missing$missing and no apt-get to install $PACKAGES"
  echo "installing $PACKAGES (missing:$missing)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $PACKAGES; } \
    >"/tmp/multitune-slurm-apt.log" 2>&1 || fail "apt-get install failed, see /tmp/multitune-slurm-apt.log"
fi
export PATH=/usr/sbin:/sbin:$PATH

mkdir -p "$DIR"/{etc,log,run,state/ctld,state/d,munge,mysql}
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll (each try at most 5 s) until COMMAND succeeds
  local limit=$1 what=$2 deadline=$((SECONDS + $1)); shift 2
  until timeout 5 "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || fail "$what not ready after ${limit}s (logs in $DIR/log)"
    sleep 0.2
  done
}
# A daemon runs detached from us: its own session, stdin from /dev/null, output to its log.
detach() { local log=$1; shift; setsid "$@" </dev/null >>"$log" 2>&1 & }

# --- munge: the shared key that authenticates every SLURM message ---------------------------------------------
chown munge:munge "$DIR/munge"; chmod 700 "$DIR/munge"
if [ ! -s "$DIR/munge/munge.key" ]; then
  mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 || fail "mungekey --create failed"
  chown munge:munge "$DIR/munge/munge.key"; chmod 400 "$DIR/munge/munge.key"
fi
# The default socket: slurm 22.05 clients ignore AuthInfo=socket= on their connections to slurmdbd.
MUNGE_SOCKET=/run/munge/munge.socket.2
mkdir -p /run/munge; chown munge:munge /run/munge; chmod 755 /run/munge
if ! alive "$DIR/munge/munged.pid"; then
  runuser -u munge -- munged --key-file="$DIR/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
    </dev/null >>"$DIR/log/munged.out" 2>&1 || fail "munged did not start (see $DIR/munge/munged.log)"
fi
wait_for 10 munged munge --socket="$MUNGE_SOCKET" -n

# --- MariaDB on 127.0.0.1: the accounting store behind sacct (submitit reads job states from sacct) -----------
DB_SOCKET=$DIR/run/mysqld.sock
chown -R mysql:mysql "$DIR/mysql"
if [ ! -d "$DIR/mysql/mysql" ]; then
  mariadb-install-db --datadir="$DIR/mysql" --user=mysql --skip-test-db >"$DIR/log/mariadb-install.log" 2>&1 \
    || fail "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
fi
chown mysql:mysql "$DIR/run"
if ! alive "$DIR/run/mysqld.pid"; then
  detach "$DIR/log/mariadb.log" mariadbd --no-defaults --user=mysql --datadir="$DIR/mysql" --socket="$DB_SOCKET" \
    --pid-file="$DIR/run/mysqld.pid" --bind-address=127.0.0.1 --port="$DB_PORT" --innodb-buffer-pool-size=64M \
    --skip-name-resolve
fi
wait_for 30 MariaDB mariadb --no-defaults --socket="$DB_SOCKET" -e "SELECT 1"
mariadb --no-defaults --socket="$DB_SOCKET" -e "
  CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || fail "could not create the slurm database user"

# --- configuration (rewritten every time: node size from slurmd -C, paths from DIR) ----------------------------
HOST=$(hostname -s)
read -r CPUS SOCKETS CORES THREADS MEM < <(slurmd -C | tr ' ' '\n' | awk -F= '
  /^CPUs=/{c=$2} /^SocketsPerBoard=/{s=$2} /^CoresPerSocket=/{k=$2} /^ThreadsPerCore=/{t=$2} /^RealMemory=/{m=$2}
  END {print c, s, k, t, int(m * 0.9)}')
[ -n "$MEM" ] || fail "could not read the node size from slurmd -C"
cat >"$DIR/etc/slurm.conf.new" <<EOF
# Written by slurm/cluster/start.sh: a single-node cluster for tests.
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$((CTLD_PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Requeued jobs wait cred_expire + 1 s before they may start again (default 120 s).
AuthInfo=cred_expire=5
CredType=cred/munge
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/d
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups in containers: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
# Schedule every second (default 60 s), so a requeued job starts as soon as its begin time passes.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$((CTLD_PORT + 2))
JobRequeue=1
# Refuse at submit a job that asks for more than any partition it names can give (CPUs, nodes, memory, time), as
# production clusters commonly do, instead of queueing it forever (reason PartitionConfig / PartitionNodeLimit).
EnforcePartLimits=ALL
KillWait=30
MinJobAge=60
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS SocketsPerBoard=$SOCKETS CoresPerSocket=$CORES ThreadsPerCore=$THREADS RealMemory=$MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
changed=0
cmp -s "$DIR/etc/slurm.conf.new" "$DIR/etc/slurm.conf" || changed=1
mv "$DIR/etc/slurm.conf.new" "$DIR/etc/slurm.conf"
cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$((CTLD_PORT + 2))
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
chmod 600 "$DIR/etc/slurmdbd.conf"

# --- slurmdbd, then the cluster in the accounting database, then slurmctld and slurmd -------------------------
alive "$DIR/run/slurmdbd.pid" || detach "$DIR/log/slurmdbd.out" slurmdbd
wait_for 30 slurmdbd sacctmgr -n list cluster
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
  sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr add cluster $CLUSTER failed"
fi
if alive "$DIR/run/slurmctld.pid"; then
  # A running controller keeps the configuration it started with until told to reread it.
  [ "$changed" = 0 ] || scontrol reconfigure >/dev/null 2>&1 || fail "scontrol reconfigure failed (see $DIR/log)"
else
  detach "$DIR/log/slurmctld.out" slurmctld
fi
wait_for 30 slurmctld scontrol ping
alive "$DIR/run/slurmd.pid" || detach "$DIR/log/slurmd.out" slurmd
wait_for 30 "node $HOST" sh -c "sinfo -h -N -o %t -n '$HOST' | grep -Eq '^(idle|mix|alloc)\$'"
echo "SLURM_CONF=$SLURM_CONF"
