#!/usr/bin/env bash
# A real single-node Slurm (Debian's slurmctld + slurmd + munge) on localhost, for tests and CI.
#
#   slurm/local/cluster.sh install        # apt packages (root; idempotent, skips when present)
#   slurm/local/cluster.sh start DIR      # config + state under DIR; prints `export SLURM_CONF=...`
#   slurm/local/cluster.sh stop DIR       # stops slurmd, slurmctld and munged by PID
#
# No systemd, no cgroups (proctrack/linuxproc, task/none), accounting off, job completion
# records in DIR/log/jobcomp.txt (read them with `sacct -c`). EnforcePartLimits=ALL makes a
# job that can never fit fail at submission instead of pending forever. A requeued job may start
# again cred_expire (10 s) after its requeue; sched_interval=1 starts it then, not at the main
# scheduler's next pass (every 60 s by default: a preempted job's test would wait ~45 s more).
set -euo pipefail

cmd=${1:?usage: cluster.sh install|start DIR|stop DIR}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local dir=$1 cpus mem
    cpus=$(getconf _NPROCESSORS_ONLN)  # not nproc: it honours OMP_NUM_THREADS
    # RealMemory must not exceed what slurmd detects, or the node drains.
    mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
    cat > "$dir/etc/slurm.conf" <<CONF
ClusterName=megaopsd-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1
DependencyParameters=kill_invalid_depend
EnforcePartLimits=ALL
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=30
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/log/jobcomp.txt
NodeName=localhost CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE OverSubscribe=NO State=UP
CONF
}

start() {
    local dir
    dir=$(realpath -m "${1:?start needs a state directory}")
    mkdir -p "$dir"/{etc,state,spool,log}
    write_conf "$dir"
    export SLURM_CONF=$dir/etc/slurm.conf
    install -d -o munge -g munge -m 0755 /run/munge
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        [ -f /etc/munge/munge.key ] || mungekey -c
        chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
        runuser -u munge -- /usr/sbin/munged
    fi
    /usr/sbin/slurmctld -D -f "$SLURM_CONF" >"$dir/log/ctld.out" 2>&1 &
    echo $! >"$dir/ctld.pid"
    /usr/sbin/slurmd -D -N localhost -f "$SLURM_CONF" >"$dir/log/slurmd.out" 2>&1 &
    echo $! >"$dir/slurmd.pid.own"
    for _ in $(seq 150); do
        [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; return 0; }
        sleep 0.2
    done
    echo "slurm did not become idle; logs in $dir/log" >&2
    return 1
}

stop() {
    local dir pid
    dir=$(realpath -m "${1:?stop needs the state directory}")
    for f in "$dir/slurmd.pid.own" "$dir/ctld.pid"; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        rm -f "$f"
    done
}

case $cmd in
    install) install_packages ;;
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) echo "unknown command $cmd; use install, start or stop" >&2; exit 2 ;;
esac
