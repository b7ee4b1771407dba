"""Size figures of 4-bit MoE experts (issue 20 item 6): a Qwen3-30B-A3B-shaped model, side by side.

    .venv/bin/python tools/bench_moe.py [--layers 2] [--work DIR] [--no-anchor] [--no-train] [--seq 128] [--lora-experts]

Builds a random bfloat16 checkpoint with Qwen3-30B-A3B's full widths (hidden 2048, 32 query and 4
key/value heads of 128, 128 routed experts of intermediate 768, vocabulary 151936, untied head) and
``--layers`` decoder layers, written per expert as ``save_pretrained`` writes Qwen3-MoE (one shard per
layer, streamed: no model is built). Then converts it three ways, each in a child process whose peak
RSS is measured: ``qconvert quantize`` (4-bit experts, the default), ``qconvert quantize --experts
16bit``, and the anchor, transformers + bitsandbytes quantize-on-load + ``save_pretrained``.

For each output it reports the bytes written and bits per parameter over the whole model, measured
and extrapolated to the real depth of 48 layers: (bytes of the tensors outside the layers) + 48 x
(mean bytes of one layer), over the same count of parameters; plus bits per parameter over the
routed-expert tensors alone. Nothing is estimated from formulas: every byte is read off the written
safetensors headers. The random weights do not change sizes (the layout has no entropy coding).

Then (unless ``--no-train``) one LoRA training step on each side, each in its own child process:
``qconvert.load_model`` on the 4-bit-experts folder, against transformers + PEFT + bitsandbytes
(``from_pretrained`` of the anchor's folder: its routed experts in bf16, as it writes them). Both
get the same recipe: gradient checkpointing (non-reentrant), PEFT LoRA r 16 / alpha 16 on the
attention projections (``--lora-experts``: also on the routed experts through ``target_parameters``,
dropout 0), torch AdamW, one sequence of ``--seq`` random tokens with labels, bf16 compute. No
``prepare_model_for_kbit_training`` on the anchor (it would cast its bf16 tensors to float32). Each
child reports the resident memory after loading and its high-water mark after loading and after the
step (``/proc/self/status`` VmRSS, VmHWM), the step's wall time (forward, backward, optimizer step),
and the whole process's peak RSS as its parent measures it (``resource.getrusage(RUSAGE_CHILDREN)``
in a small measuring process, as for the conversions). Also the bytes one decoder layer holds after
the step (parameters, LoRA's included, buffers, bitsandbytes' quant-state tensors, AdamW's state), and, labelled as an extrapolation,
the peak at the real depth: peak + (48 - layers) x that; with gradient checkpointing a step's
transient memory is one layer's, whatever the depth. At 1-2 layers both peaks are dominated by what
does not scale with depth (the 151936 x 2048 embeddings and head, kept 16-bit by both, and the Python
runtime), so the ratio that matters for the goal (<= 1/3 of the anchor's) is the extrapolated one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REAL_LAYERS = 48
SHAPE = dict(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
             num_experts_per_tok=8, moe_intermediate_size=768, intermediate_size=6144, vocab_size=151936)


def build_source(out: Path, layers: int) -> None:
    """The random checkpoint: config.json from transformers' Qwen3MoeConfig, tensors streamed to shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    out.mkdir(parents=True, exist_ok=True)
    cfg = Qwen3MoeConfig(num_hidden_layers=layers, tie_word_embeddings=False, max_position_embeddings=4096, **SHAPE)
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    h, d, e, i = SHAPE["hidden_size"], SHAPE["head_dim"], SHAPE["num_experts"], SHAPE["moe_intermediate_size"]

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    files = [f"model-{n:05d}-of-{layers + 1:05d}.safetensors" for n in range(1, layers + 2)]
    for n in range(layers):
        p = f"model.layers.{n}."
        sd = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
              p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
              p + "self_attn.q_proj.weight": rnd(32 * d, h), p + "self_attn.k_proj.weight": rnd(4 * d, h),
              p + "self_attn.v_proj.weight": rnd(4 * d, h), p + "self_attn.o_proj.weight": rnd(h, 32 * d),
              p + "self_attn.q_norm.weight": torch.ones(d, dtype=torch.bfloat16),
              p + "self_attn.k_norm.weight": torch.ones(d, dtype=torch.bfloat16), p + "mlp.gate.weight": rnd(e, h)}
        for x in range(e):
            q = f"{p}mlp.experts.{x}."
            sd |= {q + "gate_proj.weight": rnd(i, h), q + "up_proj.weight": rnd(i, h), q + "down_proj.weight": rnd(h, i)}
        save_file(sd, str(out / files[n]), metadata={"format": "pt"})
        weight_map |= {k: files[n] for k in sd}
        del sd
    sd = {"model.embed_tokens.weight": rnd(SHAPE["vocab_size"], h), "lm_head.weight": rnd(SHAPE["vocab_size"], h),
          "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    save_file(sd, str(out / files[-1]), metadata={"format": "pt"})
    weight_map |= {k: files[-1] for k in sd}
    total = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


def anchor(src: str, out: str) -> None:
    """transformers + bitsandbytes: quantize on load, save_pretrained (run in a child process)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)
    AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg).save_pretrained(out)


def child(cmd: list[str]) -> dict:
    """Run ``cmd`` under a fresh measuring process (so each peak is its own): wall time, peak RSS."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--measure", *cmd], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    rss = int(r.stderr.strip().splitlines()[-1].removeprefix("PEAK_RSS_KB "))
    return {"seconds": round(time.perf_counter() - t, 1), "peak_rss_mb": rss // 1024}


def measure(cmd: list[str]) -> int:
    """Run ``cmd``; print its peak RSS (ru_maxrss of this process's only child) as the last stderr line."""
    r = subprocess.run(cmd)  # its stdout goes to the caller (the training step's JSON)
    print(f"PEAK_RSS_KB {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}", file=sys.stderr)
    return r.returncode


def _rss_mb() -> tuple[int, int]:
    """(resident MB now, peak resident MB of this program so far): /proc/self/status VmRSS and VmHWM,
    which start afresh at exec (getrusage's ru_maxrss of the process itself keeps the forking parent's)."""
    with open("/proc/self/status") as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("VmRSS", "VmHWM")}
    return kb["VmRSS"] // 1024, kb["VmHWM"] // 1024


