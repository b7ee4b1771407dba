"""Typed options through the workflows (issue 22): eval's data options are train's declarations
(qconvert.training.settings), not copies; quantize's settings travel as one frozen QuantizeOptions."""

from __future__ import annotations

import pytest


def _option(command, name):
    [p] = [p for p in command.params if p.name == name]
    return p


@pytest.mark.parametrize("name", ["data", "data_split", "data_config", "fmt", "max_length", "truncation", "train_on_inputs"])
def test_eval_takes_trains_data_options_as_train_declares_them(name):
    """Same spellings (aliases included), default, type and choices: one declaration, two commands.
    Before, eval re-declared them by hand (no --max-seq-length, its own help for --data-split...)."""
    from qconvert.cli.runtime import eval_cmd
    from qconvert.cli.train import train

    ours, theirs = _option(eval_cmd, name), _option(train, name)
    assert ours.opts == theirs.opts and ours.secondary_opts == theirs.secondary_opts
    assert ours.default == theirs.default and ours.is_flag == theirs.is_flag
    extra = ("raw",) if name == "fmt" else ()  # eval's own addition: score prompts as written, not in the adapter's format
    assert tuple(getattr(ours.type, "choices", None) or ()) == (*(getattr(theirs.type, "choices", None) or ()), *extra)
    assert ours.type.name == theirs.type.name
    assert ours.required == (name == "data")


@pytest.mark.slow
def test_quantize_takes_one_frozen_options_object(tmp_path):
    """QuantizeOptions carries a run's settings whole (frozen); the keywords give the very same bytes;
    an unknown keyword is a TypeError, as before."""
    import dataclasses

    import torch

    from helpers import make_tiny_llama
    from qconvert.convert.options import QuantizeOptions
    from qconvert.convert.quantize import quantize_checkpoint

    src = make_tiny_llama(tmp_path / "src", dtype=torch.float32, layers=1)
    opts = QuantizeOptions(blocksize=128, double_quant=False, compute_dtype="float32", skip_modules=["v_proj"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.blocksize = 64
    a = quantize_checkpoint(str(src), tmp_path / "a", opts)
    b = quantize_checkpoint(str(src), tmp_path / "b", blocksize=128, double_quant=False, compute_dtype="float32", skip_modules=["v_proj"])
    c = quantize_checkpoint(str(src), tmp_path / "c", dataclasses.replace(opts, blocksize=64), double_quant=True)
    assert (a["blocksize"], a["double_quant"], a["user_skip_modules"]) == (128, False, ["v_proj"]) and a["quantized"] == b["quantized"]
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (c["blocksize"], c["double_quant"]) == (64, True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'block_size'"):
        quantize_checkpoint(str(src), tmp_path / "d", block_size=128)


def test_make_plan_takes_the_quantize_options_whole(tmp_path):
    """make_plan reads blocksize, double quant, the skip list and the shard limit from one QuantizeOptions
    (before: five keywords copied out of it by quantize and verify); the dry run plans the same."""
    import math

    import torch

    from helpers import make_tiny_llama
    from qconvert.convert.options import QuantizeOptions
    from qconvert.convert.plan import make_plan, quantized_size
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.io.checkpoint import Checkpoint

    src = make_tiny_llama(tmp_path / "src", dtype=torch.float32, layers=1)
    opts = QuantizeOptions(blocksize=128, double_quant=False, skip_modules=["v_proj"], max_shard_size="20KB")
    plan = make_plan(Checkpoint(src), opts)
    linears = {i.source_key: i.quantize for i in plan.items if i.source_key.endswith("_proj.weight")}
    assert len(linears) == 7 and [k for k, q in linears.items() if not q] == ["model.layers.0.self_attn.v_proj.weight"]
    assert all(i.out_bytes == quantized_size(math.prod(i.shape), 128, False) for i in plan.items if i.quantize)
    assert len(plan.shards) > 1 and all(len(s) == 1 or sum(plan.items[i].out_bytes for i in s) <= 20_000 for s in plan.shards)
    dry = quantize_checkpoint(str(src), tmp_path / "out", opts, dry_run=True)
    assert dry["shards"] == plan.summary()["shards"] and dry["quantized"] == 6
