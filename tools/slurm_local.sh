#!/usr/bin/env bash
# A real one-node Slurm on this machine, for tests of the job scripts (needs root).
#   tools/slurm_local.sh start DIR   install slurm-wlm and munge if missing, start munged, slurmctld and slurmd
#                                    with all their state, logs and pid files under DIR, wait until the node is
#                                    idle, then print DIR/slurm.conf (export SLURM_CONF=DIR/slurm.conf to use it)
#   tools/slurm_local.sh stop DIR    stop the daemons started there, by the pids recorded under DIR
# Exit status 3 (one line on stderr) when the packages cannot be installed: callers report a skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
action=${1:-}; dir=${2:-}
if [ -z "$dir" ] || { [ "$action" != start ] && [ "$action" != stop ]; }; then
  echo "usage: $0 start|stop DIR" >&2; exit 2
fi

stop() {
  local pidfile pid
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidfile"
  done
}
if [ "$action" = stop ]; then stop; exit 0; fi

tools/ensure_apt.sh slurmctld=slurm-wlm,munge slurmd=slurm-wlm munged=munge || exit $?
mkdir -p "$dir/munge" "$dir/state" "$dir/spool"
dir=$(cd "$dir" && pwd)
chown munge: "$dir/munge" && chmod 755 "$dir" "$dir/munge"
runuser -u munge -- munged --socket="$dir/munge/munge.socket" --pid-file="$dir/munge/munged.pid" \
  --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munged.seed"

host=$(hostname -s)
memory=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
cat > "$dir/slurm.conf" <<EOF
ClusterName=beadseg
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF=$dir/slurm.conf
slurmctld
slurmd
for _ in $(seq 60); do
  if [ "$(sinfo -h -o %t 2>/dev/null)" = idle ]; then echo "$SLURM_CONF"; exit 0; fi
  sleep 0.5
done
echo "slurm did not come up within 30 s; see $dir/slurmctld.log and $dir/slurmd.log" >&2
stop
exit 1
