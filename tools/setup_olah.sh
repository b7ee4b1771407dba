#!/usr/bin/env bash
# Install olah (a Hub-compatible server that serves local git repos offline) into its own virtual
# environment, .venv-olah/. The Hub download tests start it on a loopback port (tests/olah_server.py).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-olah/bin/olah-cli ]; then
  python3 -m venv .venv-olah
  .venv-olah/bin/python -m pip install -q --disable-pip-version-check "olah==0.5.4" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv-olah/bin/python -c "import olah" && echo "olah ready in .venv-olah"
