"""`qconvert train`: LoRA on a frozen 4-bit base, exactly resumable, on one process or several.

One optimizer step consumes ``batch_size * grad_accum * world_size`` examples in an order that is a
pure function of (seed, epoch). The loss of a step is the mean over all its label tokens, summed
across micro-batches and processes, so a data-parallel run computes the gradient a single process
computes on the same global batch. Checkpoints hold the adapter, the optimizer and scheduler, every
RNG state and the data position; resuming from one continues the exact same computation.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DataError
from .data import FORMATS, build_examples, collate, load_records, pack

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw")
SCHEDULERS = ("constant", "cosine", "linear")
STATE = "trainer_state.pt"


def _dist():
    """(rank, world) — torch.distributed initialised from torchrun's environment when present."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return dist.get_rank(), world
    return 0, 1


def make_optimizer(name: str, params, lr: float, device: torch.device, say: Callable[[str], None]):
    if name not in OPTIMIZERS:
        raise DataError(f"unknown --optim {name!r}", hint=f"use one of {', '.join(OPTIMIZERS)}")
    if name != "adamw" and device.type == "cuda":
        import bitsandbytes as bnb

        cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
               "adamw_8bit": bnb.optim.AdamW8bit}[name]
        return cls(params, lr=lr, weight_decay=0.0), name
    if name != "adamw":
        say(f"note: {name} needs a CUDA device; using torch AdamW (32-bit, not paged) on {device.type}")
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), "adamw"


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _rng_state() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    import numpy as np

    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def label_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label is not -100."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint-N folders of a training output, by step."""
    found = [p for p in folder.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def base_model_id(model_path: str, repo_id: str | None) -> str:
    """What the adapter names as its base: the Hub id when the model came from the Hub (never the
    local cache path it was downloaded to), else the folder as the user gave it."""
    return repo_id or str(model_path)


def train(
    model: str,
    data: str,
    output: str | os.PathLike,
    *,
    fmt: str = "auto",
    eval_data: str | None = None,
    eval_split: float = 0.0,
    max_length: int = 512,
    packing: bool = False,
    train_on_inputs: bool = False,
    lora_r: int = 64,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    target_modules: list[str] | None = None,
    optim: str = "paged_adamw_32bit",
    lr: float = 2e-4,
    lr_scheduler: str = "constant",
    warmup_ratio: float = 0.03,
    max_grad_norm: float = 0.3,
    batch_size: int = 1,
    grad_accum: int = 16,
    epochs: float = 1.0,
    max_steps: int | None = None,
    stop_after: int | None = None,
    gradient_checkpointing: bool = True,
    seed: int = 42,
    save_steps: int = 0,
    save_total_limit: int | None = None,
    logging_steps: int = 1,
    resume: str | bool | None = None,
    backend: str = "auto",
    revision: str | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoTokenizer

    from ..loader import load_model, resolve_model_path

    rank, world = _dist()
    say = (log or (lambda m: None)) if rank == 0 else (lambda m: None)
    out = Path(output)
    if lr_scheduler not in SCHEDULERS:
        raise DataError(f"unknown --lr-scheduler {lr_scheduler!r}", hint=f"use one of {', '.join(SCHEDULERS)}")
    if fmt not in FORMATS:
        raise DataError(f"unknown --format {fmt!r}", hint=f"use one of {', '.join(FORMATS)}")
    random.seed(seed)
    torch.manual_seed(seed)
    root, repo_id = resolve_model_path(model, revision)
    tok = AutoTokenizer.from_pretrained(root)
    records = load_records(data)
    examples = build_examples(records, tok, fmt, max_length, train_on_inputs, source=str(data))
    eval_examples: list = []
    if eval_data:
        eval_examples = build_examples(load_records(eval_data), tok, fmt, max_length, train_on_inputs, source=str(eval_data))
    elif eval_split > 0:
        n_eval = max(1, int(len(examples) * eval_split))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        eval_examples = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in sorted(order[n_eval:])]
    if packing:
        examples = pack(examples, max_length)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    base = load_model(root, device=device, backend=backend)  # a non-4-bit model is refused there, with a hint
    if gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, task_type="CAUSAL_LM",
                     target_modules=target_modules or "all-linear")
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, cfg)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, optim_used = make_optimizer(optim, params, lr, device, say)
    per_step = batch_size * grad_accum * world
    steps_per_epoch = max(1, len(examples) // per_step)
    total = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    warmup = int(warmup_ratio * total)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(lr_scheduler, warmup, total))
    step = 0
    ckpt_dir = _find_resume(out, resume)
    if ckpt_dir is not None:
        from safetensors.torch import load_file

        set_peft_model_state_dict(peft_model, load_file(str(ckpt_dir / "adapter_model.safetensors")))
        st = torch.load(ckpt_dir / STATE, weights_only=False)
        optimizer.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = st["step"]
        _set_rng_state(st["rng"][rank] if isinstance(st["rng"], list) else st["rng"])
        say(f"resumed from {ckpt_dir} at step {step}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    if rank == 0 and ckpt_dir is None and metrics_path.exists():
        metrics_path.unlink()
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        interrupted["flag"] = True
        interrupted["signal"] = True

    old_handler = signal.signal(signal.SIGINT, on_sigint) if rank == 0 or world == 1 else None
    bar = None
    if rank == 0 and (progress if progress is not None else os.isatty(2) and not os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")):
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True)
    tb = None
    if rank == 0:
        try:  # TensorBoard when it is installed
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out / "runs"))
        except ImportError:
            pass
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    peft_model.train()
    last_loss = None
    t_start = time.perf_counter()
    ran = 0
    try:
        while step < total:
            if interrupted["flag"]:
                break
            epoch, pos = divmod(step, steps_per_epoch)
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
            chunk = [examples[i] for i in order[pos * per_step : (pos + 1) * per_step]]
            mine = chunk[rank::world]
            micro = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
            n_tok = torch.tensor(float(sum(sum(l != -100 for l in e.labels[1:]) for e in chunk)))
            loss_sum = torch.zeros(())
            t0 = time.perf_counter()
            tokens = 0
            for mb in micro:
                b = {k: v.to(device) for k, v in collate(mb, pad).items()}
                logits = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
                loss = label_loss_sum(logits, b["labels"]) / n_tok
                loss.backward()
                loss_sum += loss.detach().cpu()
                tokens += int(b["attention_mask"].sum())
            if world > 1:
                import torch.distributed as dist

                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad)
                dist.all_reduce(loss_sum)
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            ran += 1
            last_loss = loss_sum.item()
            dt = time.perf_counter() - t0
            if rank == 0:
                row = {"step": step, "loss": last_loss, "lr": sched.get_last_lr()[0], "tokens_per_s": tokens * world / dt, "epoch": step / steps_per_epoch}
                if step % logging_steps == 0 or step == total:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    if tb:
                        for key in ("loss", "lr", "tokens_per_s"):
                            tb.add_scalar(f"train/{key}", row[key], step)
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if eval_examples and rank == 0 and (step % max(1, save_steps or total) == 0 or step == total):
                ev = evaluate(peft_model, eval_examples, pad, batch_size, device)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"step": step, "eval_loss": ev}) + "\n")
            if save_steps and step % save_steps == 0 and step < total:
                _save_checkpoint(peft_model, optimizer, sched, step, out, save_total_limit, rank, world)
            if stop_after is not None and ran >= stop_after:
                interrupted["flag"] = True
        if interrupted["flag"] and step < total:
            _save_checkpoint(peft_model, optimizer, sched, step, out, save_total_limit, rank, world)
            say(f"interrupted at step {step}: saved {out / f'checkpoint-{step}'}; resume with --resume")
            return {"interrupted": True, "step": step, "loss": last_loss, "signal": interrupted.get("signal", False)}
    finally:
        if bar:
            bar.close()
        if tb:
            tb.close()
        if old_handler is not None:
            signal.signal(signal.SIGINT, old_handler)
    if rank == 0:
        _write_adapter(peft_model, out, base_model_id(model, repo_id), cfg, {
            "steps": step, "examples": len(examples), "optimizer": optim_used, "lr": lr, "final_loss": last_loss,
        })
    say(f"trained {step} steps ({time.perf_counter() - t_start:.1f} s), final loss {last_loss:.4f}; adapter in {out}")
    return {"interrupted": False, "step": step, "loss": last_loss, "optimizer": optim_used}


