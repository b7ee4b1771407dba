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


@pytest.mark.parametrize("qc, shown", [
    ({"quant_method": "gptq", "bits": 4}, "'gptq'"),
    ({"quant_method": "awq", "bits": 4}, "'awq'"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit bitsandbytes"),
    ({"quant_method": "nonsense"}, "'nonsense'"),
])
def test_generate_and_eval_refuse_other_quantizations_in_one_line(tmp_path, capsys, qc, shown):
    """transformers needs optimum, gptqmodel... for these and raised ImportError or AttributeError
    from its loader, reported as a bug in qconvert."""
    import json

    from runtime_helpers import make_word_tokenizer, write_jsonl
    from test_hostile_runtime import refused

    src = make_llama_files(tmp_path / "m", vocab=128)
    make_word_tokenizer(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = qc
    (src / "config.json").write_text(json.dumps(cfg))
    match = f"quantization_config names {shown}, which qconvert does not run"
    refused(capsys, "generate", src, "--prompt", "w1", "--max-new-tokens", 1, match=match)
    refused(capsys, "eval", src, "--data", write_jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2"}]), match=match)


def test_revision_with_a_local_folder_is_refused(q, tmp_path):
    """--revision names a Hub commit, branch or tag: with a local folder it was ignored by load_model,
    generate and eval, which then ran the folder's files as if they were that revision (quantize
    refused it already). Now one SourceError, before the model is built."""
    from qconvert import load_model
    from qconvert.errors import SourceError
    from qconvert.run.inference import load_for_inference

    with pytest.raises(SourceError, match="--revision applies to Hub repo ids, not local folders"):
        load_model(q, revision="v1.0")
    with pytest.raises(SourceError, match="--revision applies to Hub repo ids"):
        load_for_inference(str(q), revision="main")
    assert load_model(q, revision=None) is not None
