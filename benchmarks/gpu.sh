#!/usr/bin/env bash
# issue 30's GPU figures in one JSON file, for the day a GPU is lent: on one GPU with PyTorch, transformers[serving]
# and batchrun installed (and vllm, to measure it too), in under 8 minutes, nothing downloaded:
#   - generation in process against `transformers serve --continuous-batching` started by batchrun (and vLLM where
#     `import vllm` works), on a random decoder of Qwen2-0.5B's shape in bf16, 128 new tokens a row (fixed: the
#     minimum is the maximum), greedy; rows/s, completion tokens/s, ratios;
#   - batchrun's overhead as a client against a minimal aiohttp client, on one URL-given server;
#   - embedding and classification on a random MiniLM-shaped BERT against the pipeline and the limit loop.
# Everything is benchmarks/server.py; this script only picks the sizes.
#
#   benchmarks/gpu.sh [OUT.json]                          # default: gpu-results.json
#   BATCHRUN_GPU_DRY=1 benchmarks/gpu.sh OUT.json         # or --dry-run: the CPU, tiny sizes, every path but vLLM's,
#                                                         # all at once (tests/test_benchmark_scripts.py runs it)
# PYTHON names the interpreter (default: python).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
dry="${BATCHRUN_GPU_DRY:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then
  dry=1
  shift
fi
out="${1:-gpu-results.json}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

runs=in-process,serve-cb
if [[ "$dry" == 1 ]]; then
  # one server start is most of a dry run on a small CPU: --overlap runs the sections side by side
  sizes=(--shape tiny --device cpu --dtype auto --rows 8 --new-tokens 4 --max-words 30 --concurrency 4
         --overhead-rounds 1 --encoder-shape tiny --encoder-rows 16 --overlap)
else
  if ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu.sh: torch sees no CUDA device (BATCHRUN_GPU_DRY=1 runs the CPU dry run)" >&2
    exit 2
  fi
  if "$python" -c "import vllm" 2>/dev/null; then
    runs+=,vllm
  fi
  # about 65k new tokens a run; the time goes mostly to server starts (two or three) and the in-process run
  sizes=(--shape qwen2-0.5b --device cuda --dtype bfloat16 --rows 512 --new-tokens 128 --concurrency 64
         --overhead-rounds 2 --encoder-shape minilm --encoder-rows 10000)
fi
exec "$python" "$root/benchmarks/server.py" --runs "$runs" --encoders "${sizes[@]}" --out "$out"
