#!/usr/bin/env bash
# with_slurm.sh CMD [ARGS...]
#
# Run CMD against a throw-away single-node SLURM cluster, then tear it down.
#
# * Installs Debian's slurm-wlm and munge when missing (root + apt-get needed).
# * Starts munged, slurmctld and slurmd (no cgroups, no accounting; state, spool, logs and pid
#   files in a temporary folder) and exports SLURM_CONF and LOGNAME for CMD.
# * One node (this machine, its real CPUs and 80% of its memory) with two fake GPUs as GRES
#   (character devices; a job asking for --gres=gpu:1 gets CUDA_VISIBLE_DEVICES=0), in two
#   partitions: "cpu" (the default) and "gpu".
# * On exit, even after a failure or Ctrl-C: cancels the cluster's jobs, kills what is left of
#   their processes (by the PIDs `scontrol listpids` reports), then stops slurmd, slurmctld and
#   munged by the PIDs recorded when they were started. Exit code = CMD's exit code.
#
# Where the packages cannot be installed (not root, no apt-get, apt failure) it prints why, sets
# CG3D_SLURM_SKIP to that reason and still runs CMD, so that `pytest -m slurm` reports the
# cluster tests as skipped with the reason (tests that need no cluster still run).
#
# Measured on the CI machine (Debian 12, 2 cores): cluster up in ~2 s with the packages present.
set -euo pipefail
t0=$(date +%s.%N)
log() { echo "[with_slurm] $*" >&2; }
elapsed() { awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
[ $# -gt 0 ] || { echo "usage: $0 CMD [ARGS...]" >&2; exit 64; }

skip() {  # run CMD without a cluster; the slurm tests skip themselves with this reason
  log "SKIP: $1; running the command without a SLURM cluster"
  export CG3D_SLURM_SKIP="$1"
  shift
  exec "$@"
}

install_packages() {  # prints nothing on success; returns non-zero with a reason on stderr
  [ "$(id -u)" = 0 ] || { echo "not root: cannot apt-get install slurm-wlm munge" >&2; return 1; }
  command -v apt-get >/dev/null || { echo "no apt-get: install slurm-wlm and munge by hand" >&2; return 1; }
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; } 2>&1 \
    | tail -3 >&2
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "apt-get install slurm-wlm munge failed" >&2
    return 1
  fi
}

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  reason=$(install_packages 2>&1 >/dev/null) || skip "SLURM packages unavailable (${reason##*$'\n'})" "$@"
fi
[ "$(id -u)" = 0 ] || skip "not root: slurmd and munged must start as root" "$@"

SL=$(mktemp -d /tmp/ci-slurm.XXXXXX)
mkdir -p "$SL"/{state,spool,log,dev}
chmod 0755 "$SL"
H=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) * 8 / 10 / 1024 ))
# Fake GPUs: Slurm hands out character devices; /dev/null's numbers will do.
mknod "$SL/dev/fakegpu0" c 1 3
mknod "$SL/dev/fakegpu1" c 1 3
printf 'AutoDetect=off\nName=gpu File=%s/dev/fakegpu[0-1]\n' "$SL" >"$SL/gres.conf"
cat >"$SL/slurm.conf" <<CONF
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it starts again (default 120).
AuthInfo=cred_expire=5
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
# Start dependent jobs as soon as their dependency ends (CI runs many tiny jobs).
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1,default_queue_depth=1000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
MinJobAge=600
KillWait=5
StateSaveLocation=$SL/state
SlurmdSpoolDir=$SL/spool
SlurmctldPidFile=$SL/slurmctld.pid
SlurmdPidFile=$SL/slurmd.pid
SlurmctldLogFile=$SL/log/slurmctld.log
SlurmdLogFile=$SL/log/slurmd.log
NodeName=$H NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:2 State=UNKNOWN
PartitionName=cpu Nodes=$H Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$H MaxTime=INFINITE State=UP
CONF
export SLURM_CONF="$SL/slurm.conf"
export LOGNAME="${LOGNAME:-$(id -un)}"  # nipype's SLURM plugin reads os.environ["LOGNAME"]
if [ ! -s /etc/munge/munge.key ]; then   # the deb's postinst normally creates it
  mungekey --create --keyfile=/etc/munge/munge.key --force
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
install -d -o munge -g munge -m 0755 /run/munge /var/lib/munge /var/log/munge

PIDS=()
stop_all() {
  local rc=$? jobs pids p
  trap - EXIT INT TERM
  if [ ${#PIDS[@]} -ge 2 ]; then  # slurmctld is up: cancel the cluster's jobs first
    jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || jobs=""
    if [ -n "${jobs// /}" ]; then
      log "cancelling jobs left in the queue: $jobs"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for _ in $(seq 40); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.25; done
    fi
    pids=$(scontrol listpids 2>/dev/null | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {print $1}' | tr '\n' ' ') || pids=""
    for p in $pids; do kill -KILL "$p" 2>/dev/null || true; done
  fi
  for (( i=${#PIDS[@]}-1; i>=0; i-- )); do kill "${PIDS[$i]}" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  if [ "$rc" = 0 ]; then
    rm -rf -- "$SL"
    log "stopped PIDs ${PIDS[*]:-none}; total $(elapsed) s"
  else
    log "stopped PIDs ${PIDS[*]:-none}; exit $rc; logs kept in $SL/log; total $(elapsed) s"
  fi
  exit "$rc"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged --foreground \
  >"$SL/log/munged.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [ -S /run/munge/munge.socket.2 ] && break; sleep 0.1; done
munge -n | unmunge >/dev/null
/usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$SL/log/slurmctld.out" 2>&1 &
PIDS+=($!)
/usr/sbin/slurmd -D -f "$SLURM_CONF" >"$SL/log/slurmd.out" 2>&1 &
PIDS+=($!)
for _ in $(seq 60); do
  [ "$(sinfo -h -n "$H" -p cpu -o %T 2>/dev/null)" = idle ] && break
  sleep 0.25
done
if [ "$(sinfo -h -n "$H" -p cpu -o %T 2>/dev/null)" != idle ]; then
  log "node $H is not idle:"; sinfo -N -l >&2 || true; tail -n 20 "$SL"/log/*.log >&2 || true
  exit 1
fi
log "cluster up in $(elapsed) s (munged, slurmctld, slurmd: PIDs ${PIDS[*]}; SLURM_CONF=$SLURM_CONF)"
export CG3D_SLURM_UP_SECONDS
CG3D_SLURM_UP_SECONDS=$(elapsed)
set +e
"$@"
