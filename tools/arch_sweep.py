"""Architecture coverage sweep: qconvert quantize against transformers + bitsandbytes, family by family.

    .venv/bin/python tools/arch_sweep.py [--only llama,gpt2,...] [--json OUT.json] [--markdown]

For every causal-LM ``model_type`` that the installed transformers ships
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), it builds a tiny randomly initialised model from the
config class's defaults with every size shrunk (hidden 64, 2 layers, 4 experts, vocab 128: the
dimensions are multiples of 64 so that bitsandbytes' CPU 4-bit matmul accepts them), saves it in
bfloat16, and then:

1. runs the anchor: ``from_pretrained(src, quantization_config=BitsAndBytesConfig(nf4, double quant,
   bf16 compute)).save_pretrained(anchor)``;
2. runs ``qconvert quantize src ours`` (in process);
3. compares the two outputs tensor by tensor: names, dtypes, shapes and bytes, the
   ``quantization_config`` and the config's ``dtype``;
4. loads qconvert's output with plain ``AutoModelForCausalLM.from_pretrained`` (bitsandbytes, no
   qconvert) and runs a forward pass, with autograd on (bitsandbytes' CPU path refuses some shapes
   under no_grad), checking the logits are finite.

It prints one row per family: tensors identical / total, quantized weights, whether the output
loads and runs, and a note (why a family is refused, what the anchor does with it, or why it could
not be tried). A family passes when every tensor is identical, or when qconvert refuses it with a
stated reason (the note then says whether the anchor quantizes anything and whether its output
loads). The exit status is 1 if any family differs or qconvert fails with anything but a
QConvertError.
tests/test_arch.py runs the same functions on one family per rule.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

# Every size a config may have, shrunk. Only the names a config class already has are passed.
SMALL = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64, "word_embed_proj_dim": 64,
    "intermediate_size": 128, "ffn_dim": 128, "d_ff": 128, "ffn_hidden_size": 128, "decoder_ffn_dim": 128,
    "encoder_ffn_dim": 128, "n_inner": 128, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 64,
    "expert_intermediate_size": 64, "intermediate_size_mlp": 128, "mlp_hidden_size": 128,
    "num_hidden_layers": 2, "n_layer": 2, "n_layers": 2, "num_layers": 2, "decoder_layers": 2, "encoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "n_kv_heads": 2, "multi_query_group_num": 2,
    "head_dim": 16, "kv_channels": 16, "attention_head_dim": 16,
    "vocab_size": 128, "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2, "n_shared_experts": 1,
    "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "rotary_dim": 8, "rotary_emb_base": 10000,
}
# Families whose configs tie sizes together in ways SMALL alone breaks (checked by their validators).
OVERRIDES = {
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "mamba2": {"head_dim": 32, "n_groups": 1},  # num_heads * head_dim == expand * hidden_size
    "zaya": {"num_experts_per_tok": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "reformer": {"is_decoder": True, "attn_layers": ["local", "lsh"], "axial_pos_shape": [8, 16], "axial_pos_embds_dim": [32, 32]},
}
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id")


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(cfg, default) -> None:
    """Shrink an already built config in place (used for sub-configs), and keep its token ids and
    per-layer lists consistent with the smaller sizes."""
    for k, v in SMALL.items():
        if k in vars(default) or k in getattr(type(default), "attribute_map", {}):
            try:
                setattr(cfg, k, v)
            except Exception:  # a read-only alias
                pass
    _fix_up(cfg)


def _fix_up(cfg) -> None:
    vocab = getattr(cfg, "vocab_size", None)
    for t in TOKEN_IDS:
        v = getattr(cfg, t, None)
        if isinstance(v, int) and isinstance(vocab, int) and v >= vocab:
            setattr(cfg, t, min(2, vocab - 1))
    layers = getattr(cfg, "num_hidden_layers", None)
    for name, value in list(vars(cfg).items()):
        if isinstance(layers, int) and isinstance(value, list) and len(value) > layers and name.endswith(("layer_types", "layers_block_type")):
            try:
                setattr(cfg, name, value[:layers])
            except AttributeError:  # a read-only property over the per-layer list
                pass


def tiny_config(model_type: str):
    """The config class's defaults with every size shrunk (SMALL), sub-configs included."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    kwargs = {k: v for k, v in SMALL.items() if k in vars(default) or k in getattr(type(default), "attribute_map", {})}
    if "num_key_value_heads" in kwargs and getattr(default, "num_key_value_heads", None) == getattr(default, "num_attention_heads", None):
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)  # multi-head attention (MLA included) stays so
    types = getattr(default, "layer_types", None)
    settable = not isinstance(getattr(type(default), "layer_types", None), property)
    if isinstance(types, list) and types and "num_hidden_layers" in kwargs and settable:  # two layers, of two kinds if there are two
        kinds = list(dict.fromkeys(types))[:2]
        kwargs["layer_types"] = kinds if len(kinds) == 2 else kinds * 2
    kwargs.update(OVERRIDES.get(model_type, {}))
    try:
        cfg = AutoConfig.for_model(model_type, **kwargs)
    except AttributeError:  # layer_types aliased to a read-only property: let the config derive it
        kwargs.pop("layer_types", None)
        cfg = AutoConfig.for_model(model_type, **kwargs)
    _fix_up(cfg)
    for name in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub, type(sub)())
    return cfg


