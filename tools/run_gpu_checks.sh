#!/usr/bin/env bash
# On a CUDA machine (no network needed): run the GPU correctness tests and the kernel benchmark.
# bitsandbytes is not always installed there: carry its manylinux wheel in .whl/ and install it first:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export TRITON_INTERPRET=0
python3 -m pytest -q tests/test_kernels.py tests/test_loader.py -x
python3 tools/bench_kernels.py
python3 tools/bench_quantize_kernel.py --device cuda
# FSDP-QLoRA on the visible GPUs: every mode runs with bitsandbytes' paged 8-bit AdamW over the shards,
# then DDP / FSDP / FSDP+offload on a 1-8B-shaped random model (memory per device, step time)
python3 tools/bench_fsdp.py --device cuda --tiny --optim paged_adamw_8bit --json /tmp/bench_fsdp_tiny.json
python3 tools/bench_fsdp.py --device cuda --json bench_fsdp.json
