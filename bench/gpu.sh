#!/usr/bin/env bash
# GPU benchmarks, one command from the repo root on a CUDA machine (no internet needed; nothing is downloaded):
#   bash bench/gpu.sh [--only KEY ...]      → bench/gpu_results.json + the GPU section of BENCHMARKS.md
# Needs the dev install plus flash-attn in the venv. Without internet on the GPU machine, carry wheels over first,
# on a machine with internet and the same Python/CUDA:
#   pip download -d wheels -c constraints.txt torch ".[dev]"   # the CUDA torch build of the pinned version
#   + the flash-attn wheel matching torch/CUDA/Python/C++ ABI, from flash-attn's GitHub releases (pip cannot build it
#     without CUDA); copy wheels/ over, then on the GPU machine:
#   DS_BUILD_OPS=0 pip install --no-index --find-links wheels -c constraints.txt -e ".[dev]" wheels/flash_attn-*.whl
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

fail() { echo "bench/gpu.sh: $*" >&2; exit 2; }
command -v nvidia-smi >/dev/null || fail "nvidia-smi not found: this needs an NVIDIA GPU machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || fail "nvidia-smi sees no GPU"
"$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || fail "torch in $PYTHON has no CUDA (CPU wheel installed?); install the CUDA build of the pinned torch"
"$PYTHON" -c "import flash_attn" 2>/dev/null \
  || fail "flash-attn is not importable from $PYTHON; install its wheel (see the top of this script)"
"$PYTHON" -c "import bitsandbytes, trl, deepspeed" \
  || fail "bitsandbytes/trl/deepspeed missing: pip install -e '.[dev]' (offline: from carried wheels)"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
exec "$PYTHON" -m bench.gpu "$@"
