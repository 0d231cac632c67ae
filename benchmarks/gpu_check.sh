#!/usr/bin/env bash
# The fine-tuning issue's GPU checks, as one short script for a lent GPU machine:
#   1. a base-size bf16 train step in each fine-tuning mode (full, freeze-vision, cached image tokens,
#      LoRA), ours vs HF and HF+peft (images/s, model FLOPs utilisation, peak memory, the modes' targets)
#   2. the demo's training (tiny preset from scratch on generated shapes) on the GPU
#   3. what backward keeps on CUDA (blip/speed/recompute.py): the same gradients with dropout, and what
#      "elementwise" saves and costs in a base bf16 step
# Usage: bash benchmarks/gpu_check.sh   (PYTHONPATH may point at a copy of pycocoevalcap when pip cannot reach it)
set -euo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/bench_train.py --device cuda --amp bf16 --batch 32 --repeats 10 --modes full freeze-vision cached lora
python3 -m blip.tool.shapes /tmp/shapes
time python3 train.py --data /tmp/shapes --init scratch --preset tiny --epochs 40 --eval-every 250 --device cuda \
    --out /tmp/gpu_demo 2>&1 | grep -v "step/s\|image/s"
tail -n 3 /tmp/gpu_demo/metrics.jsonl | cut -c1-300
python3 benchmarks/check_recompute.py --device cuda
python3 benchmarks/bench_train.py --device cuda --amp bf16 --batch 32 --repeats 10 --recompute elementwise --modes full lora
