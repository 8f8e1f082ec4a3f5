#!/usr/bin/env bash
# Generate one SegSwap dataset with a SLURM job array, no Ray cluster needed.
#
#   sbatch --array=0-49 docs/slurm_array.sh            # 50 tasks, each a contiguous slice of the shards
#
# Every task runs `segswap-gen` in-process (--no-ray) on its slice (--task-index/--num-tasks) into
# the same --out folder on a shared filesystem. Shards are seeded from [seed, shard_id], so the
# dataset is byte-identical to a single-machine run with the same settings. A task that is killed or
# preempted can simply be resubmitted: finished shards are verified and kept, the rest redone.
# After the array, one small job rebuilds index.json and manifest.json from all parts:
#
#   sbatch --dependency=afterok:<array job id> --wrap "segswap-shards index $OUT && segswap-shards verify $OUT -q"
#
# With --segments unsupervised, extract the segments once before the array, so the tasks do not all
# compute them (an empty shard range does only the preparation):
#
#   segswap-gen --config gen.yaml --shard-range 0:0 --workers 4
#
#SBATCH --job-name=segswap-gen
#SBATCH --cpus-per-task=1
#SBATCH --mem=4G
#SBATCH --time=04:00:00
#SBATCH --output=logs/segswap-gen-%A_%a.log
set -euo pipefail

OUT=${OUT:-data/coco-pairs}
CONFIG=${CONFIG:-gen.yaml}        # segments, images, annotations, num_shards, pairs_per_shard, seed, style...
NUM_TASKS=${SLURM_ARRAY_TASK_COUNT:?run this script with sbatch --array}
# Arrays may start at any index (--array=1-50): count from the first one.
TASK=$(( ${SLURM_ARRAY_TASK_ID:?run this script with sbatch --array} - ${SLURM_ARRAY_TASK_MIN:-0} ))

# Logs are lines, not progress bars, when stderr is a file.
segswap-gen --config "$CONFIG" --out "$OUT" --no-ray \
    --task-index "$TASK" --num-tasks "$NUM_TASKS"
