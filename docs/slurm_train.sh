#!/usr/bin/env bash
# Train segswap on several GPUs (one or more nodes) with SLURM and torchrun.
#
#   sbatch docs/slurm_train.sh                                  # 1 node x 4 GPUs
#   sbatch --nodes=2 docs/slurm_train.sh --max-steps 100000     # extra arguments go to segswap-train
#
# One torchrun per node (srun, one task per node) starts one trainer process per GPU; the processes
# find each other through the first node of the allocation (c10d rendezvous). Each process streams
# its own shard order (seeded by the run seed and its rank), the head is synchronised with DDP (nccl),
# and rank 0 owns the run directory. The batch sizes are per process, so 4 GPUs see 4 x (5 + 15)
# pairs per step: lower --lr or --max-steps to taste.
#
# Preemption and time limits: SLURM sends SIGTERM two minutes before the limit (--signal below);
# the trainer saves OUT/last.pth and exits with 128 + 15. Resubmitting the same script resumes
# from it (model, optimiser, lr schedule, step).
#
#SBATCH --job-name=segswap-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --time=48:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=logs/segswap-train-%j.log
set -euo pipefail

SHARDS=${SHARDS:-'/shared/segswap/coco-pairs/train-{000000..001989}.tar'}
VAL_SHARDS=${VAL_SHARDS:-'/shared/segswap/coco-pairs/train-{001990..001999}.tar'}
OUT=${OUT:-runs/coco-transformer}
BACKBONE=${BACKBONE:-moco_v2_800ep_pretrain.pth.tar}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-4}
# DataLoader processes per GPU process: the node's CPUs shared by its GPUs, at most 8.
WORKERS=$(( ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE ))
WORKERS=$(( WORKERS > 8 ? 8 : WORKERS ))
HEAD_NODE=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?submit this script with sbatch}" | sed -n 1p)  # sed reads everything: no SIGPIPE under pipefail

srun torchrun --nnodes "${SLURM_NNODES:-1}" --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "${SLURM_JOB_ID:-0}" --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:29500" \
    -m segswap.train.cli --shards "$SHARDS" --val-shards "$VAL_SHARDS" --out "$OUT" \
    --backbone-weights "$BACKBONE" --device cuda --workers "$WORKERS" --val-every 5000 "$@"
