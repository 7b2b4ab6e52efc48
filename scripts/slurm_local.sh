#!/bin/bash
# A one-node Slurm cluster on this machine, for the test suite and for trying the Slurm paths
# (utils/launch/sweep.py --launcher slurm, scripts/slurm_torchrun.sh) without a cluster.
#
#   scripts/slurm_local.sh up       # install when missing, configure, start, wait for the node to be idle
#   scripts/slurm_local.sh status   # what runs (exit 0: up and usable, 1: not)
#   scripts/slurm_local.sh down     # stop the daemons this script started (by their pid files)
#
# `up` installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (needs
# root and apt-get), writes a one-node slurm.conf (this host as `hostname -s`, its CPUs and memory
# as `slurmd -C` reports them, one partition `debug`, no accounting, no cgroups) and starts
# munged (as the munge user), slurmctld and slurmd directly: no systemd needed.  It is idempotent:
# what already runs with the same configuration is left alone.  Exit status: 0 up, 1 failed
# (the daemons' log tail is printed), 3 cannot be installed here (one line saying why).
#
# Settings (environment): SLURM_LOCAL_DIR (state, logs, pid files; default /var/lib/slurm-local),
# SLURM_LOCAL_PARTITION (default debug).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-/var/lib/slurm-local}
PARTITION=${SLURM_LOCAL_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$DIR/run/slurmctld.pid
SLURMD_PID=$DIR/run/slurmd.pid
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "slurm_local.sh: $*" >&2; }
die() { say "$*"; exit 1; }
cannot() { say "$*"; exit 3; }

running() {  # running PIDFILE NAME: the pid file names a live process called NAME
    local pid
    [[ -f "$1" ]] || return 1
    pid=$(cat "$1" 2> /dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2> /dev/null)" == "$2" ]]
}

stop() {  # stop PIDFILE NAME: SIGTERM, up to 15 s, then SIGKILL
    local pid i
    running "$1" "$2" || { rm -f "$1"; return 0; }
    pid=$(cat "$1")
    kill -TERM "$pid" 2> /dev/null || true
    for i in $(seq 150); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
        say "$2 (pid $pid) did not stop in 15 s: SIGKILL"
        kill -KILL "$pid" 2> /dev/null || true
    fi
    rm -f "$1"
}

installed() {
    command -v slurmctld > /dev/null && command -v slurmd > /dev/null && command -v sbatch > /dev/null \
        && command -v munged > /dev/null
}

install_packages() {
    installed && return 0
    [[ $(id -u) -eq 0 ]] || cannot "Slurm is not installed and this is not root: cannot apt-get install ${PACKAGES[*]}"
    command -v apt-get > /dev/null || cannot "Slurm is not installed and there is no apt-get here to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    # The packages' own start-up (invoke-rc.d) finds no init system in a container; that is fine,
    # this script starts the daemons itself.
    if ! apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" > "$DIR/apt.log" 2>&1; then
        apt-get update -q >> "$DIR/apt.log" 2>&1 || true
        apt-get install -y -q --no-install-recommends "${PACKAGES[@]}" >> "$DIR/apt.log" 2>&1 \
            || { tail -n 5 "$DIR/apt.log" >&2; die "apt-get install ${PACKAGES[*]} failed (log: $DIR/apt.log)"; }
    fi
    installed || die "installed ${PACKAGES[*]} but slurmctld/slurmd/sbatch/munged are still not on PATH"
}

start_munge() {
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        if command -v mungekey > /dev/null; then
            mungekey --create --keyfile=/etc/munge/munge.key > /dev/null
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if ! running "$MUNGE_PID" munged; then
        runuser -u munge -- /usr/sbin/munged || die "munged did not start (see /var/log/munge/munged.log)"
    fi
    munge -n | unmunge > /dev/null 2>&1 || die "munge does not work (munge -n | unmunge failed)"
}

write_conf() {  # prints "changed" when the file was (re)written
    local host node text
    host=$(hostname -s)
    # slurmd -C: "NodeName=h CPUs=2 Boards=1 SocketsPerBoard=1 CoresPerSocket=1 ThreadsPerCore=2 RealMemory=23000"
    node=$(slurmd -C 2> /dev/null | awk 'NR == 1')
    [[ "$node" == NodeName=* ]] || die "slurmd -C did not describe this node (got: '$node')"
    text="# Written by scripts/slurm_local.sh: a one-node cluster for tests (no accounting, no cgroups).
ClusterName=harnesslocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits this long before it may start again (Slurm's default: 120 s).
AuthInfo=cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# Start a job whose begin time has come (a requeued one) within seconds (defaults: 60 s, 30 s).
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
$node NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP"
    mkdir -p /etc/slurm
    if [[ ! -f "$CONF" ]] || [[ "$(cat "$CONF")" != "$text" ]]; then
        printf '%s\n' "$text" > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
        echo changed
    fi
}

node_state() { sinfo -h -N -o '%T' 2> /dev/null | awk 'NR == 1'; }

up() {
    mkdir -p "$DIR"/{state,spool,log,run}
    install_packages
    start_munge
    if [[ "$(write_conf)" == changed ]]; then  # a new configuration: restart what runs
        stop "$SLURMD_PID" slurmd
        stop "$CTLD_PID" slurmctld
    fi
    if ! running "$CTLD_PID" slurmctld; then
        slurmctld || { tail -n 20 "$DIR/log/slurmctld.log" >&2; die "slurmctld did not start"; }
    fi
    if ! running "$SLURMD_PID" slurmd; then
        slurmd || { tail -n 20 "$DIR/log/slurmd.log" >&2; die "slurmd did not start"; }
    fi
    local state i
    for i in $(seq 120); do  # up to 60 s
        state=$(node_state)
        case "$state" in
            idle|mixed|allocated|completing) say "up: node $(hostname -s) $state (partition $PARTITION)"; return 0 ;;
            down*|drain*|drained*) scontrol update nodename="$(hostname -s)" state=resume > /dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    tail -n 10 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    die "the node did not become idle in 60 s (state: '${state:-none}')"
}

status() {
    local ok=0 pair
    for pair in "$MUNGE_PID munged" "$CTLD_PID slurmctld" "$SLURMD_PID slurmd"; do
        set -- $pair
        if running "$1" "$2"; then echo "$2: running (pid $(cat "$1"))"; else echo "$2: not running"; ok=1; fi
    done
    if [[ $ok -eq 0 ]]; then
        local state
        state=$(node_state)
        echo "node $(hostname -s): ${state:-unknown}"
        [[ "$state" =~ ^(idle|mixed|allocated|completing)$ ]] || ok=1
    fi
    return $ok
}

down() {
    stop "$SLURMD_PID" slurmd
    stop "$CTLD_PID" slurmctld
    stop "$MUNGE_PID" munged
    say "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: scripts/slurm_local.sh up|down|status" >&2; exit 2 ;;
esac
