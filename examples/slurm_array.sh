#!/usr/bin/env bash
# A Slurm job array: 4 independent tasks, each computing one shard of the job on one GPU.
#   sbatch examples/slurm_array.sh                       (from the repository root, on a shared filesystem)
#   sbatch --export=ALL,JOB=jobs/embed.yaml examples/slurm_array.sh
# Each task reads only its shard's rows (Parquet inputs: only its row groups) and writes its parts into the one
# output directory; whichever task commits the last part writes _SUCCESS. A failed or preempted task is
# resubmitted on its own (`sbatch --array=2 examples/slurm_array.sh`) and resumes from its committed parts.
# The same job file runs unchanged as a single process: `batchrun jobs/summarize.yaml`.
#SBATCH --job-name=batchrun
#SBATCH --array=0-3
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:TERM@120
#SBATCH --output=logs/batchrun-%A_%a.log
set -euo pipefail

JOB=${JOB:-jobs/summarize.yaml}
OUTPUT=${OUTPUT:-outputs/summarize-articles}   # on storage every node sees

# --num-shards auto reads SLURM_ARRAY_TASK_COUNT; --shard-index auto reads SLURM_ARRAY_TASK_ID minus
# SLURM_ARRAY_TASK_MIN, so --array=1-4 works too. exec: Slurm's SIGTERM reaches batchrun, which commits what is
# complete and exits 75.
exec batchrun run "$JOB" --output "$OUTPUT" --num-shards auto --shard-index auto --no-progress
