"""LoRA on 4-bit routed experts (issue 20 item 4, `train --lora-experts` on quantize's default folder).

The oracle is PEFT itself: its ``lora.ParamWrapper`` (``target_parameters``) on transformers' float32
model of the source in which every 4-bit tensor is replaced by its reference dequantization
(tests/test_load_arch.py), holding the same LoRA weights. Checked on qwen3_moe (a fused 3-D 4-bit
stack) and mixtral (per-expert 4-bit tensors, w1/w3 stacked into gate_up_proj):

- the adapter's tensors are PEFT's (names, shapes, dtypes) and the logits equal the oracle's;
- backward sends gradients to the LoRA tensors only, equal to the oracle's;
- a forward dequantizes only the routed experts, each with its own delta (never PEFT's whole-stack delta);
- `train` → `merge` is exact against PEFT's merge_and_unload, and export-adapter loads in stock PEFT.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_load_arch import dequantized_source_model, quantized_family, rel
from tolerances import FLOAT32_REL

@pytest.fixture(scope="module")
def family_q(tmp_path_factory):
    made: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in made:
            made[family] = quantized_family(family, tmp_path_factory.mktemp(family), tokenizer=True)
        return made[family]

    return get


def lora_config():
    from peft import LoraConfig

    return LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                      lora_dropout=0.0, init_lora_weights=False)


def both_models(family: str, family_q, tmp_path: Path):
    """(PEFT on qconvert's 4-bit model, PEFT on the float32 dequantized model), same LoRA weights."""
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    import qconvert
    from qconvert.model.adapters import module_targets_kept
    from qconvert.nn.experts4bit_lora import peft_sees_4bit_experts

    src, q = family_q(family)
    base = qconvert.load_model(q, device="cpu", backend="reference", dtype=torch.float32)
    torch.manual_seed(0)
    with peft_sees_4bit_experts(base), module_targets_kept():
        ours = get_peft_model(base, lora_config())
    with module_targets_kept():
        ref = get_peft_model(dequantized_source_model(src, q, tmp_path / "ref"), lora_config())
    sd_ours, sd_ref = get_peft_model_state_dict(ours), get_peft_model_state_dict(ref)
    assert {k: (v.shape, v.dtype) for k, v in sd_ours.items()} == {k: (v.shape, v.dtype) for k, v in sd_ref.items()}
    assert any(".experts.base_layer.lora_A" in k for k in sd_ours)  # the nested ParamWrappers, as PEFT names them
    set_peft_model_state_dict(ref, sd_ours)
    return ours, ref


@pytest.mark.slow  # a tiny model built and quantized (the fast guard: the two-layout test below)
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_forward_and_backward_equal_peft_on_dequantized_experts(family, family_q, tmp_path):
    """Before: LoRA on 4-bit experts could not be attached (PEFT matches parameters; --lora-experts refused)."""
    ours, ref = both_models(family, family_q, tmp_path)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    got = ours(input_ids=ids, use_cache=False).logits
    want = ref(input_ids=ids, use_cache=False).logits
    with torch.no_grad(), ours.disable_adapter():
        bare = ours(input_ids=ids, use_cache=False).logits
    assert rel(want, bare) > 100 * FLOAT32_REL  # the expert adapters change the output
    assert rel(got, want) < FLOAT32_REL, rel(got, want)
    got.square().mean().backward()
    want.square().mean().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)  # only LoRA tensors get gradients
    assert any(".experts." in n for n in grads)
    ref_grads = dict(ref.named_parameters())
    for n, g in grads.items():
        assert rel(g, ref_grads[n].grad) < FLOAT32_REL, (n, rel(g, ref_grads[n].grad))
    assert all(not b.requires_grad for b in ours.buffers())


