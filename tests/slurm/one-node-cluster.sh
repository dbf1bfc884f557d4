#!/usr/bin/env bash
# A throwaway one-node Slurm cluster for tests: munged, slurmctld and slurmd run as root with every file (key,
# sockets, state, logs) under DIR, on ports of their own, so nothing of the machine's own configuration is used.
#   one-node-cluster.sh start DIR   # prints nothing; then: export SLURM_CONF=DIR/slurm.conf
#   one-node-cluster.sh stop DIR    # cancels every job, stops the daemons (safe to call twice)
set -euo pipefail
cmd="${1:?start|stop}"
dir="$(cd "${2:?DIR}" && pwd)"
export SLURM_CONF="$dir/slurm.conf"

stop() {
  if [ -f "$SLURM_CONF" ]; then
    scancel --full --quiet --user=root >/dev/null 2>&1 || true
  fi
  for daemon in slurmd slurmctld munged; do
    if [ -f "$dir/$daemon.pid" ]; then
      kill "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
    fi
  done
  sleep 1
  for daemon in slurmd slurmctld munged; do
    if [ -f "$dir/$daemon.pid" ]; then
      kill -9 "$(cat "$dir/$daemon.pid")" 2>/dev/null || true
      rm -f "$dir/$daemon.pid"
    fi
  done
}

if [ "$cmd" = stop ]; then
  stop
  exit 0
fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

for tool in munged slurmctld slurmd sbatch; do
  command -v "$tool" >/dev/null || { echo "$tool not found (Debian packages munge, slurmctld, slurmd, slurm-client)" >&2; exit 3; }
done
[ "$(id -u)" = 0 ] || { echo "the test cluster's daemons run as root" >&2; exit 3; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
node="$(hostname -s)"
cpus="$(nproc)"
mkdir -p "$dir/state" "$dir/spool" "$dir/munge"
chmod 700 "$dir/munge"
head -c 1024 /dev/urandom > "$dir/munge/munge.key"
chmod 400 "$dir/munge/munge.key"
munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
  --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munge.seed" --force

cat > "$SLURM_CONF" <<CONF
ClusterName=stylediff-test
SlurmctldHost=$node(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobRequeue=1
KillWait=10
MinJobAge=3600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes=$node Default=YES MaxTime=INFINITE State=UP
CONF

slurmctld -c -f "$SLURM_CONF"
slurmd -f "$SLURM_CONF"
for _ in $(seq 1 60); do
  if sinfo --noheader --states=idle --format=%N 2>/dev/null | grep -q .; then
    exit 0
  fi
  sleep 1
done
echo "the test cluster did not come up; its logs:" >&2
tail -n 20 "$dir"/*.log >&2 || true
stop
exit 1
