#!/usr/bin/env bash
# Several nodes, every GPU of each: run this same command on every node (a Slurm step, an MPI-less cluster, two
# cloud VMs). torchrun starts one batchrun process per GPU; each takes the device of its LOCAL_RANK and the ranks
# share the parts through claims in the output directory, so a slow GPU never leaves the others idle.
#   node 0:  NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example examples/torchrun_multinode.sh
#   node 1:  NNODES=2 NODE_RANK=1 MASTER_ADDR=node0.example examples/torchrun_multinode.sh
# On one machine, two "nodes" of one CPU process each (how the test suite checks it):
#   NNODES=2 NODE_RANK=0 NPROC=1 examples/torchrun_multinode.sh & NNODES=2 NODE_RANK=1 NPROC=1 examples/torchrun_multinode.sh
# --max-restarts 3: a process killed mid-part (kill -9, an OOM) restarts the group; committed parts are kept and
# the dead process's claims are taken over. The same job file runs as one process: `batchrun jobs/summarize.yaml`.
set -euo pipefail

JOB=${JOB:-jobs/summarize.yaml}
OUTPUT=${OUTPUT:-outputs/summarize-articles}   # on storage every node sees

exec torchrun \
    --nnodes "${NNODES:-2}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${NPROC:-gpu}" \
    --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
    --max-restarts "${MAX_RESTARTS:-3}" \
    -m pipeline_core run "$JOB" --output "$OUTPUT" --no-progress