def _load(side: str, folder: str):
    """The 4-bit model of ``side`` and the context its LoRA is attached in (as qconvert train attaches it)."""
    from contextlib import ExitStack

    if side == "qconvert":
        import qconvert
        from qconvert.model.adapters import module_targets_kept
        from qconvert.nn.experts4bit_lora import peft_sees_4bit_experts

        model = qconvert.load_model(folder, device="cpu")

        def attach() -> ExitStack:
            stack = ExitStack()
            stack.enter_context(module_targets_kept())
            stack.enter_context(peft_sees_4bit_experts(model))
            return stack

        return model, attach
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu"), ExitStack


def layer_bytes(model, optimizer=None) -> float:
    """Mean bytes one decoder layer holds in memory: its parameters (LoRA's included once attached) and
    buffers, the quant-state tensors bitsandbytes keeps as attributes (absmax, nested absmax,
    codebooks), and the ``optimizer``'s state for its parameters."""
    per: dict[str, int] = {}
    seen: set[int] = set()  # storage addresses

    def add(name: str, t) -> None:  # each storage once, by its real size (a view or an expanded tensor holds no more)
        m = re.search(r"\blayers\.(\d+)\.", name)
        if m and t is not None and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            per[m.group(1)] = per.get(m.group(1), 0) + t.untyped_storage().nbytes()

    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        add(name, t)
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in (optimizer.state.items() if optimizer is not None else ()):
        for t in state.values():
            if hasattr(t, "untyped_storage") and t.dim():
                add(names[id(p)], t)
    for name, mod in model.named_modules():
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        for t in (getattr(qs, "absmax", None), getattr(qs, "code", None), *((qs.state2.absmax, qs.state2.code) if getattr(qs, "nested", False) else ())):
            add(name + ".", t)
    return sum(per.values()) / max(len(per), 1)


