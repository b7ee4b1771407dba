"""qconvert.load_model's own arguments, given carelessly: each is an OptionError before any file is
read. The old code took any torch.dtype (torch.int8 and torch.complex64 as compute dtypes were
ignored by the 4-bit layers and the model ran in bfloat16; torch.int32 failed mid-forward) and any
device (a CUDA device the machine lacks: an AssertionError from torch; the meta device:
NotImplementedError after the whole load)."""

from __future__ import annotations

import pytest
import torch

from hostile_util import make_llama_files

from qconvert.errors import OptionError


@pytest.fixture(scope="module")
def q(tmp_path_factory):
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("hostile-api")
    quantize_checkpoint(str(make_llama_files(d / "src")), d / "q")
    return d / "q"


@pytest.mark.parametrize("kw, match", [
    (dict(compute_dtype=torch.int8), "unknown dtype torch.int8"),
    (dict(compute_dtype=torch.complex64), "unknown dtype torch.complex64"),
    (dict(dtype=torch.int32), "unknown dtype torch.int32"),
    (dict(dtype=torch.float8_e4m3fn), "unknown dtype torch.float8_e4m3fn"),
    (dict(device="meta"), "holds no data"),
    (dict(device=f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"), "is not on this machine"),
    (dict(device="bogus"), "unknown device 'bogus'"),
])
def test_load_model_refuses_argument_values_before_reading(q, kw, match):
    import qconvert

    with pytest.raises(OptionError, match=match):
        qconvert.load_model(q, **kw)
    with pytest.raises(OptionError, match=match):  # before any file is read: a folder that does not exist is not looked at
        qconvert.load_model(q.parent / "nowhere", **kw)


def test_the_float_dtypes_as_torch_dtypes_still_load(q):
    import qconvert

    m = qconvert.load_model(q, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        assert m(input_ids=torch.tensor([[1, 2]])).logits.dtype == torch.float32
