import os
import sys
from pathlib import Path

# Under pytest-xdist (tools/test.sh runs `-n 2` on CI's 2 cores) each worker is one process beside
# another: one torch thread each, or the two workers' thread teams fight over the same cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# bitsandbytes wraps some CPU fallbacks in torch.compile, which recompiles for every shape: minutes of
# compile time for no numerical difference on these ops. The tests run them eagerly.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

# Without a GPU, qconvert's Triton kernels run in Triton's interpreter (read when kernels are defined).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(Path(__file__).parent))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny models built once for the whole session (helpers.ModelCache): read them, copy to change."""
    from helpers import ModelCache

    return ModelCache(tmp_path_factory.mktemp("models"))