def train_step(side: str, folder: str, seq: int, lora_experts: bool) -> None:
    """One LoRA step on ``side`` ("qconvert" or "anchor"), its figures printed as JSON (see the docstring)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    t = time.perf_counter()
    model, attach = _load(side, folder)
    load_s = time.perf_counter() - t
    load_rss, load_peak = _rss_mb()
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    cfg = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0 if lora_experts else 0.05, task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if lora_experts else None)
    with attach():
        model = get_peft_model(model, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, SHAPE["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    model.train()
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t
    _, step_peak = _rss_mb()
    per_layer = layer_bytes(model, opt)  # after the step: the LoRA tensors and AdamW's state are a layer's too
    print(json.dumps({"load_seconds": round(load_s, 1), "load_resident_mb": load_rss, "load_peak_rss_mb": load_peak,
                      "layer_resident_mb": round(per_layer / 2**20, 1),
                      "step_seconds": round(step_s, 1), "step_peak_rss_mb": step_peak, "lora_params": sum(p.numel() for p in params),
                      "loss": round(loss.item(), 4)}))


def train_figures(q4: Path, anchor_dir: Path | None, seq: int, lora_experts: bool, layers: int) -> dict:
    """One training step per side, each in a fresh child process (so each peak is its own)."""
    out = {}
    for side, folder in (("qconvert", q4), ("anchor", anchor_dir)):
        if folder is None:
            continue
        cmd = [sys.executable, __file__, "--measure", sys.executable, __file__, "--train-step", side, str(folder), str(seq), str(int(lora_experts))]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if r.returncode:
            raise SystemExit(f"train step ({side}) failed:\n{r.stderr[-3000:]}")
        out[side] = json.loads(r.stdout.strip().splitlines()[-1])
        out[side]["process_peak_rss_mb"] = peak = int(r.stderr.strip().splitlines()[-1].removeprefix("PEAK_RSS_KB ")) // 1024
        # the real depth: each further layer adds what one layer holds; with gradient checkpointing a step's
        # transient memory is one layer's recomputation, whatever the depth (an extrapolation, labelled so)
        out[side]["extrapolated_48_layers_peak_mb"] = round(peak + (REAL_LAYERS - layers) * out[side]["layer_resident_mb"])
    if len(out) == 2:
        for key in ("process_peak_rss_mb", "extrapolated_48_layers_peak_mb"):
            out[f"{key}_ratio_qconvert_to_anchor"] = round(out["qconvert"][key] / out["anchor"][key], 3)
    return out


def sizes(folder: Path) -> dict:
    """Bytes and parameters read off the written safetensors headers: outside the layers, per layer,
    and of the routed experts; a 4-bit weight counts every stored entry, its parameters from its
    quant-state shape."""
    from qconvert.io.checkpoint import Checkpoint
    from qconvert.format.layout import find_quantized

    ck = Checkpoint(folder)
    keys = ck.keys()
    q = set(find_quantized(keys))
    owner = {c: n for n in q for c in ck.companions(n)}
    acc: dict[str, list[int]] = {}
    for k in keys:
        name = owner.get(k, k)
        params = math.prod(ck.quantized(name).shape) if k == name and name in q else (0 if k in owner else math.prod(ck.info(k)[1]))
        m = re.match(r"model\.layers\.(\d+)\.", name)
        for group in (f"layer{m.group(1)}" if m else "outside", *(["experts"] if ".experts." in name else [])):
            b, p = acc.setdefault(group, [0, 0])
            acc[group] = [b + ck.nbytes(k), p + params]
    return acc


def figures(folder: Path, layers: int, files_bytes: int) -> dict:
    acc = sizes(folder)
    per = [acc[f"layer{n}"] for n in range(layers)]
    layer_bytes, layer_params = sum(b for b, _ in per) / layers, sum(p for _, p in per) / layers
    ob, op = acc["outside"]
    eb, ep = acc.get("experts", [0, 0])
    real_bytes = ob + REAL_LAYERS * layer_bytes
    return {"output_bytes": files_bytes, "bits_per_param_model": round(8 * (ob + sum(b for b, _ in per)) / (op + sum(p for _, p in per)), 3),
            "bits_per_param_experts": round(8 * eb / ep, 3) if ep else None,
            "extrapolated_48_layers_gb": round(real_bytes / 1e9, 2),
            "bits_per_param_48_layers": round(8 * real_bytes / (op + REAL_LAYERS * layer_params), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--work", default="/tmp/bench_moe")
    ap.add_argument("--no-anchor", action="store_true", help="skip transformers + bitsandbytes")
    ap.add_argument("--no-train", action="store_true", help="skip the training-step figures")
    ap.add_argument("--seq", type=int, default=128, help="tokens in the training step's one sequence")
    ap.add_argument("--lora-experts", action="store_true", help="the training step also puts LoRA on the routed experts")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    src = work / "src"
    t = time.perf_counter()
    build_source(src, args.layers)
    print(f"source built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    py = sys.executable
    runs = {"qconvert (experts 4-bit)": [py, "-m", "qconvert", "quantize", str(src), str(work / "q4"), "--json"],
            "qconvert --experts 16bit": [py, "-m", "qconvert", "quantize", str(src), str(work / "q16"), "--experts", "16bit", "--json"]}
    if not args.no_anchor:
        runs["transformers + bitsandbytes"] = [py, __file__, "--anchor", str(src), str(work / "anchor")]
    rows = {"source (bf16)": {"output_bytes": sum(f.stat().st_size for f in src.glob("*.safetensors")), **figures(src, args.layers, 0)}}
    rows["source (bf16)"].pop("output_bytes")
    for label, cmd in runs.items():
        out = Path(cmd[5] if "quantize" in cmd else cmd[-1])
        run = child(cmd)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        rows[label] = {**figures(out, args.layers, size), **run}
        if out.name == "q16":
            shutil.rmtree(out)  # disk: the training step needs only the 4-bit-experts folder and the anchor's
    train = None
    if not args.no_train:
        anchor_dir = None if args.no_anchor else work / "anchor"
        train = train_figures(work / "q4", anchor_dir, args.seq, args.lora_experts, args.layers)
    import platform

    print(json.dumps({"layers": args.layers, "shape": SHAPE, "cpu": platform.processor() or platform.machine(),
                      "date": time.strftime("%Y-%m-%d"), "rows": rows,
                      "train_step": train and {"seq": args.seq, "lora_experts": args.lora_experts, **train}}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--anchor":
        anchor(sys.argv[2], sys.argv[3])
        sys.exit(0)
    if len(sys.argv) == 6 and sys.argv[1] == "--train-step":
        train_step(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1")
        sys.exit(0)
    if len(sys.argv) > 2 and sys.argv[1] == "--measure":
        sys.exit(measure(sys.argv[2:]))
    sys.exit(main())
