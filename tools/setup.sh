#!/usr/bin/env bash
# Create .venv with qconvert and everything it needs, on a fresh machine (package registries only).
# torch is installed first and pinned: on these machines `pip install torch==2.13.0` takes a local CPU
# wheel, while an unpinned torch requirement would pull gigabytes of CUDA packages.
#   bash tools/setup.sh          # runtime + test dependencies
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -c tools/constraints.txt torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
# llama-cpp-python (a test dependency: export-gguf's tests run llama.cpp) builds llama.cpp from source
# with cmake and the C++ compiler: minutes on 2 cores
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2}
.venv/bin/python -m pip install -q -c tools/constraints.txt -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# the compiled CPU kernels (qconvert/ops/native/nf4.c), built now with the system C compiler into the
# user's cache; without a compiler (or if the build fails) qconvert runs its torch path: never fatal
.venv/bin/python -m qconvert.ops.native || echo "qconvert: the CPU kernels were not built; the torch path will run"
.venv/bin/python -c "import torch, qconvert; assert torch.__version__.startswith('2.13.0'), torch.__version__; print('qconvert', qconvert.__version__, 'ready in .venv (torch', torch.__version__ + ')')"
