#!/usr/bin/env bash
# Every "not yet measured" GPU row of bench/RESULTS.md in one run (about 9 minutes on an H100/H200).
#
#   bash bench/gpu_rows.sh [OUT_DIR]          # results: OUT_DIR/results-*-cuda.json (default bench/)
#
# Needs the project's requirements installed (a CUDA torch).  Offline: random full-size weights only.
# Each benchmark has its own time limit, so one that hangs or fails leaves the others' results.
set -u
out="${1:-bench}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
python - <<'PY' || { echo "no CUDA device: nothing to measure" >&2; exit 2; }
import torch, sys
sys.exit(0 if torch.cuda.is_available() else 1)
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# 1. live sliders (issue 12): eager and compiled full render, preview frame, first preview of a drag,
#    change vs repeat, recompiles / CUDA-graph re-records over 100 changes, host syncs in the loop, drags,
#    then fused q/k/v projections against the same compiled pipeline unfused (do they pay?)
timeout 540 python -m bench.bench_live --device cuda --full-size --compile --fuse-qkv --out "$out/results-live-cuda.json" \
  || echo "bench_live: exit $?" >&2
# 2. LoRA files of every layout (issue 10): import, load, merge after a weight change, LoCon vs attention
timeout 150 python -m bench.bench_lora_formats --device cuda --out "$out/results-lora-formats-cuda.json" \
  || echo "bench_lora_formats: exit $?" >&2
ls -l "$out"/results-*-cuda.json 2>/dev/null