def build_source(model_type: str, out: Path, dtype=torch.bfloat16) -> Path:
    """A tiny random ``model_type`` saved with save_pretrained (safetensors) in ``dtype``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type)).to(dtype)
    model.save_pretrained(out)
    return out


def anchor(src: Path, out: Path) -> Path:
    """transformers + bitsandbytes quantize-on-load, then save_pretrained."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).save_pretrained(out)
    return out


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def compare(ours: Path, theirs: Path) -> dict:
    """Tensor by tensor: identical means same name, dtype, shape and bytes; plus the configs."""
    a, b = tensors(ours), tensors(theirs)
    same = [k for k in a.keys() & b.keys() if a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            and torch.equal(a[k].view(-1).view(torch.uint8), b[k].view(-1).view(torch.uint8))]
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (ours, theirs))
    return {
        "identical": len(same), "total": len(a.keys() | b.keys()),
        "only_ours": sorted(a.keys() - b.keys()), "only_anchor": sorted(b.keys() - a.keys()),
        "different": sorted(a.keys() & b.keys() - set(same)),
        "quantization_config_equal": ca.get("quantization_config") == cb.get("quantization_config"),
        "dtype_equal": ca.get("dtype") == cb.get("dtype"),
        "quantized": sum(".quant_state." in k for k in b),
    }


