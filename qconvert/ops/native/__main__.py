"""``python -m qconvert.ops.native``: build the compiled CPU kernels now (tools/setup.sh runs it) and
print one line on the outcome. Exits 0 either way: without a compiler qconvert runs the torch path."""

from __future__ import annotations

from .build import describe

if __name__ == "__main__":
    print("qconvert CPU kernels:", describe())
