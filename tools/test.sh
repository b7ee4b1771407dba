#!/usr/bin/env bash
# Set everything up on a fresh machine, lint, and run the whole test-suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
if [ -f tools/setup_olah.sh ]; then
  bash tools/setup_olah.sh          # the loopback Hub server the download tests talk to
  export QCONVERT_REQUIRE_OLAH=1    # so those tests fail, rather than skip, if it is missing
fi
export QCONVERT_REQUIRE_GGUF=1      # export-gguf's tests fail, rather than skip, without llama.cpp
export PYTHONUNBUFFERED=1
# lint first: ruff (pyproject [tool.ruff]) and the layering contracts (pyproject [tool.importlinter])
.venv/bin/ruff check qconvert tools tests
.venv/bin/lint-imports
# the guide in docs/ (mkdocs.yml): a broken link, anchor or page left out of the nav fails the build
.venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
# every test, in two pytest-xdist workers (one torch thread each, tests/conftest.py): CI has 2 cores and
# most of the suite is single-threaded Python and subprocesses. Whole files go to one worker (their
# module fixtures are built once). The fast loop is `bash tools/test.sh -m "not slow"` (tests/README.md).
exec .venv/bin/python -m pytest -q -n "${QCONVERT_TEST_WORKERS:-2}" --dist loadfile "$@"
