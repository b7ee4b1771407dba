"""FP8 (DeepSeek-V3 style, block-scaled) and MXFP4 (gpt-oss) sources: `qconvert quantize` reads them
as transformers dequantizes them and writes the same bytes as transformers + bitsandbytes on that
dequantized model; any other quantized source is refused by name.

The sources are built here the way the releases store them: a random bf16 model, its linear weights
cut into blocks, each block scaled by amax / (the FP8 maximum) and stored as float8 with float32
``weight_scale_inv`` (one per block, partial blocks at ragged edges), or its experts packed as
E2M1 codes (low nibble first) with an E8M0 exponent per 32 values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import bnb_quantize_save, make_tiny_llama, run_cli_here as run_cli, whole_error
from test_convert import tensors
from safetensors.torch import load_file, save_file

from qconvert.convert.plan import make_plan
from qconvert.convert.quantize import quantize_checkpoint
from qconvert.errors import FormatError, SourceError
from qconvert.io.checkpoint import Checkpoint
from qconvert.quant.source_dequant import dequantize_fp8, dequantize_mxfp4

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


# ------------------------------------------------------------------------------ building sources
def fp8_blocks(w: torch.Tensor, block: tuple[int, int], fmt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [rows, cols] as float8 ``fmt`` and float32 scales [ceil(rows/br), ceil(cols/bc)]."""
    rows, cols = w.shape
    br, bc = block
    grid = (-(-rows // br), -(-cols // bc))
    padded = torch.zeros(grid[0] * br, grid[1] * bc)
    padded[:rows, :cols] = w.float()
    amax = padded.reshape(grid[0], br, grid[1], bc).abs().amax(dim=(1, 3))
    scale = amax.clamp_min(1e-12) / torch.finfo(fmt).max
    full = scale.repeat_interleave(br, 0)[:rows].repeat_interleave(bc, 1)[:, :cols]
    return (w.float() / full).to(fmt), scale


def mxfp4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [experts, out, in] as MXFP4 blocks [experts, out, in/32, 16] and E8M0 scales."""
    e, o, i = w.shape
    b = w.float().reshape(e, o, i // 32, 32)
    exponent = torch.floor(torch.log2(b.abs().amax(-1).clamp_min(2.0**-120))) - 2  # 6 = 1.5 * 2**2 is E2M1's largest
    codes = ((b / torch.exp2(exponent)[..., None])[..., None] - E2M1).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def make_fp8_source(tmp: Path, *, hidden: int, intermediate: int, fmt=torch.float8_e4m3fn, block=(128, 128),
                    activation_scales: bool = False) -> Path:
    """A tiny Llama stored as an FP8 release: every projection float8 + weight_scale_inv, the rest bf16."""
    plain = make_tiny_llama(tmp / "bf16", hidden=hidden, intermediate=intermediate, heads=4, kv_heads=2)
    out = tmp / "fp8"
    out.mkdir()
    sd = {}
    for k, v in load_file(str(plain / "model.safetensors")).items():
        if k.endswith("_proj.weight"):
            sd[k], sd[k + "_scale_inv"] = fp8_blocks(v, block, fmt)
            if activation_scales:
                sd[k.removesuffix("weight") + "activation_scale"] = torch.tensor([0.5])
        else:
            sd[k] = v
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((plain / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static" if activation_scales else "dynamic",
                                  "fmt": "e4m3" if fmt == torch.float8_e4m3fn else "e5m2", "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def make_mxfp4_source(tmp: Path) -> Path:
    """A tiny gpt-oss stored as its release is: experts as *_blocks / *_scales, the rest bf16."""
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
                       layer_types=["sliding_attention", "full_attention"])
    model = GptOssForCausalLM(cfg).to(torch.bfloat16)
    sd = {}
    for k, v in model.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # held [E, in, out], stored [E, out, in/32, 16]
            sd[k + "_blocks"], sd[k + "_scales"] = mxfp4_pack(v.transpose(1, 2))
        else:
            sd[k] = v.contiguous()
    out = tmp / "mxfp4"
    out.mkdir()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    c = cfg.to_dict() | {"dtype": "bfloat16", "architectures": ["GptOssForCausalLM"]}
    c["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                                   "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(c))
    return out


def save_16bit(src: Path, out: Path, state: dict[str, torch.Tensor]) -> Path:
    """``state`` as a plain checkpoint with ``src``'s config.json less its quantization_config."""
    out.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    del cfg["quantization_config"]
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def transformers_dequantized(src: Path, out: Path, qconfig) -> Path:
    """The model transformers dequantizes on load (on CPU), saved as a plain 16-bit checkpoint (its own
    save_pretrained would quantize the weights back to FP8)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=qconfig, device_map="cpu")
    return save_16bit(src, out, {k: v.detach() for k, v in model.state_dict().items()})


def assert_verify_sees_the_dequantized_source(ours: Path, src: Path, deq: Path) -> None:
    """`verify --against` an FP8/MXFP4 source measures against transformers' dequantized values: the
    same report as against the dequantized 16-bit checkpoint itself."""
    from qconvert.convert.verify import verify_checkpoint

    a, b = verify_checkpoint(ours, against=str(src))["error"], verify_checkpoint(ours, against=str(deq))["error"]
    assert a["unquantized_identical"] and a["tensors"] == b["tensors"]


def assert_same_output(ours: Path, anchor: Path) -> None:
    a, b = tensors(ours), tensors(anchor)
    assert a.keys() == b.keys(), a.keys() ^ b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cfg, acfg = (json.loads((d / "config.json").read_text()) for d in (ours, anchor))
    assert cfg["quantization_config"] == acfg["quantization_config"]  # the bitsandbytes one, nothing of the source's
    assert cfg["dtype"] == acfg["dtype"]


# ------------------------------------------------------------------------------ the dequantizers
@pytest.mark.slow  # imports transformers' integration modules / starts the CLI
def test_fp8_dequant_equals_transformers_functions():
    """Bit for bit: transformers' load-time FP8 dequantizer where it reads the weight (sides that are
    multiples of the block), its backward-pass one (declared block, partial edges) on ragged sides."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    torch.manual_seed(0)
    for fmt in (torch.float8_e4m3fn, torch.float8_e5m2):
        w, s = (torch.randn(3, 256, 384) * 40).to(fmt), torch.rand(3, 2, 3) / 100
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            want = torch.stack([Fp8Dequantize(None)._dequantize_one(w[i], s[i], output_dtype=dtype) for i in range(3)])
            assert torch.equal(dequantize_fp8(w, s, (128, 128), dtype), want)
        w, s = (torch.randn(200, 300) * 40).to(fmt), torch.rand(2, 5) / 100  # block 128 x 64, ragged both ways
        want = _dequantize_fp8_weight(w, s, [128, 64], torch.float32).to(torch.bfloat16)  # float32 product, one rounding
        assert torch.equal(dequantize_fp8(w, s, (128, 64), torch.bfloat16), want)


@pytest.mark.slow  # imports transformers' integration modules / starts the CLI
def test_mxfp4_dequant_equals_transformers():
    """Bit for bit with transformers' gpt-oss dequantizer, every code and exponent (inf/nan included)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    torch.manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8)
    scales = torch.randint(0, 256, (3, 40, 4), dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float32):
        ours, theirs = dequantize_mxfp4(blocks, scales, dtype), convert_moe_packed_tensors(blocks, scales, dtype=dtype)
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert ours.shape == (3, 128, 40) and torch.equal(ours.view(bits), theirs.view(bits))


def test_fp8_scale_shape_checked():
    w = torch.zeros(200, 300).to(torch.float8_e4m3fn)
    with pytest.raises(FormatError, match=r"expected \(2, 3\)"):
        dequantize_fp8(w, torch.ones(2, 2), (128, 128), torch.bfloat16)


# ------------------------------------------------------------------------------ end to end
@pytest.mark.slow
@pytest.mark.parametrize("fmt, block", [(torch.float8_e4m3fn, (128, 128)), (torch.float8_e5m2, (64, 128))])
def test_fp8_source_byte_identical_with_transformers_bitsandbytes(tmp_path, fmt, block):
    """Sides multiples of the block, where transformers dequantizes on CPU: qconvert's output equals
    transformers + bitsandbytes quantize-on-load + save_pretrained of transformers' dequantized model."""
    from transformers import FineGrainedFP8Config

    src = make_fp8_source(tmp_path, hidden=256, intermediate=384, fmt=fmt, block=block)
    anchor = bnb_quantize_save(transformers_dequantized(src, tmp_path / "deq", FineGrainedFP8Config(dequantize=True)), tmp_path / "anchor")
    plan = quantize_checkpoint(str(src), tmp_path / "plan", dry_run=True, experts="16bit")
    assert plan["source_scheme"]["quant_method"] == "fp8" and plan["source_scheme"]["weight_block_size"] == list(block)
    assert plan["source_scheme"]["dequantized_tensors"] == 14 and plan["source_scheme"]["dequantized_to"] == "bfloat16"
    s = quantize_checkpoint(str(src), tmp_path / "ours", experts="16bit")  # routed experts as transformers + bitsandbytes leaves them
    assert s["source_scheme"] == plan["source_scheme"] and s["quantized"] == 14
    assert_same_output(tmp_path / "ours", anchor)
    assert_verify_sees_the_dequantized_source(tmp_path / "ours", src, tmp_path / "deq")


@pytest.mark.slow
def test_fp8_ragged_edges_and_activation_scales(tmp_path):
    """Sides that are not multiples of 128 (partial edge blocks): transformers 5.23's loader refuses
    them, so the oracle is the bf16 model built with transformers' own _dequantize_fp8_weight (declared
    block, float32 product), through transformers + bitsandbytes. Static activation scales are not written."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    src = make_fp8_source(tmp_path, hidden=192, intermediate=200, activation_scales=True)  # k/v: 96 rows
    stored = load_file(str(src / "model.safetensors"))
    deq = {k: _dequantize_fp8_weight(v, stored[k + "_scale_inv"], [128, 128], torch.float32).to(torch.bfloat16)
           if k + "_scale_inv" in stored else v for k, v in stored.items() if not k.endswith(("_scale_inv", "activation_scale"))}
    assert stored["model.layers.0.mlp.up_proj.weight_scale_inv"].shape == (2, 2)
    anchor = bnb_quantize_save(save_16bit(src, tmp_path / "deq", deq), tmp_path / "anchor")
    s = quantize_checkpoint(str(src), tmp_path / "ours", experts="16bit")  # routed experts as transformers + bitsandbytes leaves them
    assert_same_output(tmp_path / "ours", anchor)
    dropped = {d["tensor"]: d["reason"] for d in s["dropped"]}
    assert sorted(dropped) == sorted(k for k in stored if k.endswith("activation_scale")) and len(dropped) == 14
    assert all("activation scale" in r for r in dropped.values())


@pytest.mark.slow
def test_mxfp4_source_byte_identical_with_transformers_bitsandbytes(tmp_path):
    from transformers import Mxfp4Config

    src = make_mxfp4_source(tmp_path)
    anchor = bnb_quantize_save(transformers_dequantized(src, tmp_path / "deq", Mxfp4Config(dequantize=True)), tmp_path / "anchor")
    s = quantize_checkpoint(str(src), tmp_path / "ours", experts="16bit")  # routed experts as transformers + bitsandbytes leaves them
    assert s["source_scheme"]["quant_method"] == "mxfp4" and s["source_scheme"]["dequantized_tensors"] == 4
    assert_same_output(tmp_path / "ours", anchor)
    assert tensors(tmp_path / "ours")["model.layers.1.mlp.experts.down_proj"].shape == (4, 96, 64)
    assert_verify_sees_the_dequantized_source(tmp_path / "ours", src, tmp_path / "deq")
    # quantize's default, 4-bit experts: the MXFP4 source gives the bytes of transformers' dequantized bf16 model
    quantize_checkpoint(str(src), tmp_path / "ours4")
    quantize_checkpoint(str(tmp_path / "deq"), tmp_path / "deq4")
    ours4, deq4 = tensors(tmp_path / "ours4"), tensors(tmp_path / "deq4")
    assert "model.layers.1.mlp.experts.down_proj.absmax" in ours4 and ours4.keys() == deq4.keys()
    assert all(torch.equal(ours4[k], deq4[k]) for k in ours4)


# ------------------------------------------------------------------------------ refusals
def _quantized_source(tmp: Path, qc: dict, extra: dict | None = None) -> Path:
    tmp.mkdir()
    save_file({"model.layers.0.mlp.down_proj.qweight": torch.zeros(8, 8, dtype=torch.int32), **(extra or {})},
              str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "quantization_config": qc}))
    return tmp


@pytest.mark.slow  # imports transformers' integration modules / starts the CLI
def test_unknown_scheme_refused_by_name_in_one_line(tmp_path):
    src = _quantized_source(tmp_path / "gptq", {"quant_method": "gptq", "bits": 4})
    r = run_cli("quantize", src, tmp_path / "out", "--dry-run", ok=False)
    lines = r.stderr.splitlines()
    first = whole_error(lines[0], lines[1:])
    assert r.returncode == 1 and first.startswith("qconvert: error: ") and "'gptq'" in first, r.stderr
    # one message and its hint (its first line continued below when the temporary path makes it long)
    assert lines[-1].startswith("hint: ") and len(lines) == (2 if first == lines[0] else 3) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("qc, says", [
    ({"quant_method": "awq", "bits": 4}, "'awq'"),
    ({"quant_method": "compressed-tensors"}, "'compressed-tensors'"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "already a bitsandbytes 4-bit checkpoint"),
    ({"bits": 4}, "quant_method"),
])
def test_other_schemes_refused(tmp_path, qc, says):
    with pytest.raises(SourceError, match=says):
        make_plan(Checkpoint(_quantized_source(tmp_path / "src", qc)))


def test_fp8_weight_without_scale_refused(tmp_path):
    src = _quantized_source(tmp_path / "src", {"quant_method": "fp8", "weight_block_size": [128, 128]},
                            {"model.layers.0.mlp.up_proj.weight": torch.zeros(8, 8).to(torch.float8_e4m3fn)})
    with pytest.raises(FormatError, match="up_proj.weight' has no 'model.layers.0.mlp.up_proj.weight_scale_inv'"):
        make_plan(Checkpoint(src))


def make_deepseek_fp8_source(tmp: Path) -> Path:
    """A tiny DeepSeek-V3 stored as its FP8 release is: every 2-D weight of the layers float8 with block
    scales (ragged: kv_a_proj_with_mqa has 160 rows), bar the router; per-expert tensors; the fp32
    e_score_correction_bias."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    cfg = DeepseekV3Config(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=4, n_shared_experts=1,
                           num_experts_per_tok=2, n_group=1, topk_group=1, num_hidden_layers=2, first_k_dense_replace=1,
                           num_attention_heads=4, num_key_value_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_rope_head_dim=32,
                           qk_nope_head_dim=64, v_head_dim=64, vocab_size=128, max_position_embeddings=64)
    DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp / "bf16")
    stored = {}
    for k, v in load_file(str(tmp / "bf16" / "model.safetensors")).items():
        if k.startswith("model.layers.") and v.dim() == 2 and not k.endswith(("norm.weight", "mlp.gate.weight")):
            stored[k], stored[k + "_scale_inv"] = fp8_blocks(v, (128, 128), torch.float8_e4m3fn)
        else:
            stored[k] = v
    out = tmp / "fp8"
    out.mkdir()
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((tmp / "bf16" / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
    (out / "config.json").write_text(json.dumps(c))
    return out


@pytest.mark.slow
def test_deepseek_v3_fp8_source_byte_identical(tmp_path):
    """The transformers-planned path (per-expert source tensors merged on load, a float32 bias, ragged
    blocks): the same bytes as transformers + bitsandbytes on the bf16 model built with transformers'
    _dequantize_fp8_weight (its loader refuses the 160-row weight)."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    src = make_deepseek_fp8_source(tmp_path)
    stored = load_file(str(src / "model.safetensors"))
    assert stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)
    deq = {k: _dequantize_fp8_weight(v, stored[k + "_scale_inv"], [128, 128], torch.float32).to(torch.bfloat16)
           if k + "_scale_inv" in stored else v for k, v in stored.items() if not k.endswith("_scale_inv")}
    anchor = bnb_quantize_save(save_16bit(src, tmp_path / "deq", deq), tmp_path / "anchor")
    s = quantize_checkpoint(str(src), tmp_path / "ours", experts="16bit")  # routed experts as transformers + bitsandbytes leaves them
    assert s["source_scheme"]["dequantized_tensors"] == sum(k.endswith("_scale_inv") for k in stored)
    assert_same_output(tmp_path / "ours", anchor)


def test_pair_split_over_two_shards_keeps_both_until_read(tmp_path):
    """A weight and its scale in different shards: the scale's shard is let go (deleted, for a Hub
    download) only after the weight that needs it was dequantized, whatever order the writer finishes
    files in; each pair is read only when asked for."""
    from qconvert.convert.sources import DequantizingReader, Scheme

    w = torch.randn(130, 70)
    q, s = fp8_blocks(w, (128, 128), torch.float8_e4m3fn)
    save_file({"a.weight": q, "b.weight": torch.ones(3)}, str(tmp_path / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file({"a.weight_scale_inv": s}, str(tmp_path / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors",
        "a.weight_scale_inv": "model-00002-of-00002.safetensors"}}))
    released, reads = [], []

    class Recording(Checkpoint):
        def release(self, file):
            released.append(file)

        def get(self, name):
            reads.append(name)
            return super().get(name)

    r = DequantizingReader(Recording(tmp_path), Scheme("fp8", (128, 128)))
    assert r.keys() == ["a.weight", "b.weight"] and r.info("a.weight") == (torch.float32, (130, 70)) and reads == []
    assert r.nbytes("a.weight") == 130 * 70 + 4 * 2
    r.release("model-00002-of-00002.safetensors")
    assert released == []
    got = r.get("a.weight", torch.bfloat16)
    assert released == ["model-00002-of-00002.safetensors"] and reads == ["a.weight", "a.weight_scale_inv"]
    full = s.repeat_interleave(128, 0)[:130].repeat_interleave(128, 1)[:, :70]
    assert torch.equal(got, (q.float() * full).bfloat16())


@pytest.mark.parametrize("qc, extra, says", [
    ({"quant_method": "fp8", "weight_block_size": [128, 128]},  # 200 x 300 in 128 x 128 blocks: a 2 x 3 grid
     {"m.weight": torch.zeros(200, 300).to(torch.float8_e4m3fn), "m.weight_scale_inv": torch.ones(2, 2)}, r"has \[2, 3\]"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, {}, "two positive integers"),
    ({"quant_method": "mxfp4"}, {"e.down_proj_blocks": torch.zeros(2, 8, 2, 8, dtype=torch.uint8),
                                 "e.down_proj_scales": torch.zeros(2, 8, 2, dtype=torch.uint8)}, "not \\[experts, out, groups, 16\\]"),
    ({"quant_method": "mxfp4"}, {"e.down_proj_scales": torch.zeros(2, 8, 2, dtype=torch.uint8)}, "have no blocks"),
])
def test_malformed_quantized_source_refused_before_reading(tmp_path, qc, extra, says):
    with pytest.raises((FormatError, SourceError), match=says):
        make_plan(Checkpoint(_quantized_source(tmp_path / "src", qc, extra)))
