#!/usr/bin/env bash
# The captioning issue's GPU check, as one short script for a lent GPU machine: base size, bf16, 1024 photos in
# 8 webdataset tar shards, ours (caption.py --output-dir) against HF's BlipProcessor + generate on the same
# shards, whole processes: pictures/s, peak GPU memory, and how many captions the two sides share.
# Usage: bash benchmarks/gpu_caption.sh   (a few minutes: building the photos and the model takes most of it)
set -euo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/bench_shards.py --device cuda --dtype bf16 --photos 1024 --shards 8 --batch 64 --repeats 2
