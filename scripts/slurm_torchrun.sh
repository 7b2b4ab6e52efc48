#!/bin/bash
# Multi-node launcher for Slurm: one torchrun per node, c10d rendezvous on the first node.
#
#   sbatch --nodes=2 --gpus-per-node=8 scripts/slurm_torchrun.sh --config configs/resnet50_lrr_imagenet.yaml [--section.key=value ...]
#
# Submit from the repository root (or set REPO_DIR).  Everything after the script name is
# passed to harness.py unchanged.  srun starts ONE task per node; each task is a torchrun
# that starts one worker per GPU of its node and joins the others through c10d rendezvous
# on the first node of the allocation.  The workers read RANK / LOCAL_RANK / WORLD_SIZE
# from torchrun (utils/core/distributed.py), never Slurm's variables, so do not run
# `srun python harness.py` with several tasks: every task would be a separate 1-process run.
#
# Settings (environment variables, all optional):
#   NPROC_PER_NODE   workers per node (default: the GPUs Slurm gives each node; required
#                    on CPU-only nodes, e.g. NPROC_PER_NODE=4 -> gloo, training.device=cpu)
#   RDZV_PORT        rendezvous TCP port on the first node (default: 29500 + job id % 1000,
#                    so two jobs sharing a node do not collide)
#   REPO_DIR         repository root (default: the directory sbatch was called from)
#   TORCHRUN         torchrun executable (default: $REPO_DIR/.venv/bin/torchrun)
#   PYTHON           python that reads the config to place the log (default: beside TORCHRUN)
#   TORCHRUN_ARGS    extra torchrun flags, e.g. "--max_restarts=3" (a restarted job resumes
#                    from the last checkpoint)
#   SRUN_ARGS        extra srun flags, e.g. "--export=ALL,NCCL_SOCKET_IFNAME=ib0"
# Results: experiment.base_dir must be on a filesystem every node sees; only global rank 0
# writes, and c10d decides which node hosts rank 0.
# Log: <experiment.base_dir>/logs/<experiment.name>-<job id>.out, beside the experiment (as a
# sweep's logs are).  Until the config is read (or when it cannot be) Slurm's own
# slurm-<job id>.out in the submit directory; that file is removed once it is left empty.
#
# The #SBATCH values below are EXAMPLES: adapt them to your cluster and job (nodes, GPUs and
# CPUs per node, partition, account, time), here or on the sbatch command line (flags given
# there win over these lines).
#SBATCH --job-name=prune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --output=slurm-%j.out
set -euo pipefail

die() { echo "slurm_torchrun.sh: $*" >&2; exit 2; }

[[ -n "${SLURM_JOB_ID:-}" && -n "${SLURM_NNODES:-}" && -n "${SLURM_JOB_NODELIST:-}" ]] \
    || die "not inside a Slurm allocation (SLURM_JOB_ID / SLURM_NNODES / SLURM_JOB_NODELIST unset); submit with sbatch"
[[ $# -gt 0 ]] || die "usage: sbatch [--nodes=N --gpus-per-node=G] scripts/slurm_torchrun.sh --config FILE.yaml [--section.key=value ...]"

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -f "$REPO_DIR/harness.py" ]] || die "$REPO_DIR has no harness.py; submit from the repository root or set REPO_DIR"
cd "$REPO_DIR"
TORCHRUN=${TORCHRUN:-$REPO_DIR/.venv/bin/torchrun}
PYTHON=${PYTHON:-$(dirname "$TORCHRUN")/python}

# Workers per node: NPROC_PER_NODE, else the GPUs Slurm allocated per node
# (SLURM_GPUS_ON_NODE; SLURM_GPUS_PER_NODE may read "a100:8"), else what nvidia-smi lists.
gpus_per_node() {
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
        echo "$SLURM_GPUS_ON_NODE"
    elif [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
        echo "${SLURM_GPUS_PER_NODE##*:}"
    elif command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; then
        nvidia-smi -L | grep -c '^GPU '
    else
        echo 0
    fi
}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpus_per_node)}
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] \
    || die "no GPUs found per node (got '$NPROC_PER_NODE'); ask for --gpus-per-node, or set NPROC_PER_NODE for CPU nodes"

# The first node of the allocation hosts the c10d store; every torchrun connects to it.
# (awk reads the whole list: `head -n 1` would close the pipe early, and under pipefail
# scontrol's SIGPIPE would end the script.)
RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')
[[ -n "$RDZV_HOST" ]] || die "could not read the first host of '$SLURM_JOB_NODELIST' with scontrol"
RDZV_PORT=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}

# The log goes beside the experiment: the config (with its overrides) says where that is.  A
# config that cannot be read keeps the log in Slurm's own file, where the harness says what is
# wrong with it.  (Everything refused above is said there too.)
LOG=""
if EXPERIMENT_LOGS=$("$PYTHON" -c '
import sys
import harness_params
config = harness_params.load_config(sys.argv[1:])
print(config["experiment.base_dir"] + "/logs/" + config["experiment.name"])
' "$@" 2> /dev/null) && [[ -n "$EXPERIMENT_LOGS" ]] && mkdir -p "$(dirname "$EXPERIMENT_LOGS")"; then
    LOG="$EXPERIMENT_LOGS-$SLURM_JOB_ID.out"
    SLURM_OUT=$(scontrol show job -o "$SLURM_JOB_ID" 2> /dev/null | tr ' ' '\n' | awk -F= '$1 == "StdOut" {print $2}')
    exec >> "$LOG" 2>&1
    if [[ -n "$SLURM_OUT" && "$SLURM_OUT" != "$LOG" && -f "$SLURM_OUT" && ! -s "$SLURM_OUT" ]]; then
        rm -f "$SLURM_OUT"  # nothing was said before the log moved: no file left where sbatch ran
    fi
fi

echo "slurm_torchrun.sh: job $SLURM_JOB_ID, $SLURM_NNODES nodes x $NPROC_PER_NODE workers, rendezvous $RDZV_HOST:$RDZV_PORT${LOG:+, log $LOG}" >&2

# --cpus-per-task again: srun no longer inherits it from sbatch (Slurm >= 22.05), and without
# it each node's torchrun and all its workers would share one core.  GPUs: a step gets all of
# the job's GPUs on its node by default.  --kill-on-bad-exit: one failed node ends the job.
# shellcheck disable=SC2086  # SRUN_ARGS / TORCHRUN_ARGS are lists of flags, split on purpose
exec srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} \
    ${SRUN_ARGS:-} \
    "$TORCHRUN" \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$RDZV_HOST:$RDZV_PORT" \
    --rdzv_id="$SLURM_JOB_ID" \
    ${TORCHRUN_ARGS:-} \
    harness.py "$@"
