"""Merge into the dequantized 4-bit base, or into the 16-bit original? Measured on a small model trained
here (no real model can be downloaded on this machine).

    .venv/bin/python tools/measure_merge_base.py [--steps 150] [--lora-steps 60]

1. A byte-level BPE tokenizer (2048 tokens) and a Llama (hidden 256, 4 layers, 8 heads, 688 MLP,
   4.2M parameters) are trained from scratch on the Python standard library's own source (this
   interpreter's ``Lib/*.py``, minus ``Lib/email``), saved in bfloat16: the "16-bit original".
2. `qconvert quantize` (NF4, double quantization, block 64): the 4-bit base.
3. A LoRA adapter (r 16, alpha 32, all linear layers) is trained on the 4-bit base as QLoRA trains
   (qconvert.load_model + PEFT, float32 compute) on ``Lib/email/*.py``, a held-out domain.
4. `qconvert merge` twice, bfloat16 output: into the dequantized 4-bit base (the default) and with
   ``--base-original`` into the 16-bit original.
5. `qconvert compare` of the two merges (KL, top-1 agreement, on the built-in probes and on 40
   held-out lines of ``Lib/email``), each merge's check against the unmerged model (4-bit base +
   adapter, as load_model runs it), and the mean next-token loss of each on held-out email code.
Prints one JSON object. Everything is in --work (default .bench/merge-base/; made once, delete it to
start over).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORK = ROOT / ".bench" / "merge-base"
SEQ, BATCH = 128, 8


def corpus(email: bool) -> str:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((lib / "email").glob("*.py")) if email else sorted(p for p in lib.glob("*.py"))
    return "\n".join(p.read_text(errors="replace") for p in files)


def tokenizer(text: str, folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def batches(ids: torch.Tensor, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - SEQ - 1, (BATCH,), generator=g)
        yield torch.stack([ids[s:s + SEQ] for s in starts.tolist()])


def train(model, params, ids: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    """AdamW on ``params`` for ``steps`` batches of random windows of ``ids``; the last batch's loss."""
    opt = torch.optim.AdamW(params, lr=lr)
    loss = None
    for x in batches(ids, steps, seed):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return float(loss.detach())


def heldout_loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(sum(model(input_ids=x, labels=x).loss for x in batches(ids, 16, seed=99)) / 16)


def build(work: Path, steps: int, lora_steps: int) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import qconvert
    from qconvert.convert.quantize import quantize_checkpoint

    src, q, adapter = work / "src", work / "q", work / "adapter"
    info = {}
    if not src.exists():
        tok = tokenizer(corpus(False), src)
        ids = torch.tensor(tok(corpus(False))["input_ids"])
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                                             num_key_value_heads=8, vocab_size=2048, max_position_embeddings=512, bos_token_id=0, eos_token_id=1))
        info["pretrain_steps"], info["pretrain_final_loss"] = steps, train(model, model.parameters(), ids, steps, 2e-3, seed=0)
        model.to(torch.bfloat16).save_pretrained(src)
        tok.save_pretrained(src)
    if not q.exists():
        quantize_checkpoint(str(src), q)
    if not adapter.exists():
        from transformers import AutoTokenizer

        email = torch.tensor(AutoTokenizer.from_pretrained(src)(corpus(True))["input_ids"])
        base = qconvert.load_model(q, dtype=torch.float32)
        peft = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
        info["lora_steps"], info["lora_final_loss"] = lora_steps, train(peft, [p for p in peft.parameters() if p.requires_grad], email[: email.numel() * 9 // 10], lora_steps, 1e-3, seed=1)
        peft.save_pretrained(adapter)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150, help="Pre-training steps (batch 8 x 128 tokens).")
    ap.add_argument("--lora-steps", type=int, default=60, help="QLoRA steps on the 4-bit base.")
    ap.add_argument("--work", default=str(DEFAULT_WORK), help="Where the models are made (once) and merged.")
    args = ap.parse_args()
    work = Path(args.work)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qconvert
    from qconvert.export.compare import compare
    from qconvert.export.merge import merge_adapter

    info = build(work, args.steps, args.lora_steps)
    m4, m16 = work / "merged-4bit-base", work / "merged-16bit-original"
    checks = {}
    for out, orig in ((m4, None), (m16, str(work / "src"))):
        s = merge_adapter(str(work / "q"), str(work / "adapter"), out, base_original=orig, overwrite=True, check=True)
        checks[out.name] = s["check"]
    email_text = corpus(True)
    tok = AutoTokenizer.from_pretrained(work / "src")
    held = torch.tensor(tok(email_text)["input_ids"])
    held = held[held.numel() * 9 // 10:]
    lines = [ln for ln in email_text.splitlines()[-400:] if len(ln.strip()) > 30][:40]
    (work / "prompts.txt").write_text("\n".join(lines))
    figures = {}
    for name, prompts in (("builtin_prompts", None), ("heldout_email_lines", str(work / "prompts.txt"))):
        r = compare(str(m4), str(m16), prompts=prompts, new_tokens=0, tolerance=math.inf)
        figures[name] = {k: r[k] for k in ("kl", "top1_agreement", "max_rel_logit_error")} | {"prompts": len(r["prompts"])}
    losses = {"unmerged_4bit_base_plus_adapter": heldout_loss(qconvert.load_model(work / "q", dtype=torch.float32, adapter=str(work / "adapter")), held)}
    for out in (m4, m16):
        losses[out.name] = heldout_loss(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval(), held)
    print(json.dumps({"build": info, "compare_4bit_base_merge_vs_16bit_original_merge": figures, "check_against_unmerged": checks,
                      "heldout_loss": losses, "torch_threads": 1, "python": sys.version.split()[0]}, indent=1))


if __name__ == "__main__":
    main()
