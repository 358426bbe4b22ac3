#!/usr/bin/env bash
# The checks that need a CUDA GPU (tests marked `gpu`: the vLLM engine on CUDA, its NCCL weight sync and sleep), on a
# machine with one GPU, in a few minutes: `bash tests/gpu_checks.sh` from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
make install
.venv/bin/python -m pytest -q -rs -m gpu tests/test_gpu.py "$@"