def loads_and_runs(path: Path) -> str:
    """Plain transformers + bitsandbytes loads ``path`` and a forward pass gives finite logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    try:
        with torch.enable_grad():  # bitsandbytes' CPU 4-bit matmul refuses some shapes under no_grad
            logits = model(input_ids=ids, use_cache=False).logits
    except RuntimeError:  # and some models modify its output in place, which autograd refuses
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
    if not torch.isfinite(logits.float()).all():
        return "non-finite logits"
    return "yes"


def qconvert_loads_and_runs(path: Path) -> str:
    """``qconvert.load_model`` (reference backend, float32) loads ``path`` and a forward pass gives
    finite logits; else the reason, its first line."""
    import qconvert
    from qconvert.errors import QConvertError

    try:
        model = qconvert.load_model(path, device="cpu", backend="reference", dtype=torch.float32)
    except QConvertError as e:
        return "refused: " + str(e).splitlines()[0].replace(str(path), "OUT")[:200]
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), use_cache=False).logits
    except Exception as e:
        return f"forward fails: {first_line(e)}"
    return "yes" if torch.isfinite(logits).all() else "non-finite logits"


def _source_runs(src: Path) -> bool:
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(src)(input_ids=torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]]), use_cache=False)
        return True
    except Exception:
        return False


def first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:160]


def sweep_one(model_type: str, work: Path, forward: bool = True, load: bool = False) -> dict:
    """One family through both tools; see the module docstring. Never raises. ``load``: also
    :func:`qconvert_loads_and_runs` on qconvert's output (row key ``qconvert_load``)."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.errors import QConvertError

    row = {"family": model_type, "status": "", "identical": 0, "total": 0, "quantized": 0, "loads": "", "note": ""}
    src, ours, theirs = work / "src", work / "ours", work / "anchor"
    try:
        build_source(model_type, src)
    except Exception as e:
        return {**row, "status": "not built", "note": f"tiny model not built: {first_line(e)}"}
    row["class"] = json.loads((src / "config.json").read_text()).get("architectures", ["?"])[0]
    anchor_error = None
    try:
        anchor(src, theirs)
    except Exception as e:
        anchor_error = first_line(e)
    try:
        quantize_checkpoint(str(src), ours, experts="16bit")  # the anchor's experts: 16-bit (issue 20)
    except QConvertError as e:  # a refusal always states its reason; the note says what the anchor did
        reason = str(e).replace(str(src), "SRC")
        if anchor_error:
            return {**row, "status": "refused", "note": f"qconvert refuses: {reason} (the anchor fails too: {anchor_error})"}
        anchor_q = sum(".quant_state." in k for k in tensors(theirs))
        what = f"the anchor quantizes {anchor_q} weights"
        if anchor_q:
            try:
                what += f", its output loads and runs: {loads_and_runs(theirs)}"
            except Exception as e2:
                what += f", its output does not load ({first_line(e2)})"
        return {**row, "status": "refused", "note": f"qconvert refuses: {reason} ({what})"}
    except Exception as e:
        return {**row, "status": "QCONVERT CRASH", "note": first_line(e) + " | " + traceback.format_exc().splitlines()[-2].strip()}
    if anchor_error:
        row.update(status="no anchor", note=f"anchor fails: {anchor_error}")
    else:
        c = compare(ours, theirs)
        row.update(identical=c["identical"], total=c["total"], quantized=c["quantized"])
        ok = c["identical"] == c["total"] and c["quantization_config_equal"] and c["dtype_equal"]
        row["status"] = "identical" if ok else "DIFFERENT"
        if not ok:
            row["note"] = "; ".join(
                f"{k}: {', '.join(c[k][:3])}" for k in ("only_ours", "only_anchor", "different") if c[k]
            ) or f"quantization_config equal {c['quantization_config_equal']}, dtype equal {c['dtype_equal']}"
    if load:
        try:
            row["qconvert_load"] = qconvert_loads_and_runs(ours)
        except Exception as e:
            row["qconvert_load"] = f"CRASH: {first_line(e)}"
    if forward:
        try:
            row["loads"] = loads_and_runs(ours)
        except Exception as e:
            row["loads"] = "no"
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"load/forward: {first_line(e)}"
            if not _source_runs(src):
                row["note"] += " (the unquantized tiny model fails the same forward: a limit of the tiny config, not of the conversion)"
            elif row["status"] == "identical":
                try:
                    loads_and_runs(theirs)
                except Exception as e2:
                    same = " the same way" if first_line(e2) == first_line(e) else f" ({first_line(e2)})"
                    row["note"] += f" (transformers + bitsandbytes fails on the anchor's own output{same})"
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| family | class | tensors identical / total | quantized weights | loads and runs | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        ident = f"{r['identical']} / {r['total']}" if r["total"] else "-"
        note = r["note"].replace("|", "/") or r["status"]
        lines.append(f"| {r['family']} | {r.get('class', '-')} | {ident} | {r['quantized'] or '-'} | {r['loads'] or '-'} | {note} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", help="comma-separated model types (default: every causal-LM type)")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--no-forward", action="store_true", help="skip the load-and-forward check")
    ap.add_argument("--load-model", action="store_true", help="also load qconvert's output with qconvert.load_model and run a forward")
    args = ap.parse_args()
    types = args.only.split(",") if args.only else causal_lm_types()
    rows = []
    t0 = time.perf_counter()
    for mt in types:
        work = Path(tempfile.mkdtemp(prefix=f"sweep-{mt}-"))
        t = time.perf_counter()
        try:
            row = sweep_one(mt, work, forward=not args.no_forward, load=args.load_model)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        row["seconds"] = round(time.perf_counter() - t, 1)
        rows.append(row)
        qload = f" load_model={row['qconvert_load'][:100]}" if "qconvert_load" in row else ""
        print(f"{mt:28s} {row['status']:12s} {row['identical']:4d}/{row['total']:<4d} q={row['quantized']:<3d} loads={row['loads'] or '-':4s}{qload} {row['note'][:150]}",
              flush=True, file=sys.stderr)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(markdown(rows))
    counts = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    if args.load_model:
        tried = [r["qconvert_load"] for r in rows if "qconvert_load" in r]
        print(f"\nqconvert.load_model: {sum(v == 'yes' for v in tried)} of {len(tried)} outputs load and run; "
              f"{sum(v.startswith('refused') for v in tried)} refused, {sum(v.startswith('forward') for v in tried)} load but fail the forward")
    print(f"\n{len(rows)} families in {time.perf_counter() - t0:.0f} s: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 1 if any(r["status"] in ("DIFFERENT", "QCONVERT CRASH") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