def evaluate(model, examples, pad: int, batch_size: int, device) -> float:
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            b = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad).items()}
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            total += label_loss_sum(logits, b["labels"]).item()
            count += (b["labels"][:, 1:] != -100).sum().item()
    model.train()
    return total / max(1.0, count)


def _find_resume(out: Path, resume) -> Path | None:
    if not resume:
        return None
    if resume is True or resume == "latest":
        ckpts = checkpoints(out)
        if not ckpts:
            raise DataError(f"{out}: no checkpoint-N folder to resume from", hint="run without --resume to start")
        return ckpts[-1]
    p = Path(resume)
    if not (p / STATE).is_file():
        raise DataError(f"{p}: not a training checkpoint (no {STATE})")
    return p


def _save_checkpoint(model, optimizer, sched, step: int, out: Path, limit: int | None, rank: int, world: int) -> None:
    rng = _rng_state()
    if world > 1:
        import torch.distributed as dist

        gathered: list = [None] * world
        dist.all_gather_object(gathered, rng)
        rng = gathered
    if rank != 0:
        return
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": sched.state_dict(), "step": step, "rng": rng}, tmp / STATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if limit:
        for old in checkpoints(out)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)


def _write_adapter(model, out: Path, base_id: str, cfg, info: dict) -> None:
    from ..hub.card import render_card

    tmp = out / ".adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    acfg = json.loads((tmp / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = base_id
    (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2, sort_keys=True) + "\n")
    body = (f"# LoRA adapter for {base_id}\n\nTrained with qconvert on a 4-bit NF4 base: r={cfg.r}, alpha={cfg.lora_alpha}, "
            f"dropout={cfg.lora_dropout}; {info['steps']} steps on {info['examples']} examples, optimizer {info['optimizer']}, "
            f"lr {info['lr']}, final training loss {info['final_loss']:.4f}.\n\nLoad with PEFT: "
            f"`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base_id}\"), \"{out.name}\")`.\n")
    (tmp / "README.md").write_text(render_card({"base_model": base_id, "base_model_relation": "adapter", "library_name": "peft",
                                                 "tags": ["qconvert", "lora", "qlora"]}, body))
    for f in ("adapter_model.safetensors", "README.md", "adapter_config.json"):  # the config last
        os.replace(tmp / f, out / f)
    shutil.rmtree(tmp, ignore_errors=True)
