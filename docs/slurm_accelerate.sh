#!/bin/bash
# sbatch docs/slurm_accelerate.sh sft configs/full.yaml [key.path=value ...]
#
# One cai training stage (sft, rm or rl) on several nodes of a Slurm cluster: one `accelerate launch`
# per node (srun, one task per node), each starting one process per GPU. accelerate needs to know, on
# every node, how many machines there are, which one it is (--machine_rank: Slurm's SLURM_NODEID) and
# where the main process listens (--main_process_ip: the first node of the allocation). Any launch
# config of configs/accelerate/ works; FSDP is the default here. See docs/scale.md.
#
# Every node must see the same output_dir (a shared file system): the main process writes the stage's
# folder and the others read the earlier stages' outputs from it.
#SBATCH --job-name=cai
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
#SBATCH --output=cai-%x-%j.out

set -euo pipefail
STAGE=${1:?usage: sbatch docs/slurm_accelerate.sh STAGE CONFIG [overrides]}
CONFIG=${2:?usage: sbatch docs/slurm_accelerate.sh STAGE CONFIG [overrides]}
shift 2
LAUNCH_CONFIG=${LAUNCH_CONFIG:-configs/accelerate/fsdp.yaml}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}

# sed reads the whole list (head would close the pipe early and, under pipefail, fail the job on SIGPIPE)
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
MAIN_PORT=${MAIN_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false

# Single quotes: SLURM_NODEID is read on each node, not here.
srun --kill-on-bad-exit=1 bash -c 'accelerate launch \
    --config_file "$0" \
    --num_machines "$1" --num_processes "$2" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$3" --main_process_port "$4" \
    --rdzv_backend static \
    -m cai "$5" "$6" "${@:7}"' \
    "$LAUNCH_CONFIG" "$SLURM_NNODES" "$NUM_PROCESSES" "$MAIN_HOST" "$MAIN_PORT" "$STAGE" "$CONFIG" "$@"
