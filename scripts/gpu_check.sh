#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): fp16 / bf16 training through DeepSpeed, the Triton JVP
# attention kernel against torch.func.jvp (parity, memory, time at N = 1k-16k), xformers against sdpa,
# nccl with one rank (two given two GPUs), step_cost.py on the GPU and the smoke sweep end to end, in at most
# 8 minutes; writes results/bench/gpu_check.json and prints one screen. Without a CUDA GPU it lists every
# check as skipped and exits 0. Extra arguments go to benchmarks/gpu_check.py (e.g. --out FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec timeout 540 .venv/bin/python benchmarks/gpu_check.py "$@"