@pytest.mark.slow
def test_only_routed_experts_are_built(family_q, tmp_path, monkeypatch):
    """One token: each 4-bit stack dequantizes top_k of its experts, one at a time, each with its own
    delta; PEFT's whole-stack delta (get_delta_factors / get_delta_weight) is never built."""
    from peft.tuners.lora.layer import ParamWrapper

    from qconvert.nn.experts4bit import Experts4bitWeight

    ours, _ = both_models("qwen3_moe", family_q, tmp_path)
    built: dict[int, list[tuple[int, tuple]]] = {}
    expert = Experts4bitWeight.expert

    def spy(self, e, dtype=None, delta=None):
        value = expert(self, e, dtype, delta)
        built.setdefault(id(self), []).append((e, tuple(value.shape), delta is not None))
        return value

    def whole(*a, **k):
        raise AssertionError("the whole stack's delta was built")

    monkeypatch.setattr(Experts4bitWeight, "expert", spy)
    monkeypatch.setattr(ParamWrapper, "get_delta_factors", whole)
    ours(input_ids=torch.tensor([[5]]), use_cache=False).logits.sum().backward()
    cfg = ours.config
    stacks = [m for m in ours.modules() if isinstance(m, Experts4bitWeight)]
    assert len(built) == len(stacks) == 2 * cfg.num_hidden_layers
    for w in stacks:
        calls = built[id(w)]
        assert {e for e, _, _ in calls} and len({e for e, _, _ in calls}) == cfg.num_experts_per_tok < cfg.num_experts
        assert all(shape == tuple(w.shape[1:]) and with_delta for _, shape, with_delta in calls)


class _Experts(torch.nn.Module):
    """A minimal experts module: ``w`` [E, out, in] (or [E, in, out] with ``is_transposed``), and a
    forward that reads one expert at a time, as transformers' eager experts forwards do."""

    def __init__(self, w: torch.Tensor, transposed: bool):
        super().__init__()
        self.is_transposed = transposed
        self.w = torch.nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([x[e] @ self.w[e] if self.is_transposed else x[e] @ self.w[e].t() for e in range(x.shape[0])])


@pytest.mark.parametrize("transposed", [False, True])
def test_wrapper_equals_peft_param_wrapper_in_both_layouts(transposed):
    """ParamWrapper4bit on a 4-bit stack equals PEFT's ParamWrapper on the stack's dequantized value, in
    output and in lora_A/lora_B gradients, for [E, out, in] and for is_transposed [E, in, out] storage."""
    from peft import LoraConfig, get_peft_model

    from qconvert.nn.experts4bit import Experts4bitWeight
    from qconvert.nn.experts4bit_lora import ParamWrapper4bit, peft_sees_4bit_experts
    from qconvert.quant.reference import dequantize_4bit_ref, quantize_4bit_ref

    g = torch.Generator().manual_seed(0)
    qt = quantize_4bit_ref(torch.randn(3, 8, 16, generator=g))
    cfg = LoraConfig(r=2, lora_alpha=3, target_parameters=["0.w"], init_lora_weights=False)
    ref = get_peft_model(torch.nn.Sequential(_Experts(dequantize_4bit_ref(qt, torch.float32), transposed)), cfg)
    base = _Experts(torch.zeros(3, 8, 16), transposed)
    del base._parameters["w"]
    base.add_module("w", Experts4bitWeight.from_fused(qt, "reference", torch.float32))
    model = torch.nn.Sequential(base)
    with peft_sees_4bit_experts(model):
        ours = get_peft_model(model, cfg)
    assert [type(m) for m in ours.modules() if isinstance(m, ParamWrapper4bit)] == [ParamWrapper4bit]
    missing = ours.load_state_dict(ref.state_dict(), strict=False).missing_keys
    assert not [k for k in missing if ".lora_" in k]  # PEFT's names and shapes on both
    x = torch.randn(3, 5, 8 if transposed else 16, generator=g)
    got, want = ours(x), ref(x)
    with torch.no_grad(), ref.disable_adapter():
        assert rel(want, ref(x)) > 100 * FLOAT32_REL
    assert rel(got, want) < FLOAT32_REL
    got.square().sum().backward()
    want.square().sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    assert len(grads) == 2 and all(rel(g, dict(ref.named_parameters())[n].grad) < FLOAT32_REL for n, g in grads.items())
    from qconvert.errors import OptionError

    with pytest.raises(OptionError, match="cannot be merged into the 4-bit stack"):  # PEFT's merge would write into the 4-bit stack
        ours.merge_and_unload()
