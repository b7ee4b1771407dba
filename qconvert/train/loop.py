"""`qconvert train`: LoRA on a frozen 4-bit base, exactly resumable, on one process or several.

One optimizer step consumes ``batch_size * grad_accum * world_size`` examples in an order that is a
pure function of (seed, epoch). The loss of a step is the mean over all its label tokens, summed
across micro-batches and processes, so a data-parallel run computes the gradient a single process
computes on the same global batch. Checkpoints hold the adapter, the optimizer and scheduler, every
RNG state and the data position; resuming from one continues the exact same computation. Ctrl-C
and SIGTERM both stop after the current step and save one (see checkpoint.py for how they are read
back safely, and for the output-folder rules).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DataError, FormatError, OptionError
from .checkpoint import STATE, checkpoints  # noqa: F401  (re-exported: export-adapter lists checkpoints)
from .checkpoint import check_compatible, find_resume, load_state, prepare_output, run_signature, save_checkpoint, set_rng_state
from .data import FORMATS, TRUNCATION, DataReport, build_examples, collate, load_records, pack
from .options import check_options, check_target_modules, split_modules
from .report import Plan, data_lines, memory_text, on_terminal, start_lines, step_line

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw")
SCHEDULERS = ("constant", "cosine", "linear")
AUTO_SAVE_MIN_STEPS = 50


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


def label_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the positions whose label is not -100."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum"
    )


def base_model_id(model_path: str, repo_id: str | None) -> str:
    """What the adapter names as its base: the Hub id when the model came from the Hub (never the
    local cache path it was downloaded to), else the folder as the user gave it."""
    return repo_id or str(model_path)


def train(
    model: str,
    data: str,
    output: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train a LoRA adapter on the frozen 4-bit ``model``; see the module docstring and the README.

    The run's options are ``config`` (a :class:`qconvert.train.settings.TrainConfig`; default: its
    defaults) with ``options`` over it, the same names as keywords (``lr=1e-3, max_steps=10``);
    each option, its default and its range are described there. Every value is checked before
    anything is loaded (OptionError).
    Returns {"interrupted", "step", "loss", "eval_loss", "optimizer", "examples", "steps_per_epoch"}."""
    from .settings import TrainConfig

    cfg = TrainConfig.of(config, options)
    cfg.check()
    options = dict(cfg.as_options(), model=model, data=data, output=output, log=log, progress=progress)
    targets = cfg.target_modules
    resume, overwrite = cfg.resume, cfg.overwrite
    rank, world = _dist()
    say = (log or (lambda m: None)) if rank == 0 else (lambda m: None)
    out = Path(output)
    prepare_output(out, resume=resume, overwrite=overwrite, clear=False)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank has looked at --output before rank 0 changes it
    if rank == 0:
        prepare_output(out, resume=resume, overwrite=overwrite)
    if world > 1:
        dist.barrier()
    with warnings.catch_warnings():
        # transformers' deprecation notices (gradient_checkpointing_enable...) are not the user's to act on
        warnings.simplefilter("ignore", FutureWarning)
        return _train(model, data, out, options, targets, rank, world, say, progress)


def _train(model, data, out: Path, o: dict, targets, rank: int, world: int, say, progress) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from transformers import AutoTokenizer

    from ..loader import load_model, resolve_model_path
    from .config import resolved_config, write_config

    random.seed(o["seed"])
    torch.manual_seed(o["seed"])
    root, repo_id = resolve_model_path(model, o["revision"])
    check_causal_lm(root)
    try:
        tok = AutoTokenizer.from_pretrained(root)
    except Exception as e:  # transformers raises several types for a missing or broken tokenizer
        raise DataError(f"{root}: no usable tokenizer ({type(e).__name__})", hint="copy the tokenizer files into the model folder") from None
    examples, eval_examples, reports = read_data(data, tok, o)
    ckpt_dir = find_resume(out, o["resume"])
    st = load_state(ckpt_dir) if ckpt_dir is not None else None  # a crafted file is refused before the model loads
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    base = load_model(root, device=device, backend=o["backend"])  # a non-4-bit model is refused there, with a hint
    check_target_modules(base, targets)
    base.config.use_cache = False  # no KV cache while training (and no notice about it)
    if o["gradient_checkpointing"]:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    cfg = LoraConfig(r=o["lora_r"], lora_alpha=o["lora_alpha"], lora_dropout=o["lora_dropout"], task_type="CAUSAL_LM",
                     target_modules=targets or "all-linear")
    torch.manual_seed(o["seed"])
    peft_model = get_peft_model(base, cfg)
    signature = run_signature(config_identity(root), peft_model.peft_config["default"])
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer, optim_used = make_optimizer(o["optim"], params, o["lr"], device, say)
    plan = make_plan(examples, eval_examples, o, world)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o["lr_scheduler"], plan.warmup_steps, plan.total_steps))
    step = 0
    if ckpt_dir is not None:
        from safetensors.torch import load_file

        check_compatible(ckpt_dir, st, signature)
        set_peft_model_state_dict(peft_model, load_file(str(ckpt_dir / "adapter_model.safetensors")))
        optimizer.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        step = st["step"]
        set_rng_state(st["rng"][rank] if isinstance(st["rng"], list) else st["rng"])
        say(f"resumed from {ckpt_dir} at step {step}")
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt_dir is None and metrics_path.exists():
            metrics_path.unlink()
        write_config(out / "config.yaml", resolved_config(model, data, out, o))
    n_trainable = sum(p.numel() for p in params)
    n_total = count_parameters(peft_model)
    for name, rep in reports.items():
        for line in data_lines(name, rep, o["max_length"], o["truncation"]):
            say(line)
    lora_text = f"r {o['lora_r']}, alpha {o['lora_alpha']:g}, dropout {o['lora_dropout']:g} on {', '.join(targets) if targets else 'all linear layers'}"
    save_text = _save_text(plan, out, o)
    for line in start_lines(plan, trainable=n_trainable, total_params=n_total, lora=lora_text, optim=optim_used, lr=o["lr"],
                            scheduler=o["lr_scheduler"], device=device, save_text=save_text):
        say(line)

    stop = _StopSignals(world)
    bar = None
    terminal = rank == 0 and on_terminal(progress)
    if terminal:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.total_steps, initial=step, desc="train", dynamic_ncols=True)
    show = bar.write if bar else say
    tb = _tensorboard(out) if rank == 0 else None
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    peft_model.train()
    last_loss = last_eval = None
    t_start = time.perf_counter()
    ran = 0
    saved: list[Path] = []
    per_step = plan.effective_batch
    try:
        while step < plan.total_steps:
            if stop.requested():
                break
            epoch, pos = divmod(step, plan.steps_per_epoch)
            order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(o["seed"] + epoch)).tolist()
            chunk = [examples[i] for i in order[pos * per_step : (pos + 1) * per_step]]
            t0 = time.perf_counter()
            last_loss, tokens = _step(peft_model, chunk[rank::world], chunk, o["batch_size"], pad, device, params, world)
            torch.nn.utils.clip_grad_norm_(params, o["max_grad_norm"])
            optimizer.step()
            sched.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            ran += 1
            dt = time.perf_counter() - t0
            last_step = step == plan.total_steps
            if rank == 0:
                row = {"step": step, "loss": last_loss, "lr": sched.get_last_lr()[0], "tokens_per_s": tokens * world / dt,
                       "epoch": step / plan.steps_per_epoch}
                if step % o["logging_steps"] == 0 or last_step:
                    _append(metrics_path, row)
                    if tb:
                        for key in ("loss", "lr", "tokens_per_s"):
                            tb.add_scalar(f"train/{key}", row[key], step)
                    if not bar:
                        say(step_line(step, plan.total_steps, row, time.perf_counter() - t_start))
                if bar:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            if eval_examples and rank == 0 and ((plan.eval_steps and step % plan.eval_steps == 0) or last_step):
                last_eval = evaluate(peft_model, eval_examples, pad, o["batch_size"], device)
                _append(metrics_path, {"step": step, "eval_loss": last_eval})
                if tb:
                    tb.add_scalar("eval/loss", last_eval, step)
                show(f"step {step}/{plan.total_steps}  eval_loss {last_eval:.4f}")
            if plan.save_steps and step % plan.save_steps == 0 and not last_step:
                saved.append(_checkpoint(peft_model, optimizer, sched, step, out, o, rank, world, signature, show))
            if o["stop_after"] is not None and ran >= o["stop_after"]:
                stop.request(None)
        if stop.flag and step < plan.total_steps:
            _checkpoint(peft_model, optimizer, sched, step, out, o, rank, world, signature, lambda m: None)
            say(f"interrupted at step {step}: saved {out / f'checkpoint-{step}'}; resume with --resume")
            return {"interrupted": True, "step": step, "loss": last_loss, "signal": stop.signum}
    finally:
        if bar:
            bar.close()
        if tb:
            tb.close()
        stop.restore()
    if rank == 0:
        _write_adapter(peft_model, out, base_model_id(model, repo_id), cfg, {
            "steps": step, "examples": len(examples), "optimizer": optim_used, "lr": o["lr"], "final_loss": last_loss,
            "eval_loss": last_eval,
        })
        _plot(out)
    elapsed = time.perf_counter() - t_start
    for line in final_lines(out, step, elapsed, last_loss, last_eval, checkpoints(out), device):
        say(line)
    return {"interrupted": False, "step": step, "loss": last_loss, "eval_loss": last_eval, "optimizer": optim_used,
            "examples": len(examples), "steps_per_epoch": plan.steps_per_epoch}


def _step(model, mine, chunk, batch_size: int, pad: int, device, params, world: int) -> tuple[float, int]:
    """Forward and backward over this process's share of one global batch; returns (loss, tokens).
    The loss is normalised by the label tokens of the whole global batch (every process's share)."""
    micro = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    n_tok = torch.tensor(float(sum(sum(l != -100 for l in e.labels[1:]) for e in chunk)))
    loss_sum = torch.zeros(())
    tokens = 0
    for mb in micro:
        b = {k: v.to(device) for k, v in collate(mb, pad).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
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
    return loss_sum.item(), tokens


class _StopSignals:
    """Ctrl-C (SIGINT) and SIGTERM (Slurm preemption, docker stop) both ask the loop to stop after
    the current step and save a checkpoint. Under torchrun every process gets the signal; the flag is
    also all-reduced each step so that all of them stop at the same step."""

    def __init__(self, world: int):
        self.flag = False
        self.signum: int | None = None
        self.world = world
        self.old = {s: signal.signal(s, self._on) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on(self, signum, frame) -> None:
        self.request(signum)

    def request(self, signum: int | None) -> None:
        self.flag = True
        if signum is not None:
            self.signum = signum

    def requested(self) -> bool:
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([1.0 if self.flag else 0.0])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            self.flag = bool(t.item())
        return self.flag

    def restore(self) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)


def count_parameters(model) -> int:
    """Parameters as the model has them: a 4-bit weight counts its out x in values, not its bytes."""
    from ..nn import Linear4bit

    packed = set()
    total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            packed.add(id(m.weight))
            total += m.out_features * m.in_features
    return total + sum(p.numel() for p in model.parameters() if id(p) not in packed)


def check_causal_lm(root: Path) -> None:
    """`train` needs a decoder-only causal LM: refuse encoders (BERT) and encoder-decoders (T5)."""
    try:
        cfg = json.loads((Path(root) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # load_model reports a missing or broken config.json
    arch = (cfg.get("architectures") or [None])[0]
    if cfg.get("is_encoder_decoder"):
        raise FormatError(f"{root}: {arch or cfg.get('model_type')} is an encoder-decoder model; train needs a decoder-only causal LM",
                          hint="train on a *ForCausalLM model (Llama, Mistral, Qwen, ...)")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if arch and arch not in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        raise FormatError(f"{root}: {arch} is not a causal language model; train needs a decoder-only causal LM",
                          hint="train on a *ForCausalLM model (Llama, Mistral, Qwen, ...)")


def config_identity(root: Path) -> str:
    """The base model as a checkpoint remembers it: a digest of its config.json (the same model
    given as a relative path, an absolute path or a Hub id resolves to the same identity)."""
    import hashlib

    return "config-sha256:" + hashlib.sha256((Path(root) / "config.json").read_bytes()).hexdigest()[:16]


def read_data(data, tok, o: dict):
    """(training examples, evaluation examples, {name: DataReport}); refuses a run left with none."""
    strict = o["strict_data"]
    kw = dict(fmt=o["fmt"], max_length=o["max_length"], train_on_inputs=o["train_on_inputs"], truncation=o["truncation"], strict=strict)
    reports = {"data": DataReport(str(data))}
    recs = load_records(data, split=o["data_split"], config=o["data_config"], strict=strict, report=reports["data"])
    examples = build_examples(recs, tok, source=str(data), report=reports["data"], **kw)
    _none_left(examples, reports["data"], "--data")
    eval_examples: list = []
    if o["eval_data"]:
        reports["eval data"] = DataReport(str(o["eval_data"]))
        recs = load_records(o["eval_data"], strict=strict, report=reports["eval data"])
        eval_examples = build_examples(recs, tok, source=str(o["eval_data"]), report=reports["eval data"], **kw)
        _none_left(eval_examples, reports["eval data"], "--eval-data")
    elif o["eval_split"] > 0:
        n_eval = max(1, int(len(examples) * o["eval_split"]))
        if n_eval >= len(examples):
            raise DataError(f"--eval-split {o['eval_split']} of {len(examples)} examples leaves none to train on",
                            hint="lower --eval-split or give more data")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(o["seed"])).tolist()
        eval_examples = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in sorted(order[n_eval:])]
    if o["packing"]:
        examples = pack(examples, o["max_length"])
    return examples, eval_examples, reports


def _none_left(examples: list, report: DataReport, flag: str) -> None:
    if examples:
        return
    why = f" (all {report.n_dropped} dropped; first: {report.first_problem(90)})" if report.problems else ""
    raise DataError(f"{flag} {report.source}: no usable example{why}", hint="check the records' shape")


def make_plan(examples, eval_examples, o: dict, world: int) -> Plan:
    per_step = o["batch_size"] * o["grad_accum"] * world
    steps_per_epoch = max(1, len(examples) // per_step)
    total = o["max_steps"] or max(1, math.ceil(o["epochs"] * steps_per_epoch))
    save = o["save_steps"]
    if save is None:  # at each epoch's end, but at least 50 steps and a tenth of the run apart
        save = max(steps_per_epoch, math.ceil(total / 10), AUTO_SAVE_MIN_STEPS)
    ev = o["eval_steps"]
    if ev is None:
        ev = save
    return Plan(examples=len(examples), eval_examples=len(eval_examples), tokens=sum(len(e.input_ids) for e in examples),
                label_tokens=sum(sum(l != -100 for l in e.labels[1:]) for e in examples), batch_size=o["batch_size"],
                grad_accum=o["grad_accum"], world=world, steps_per_epoch=steps_per_epoch, total_steps=total,
                warmup_steps=int(o["warmup_ratio"] * total), save_steps=save, eval_steps=ev)


def _save_text(plan: Plan, out: Path, o: dict) -> str:
    if plan.save_steps and plan.save_steps < plan.total_steps:
        keep = f"the newest {o['save_total_limit']} kept" if o["save_total_limit"] else "all kept"
        text = f"checkpoints: every {plan.save_steps} steps into {out}/checkpoint-N ({keep})"
    else:
        text = "checkpoints: none before the end (--save-steps); Ctrl-C or SIGTERM saves one"
    if plan.eval_examples:
        often = plan.eval_steps and plan.eval_steps < plan.total_steps
        text += f"; evaluation every {plan.eval_steps} steps and at the end" if often else "; evaluation at the end"
    return text


def _checkpoint(model, optimizer, sched, step, out, o, rank, world, signature, show) -> Path | None:
    path = save_checkpoint(model, optimizer, sched, step, out, o["save_total_limit"], rank, world, signature)
    if rank == 0:
        _plot(out)
        show(f"step {step}: saved {path}")
    return path


def _plot(out: Path) -> None:
    from .plot import write_loss_plot

    write_loss_plot(out / "metrics.jsonl", out / "loss.png")


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _tensorboard(out: Path):
    try:  # TensorBoard when it is installed
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "runs"))


def final_lines(out: Path, step: int, elapsed: float, loss, eval_loss, ckpts: list[Path], device) -> list[str]:
    head = f"done: {step} steps in {elapsed:.1f} s; final loss {loss:.4f}" if loss is not None else f"done: {step} steps"
    if eval_loss is not None:
        head += f", eval loss {eval_loss:.4f}"
    lines = [head + f"; memory {memory_text(device)}",
             f"  adapter: {out}/adapter_model.safetensors + adapter_config.json (PEFT), card {out}/README.md",
             f"  metrics: {out}/metrics.jsonl; loss curve: {out}/loss.png",
             f"  configuration: {out}/config.yaml (repeat the run with --config {out}/config.yaml)"]
    if ckpts:
        lines.append(f"  checkpoints: {', '.join(c.name for c in ckpts)} in {out}")
    return lines

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
            f"lr {info['lr']}, final training loss {info['final_loss']:.4f}"
            + (f", evaluation loss {info['eval_loss']:.4f}" if info.get("eval_loss") is not None else "")
            + ".\n\n![Training and evaluation loss against step, learning rate on the right axis](loss.png)\n\nLoad with PEFT: "
            f"`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(\"{base_id}\"), \"{out.name}\")`.\n")
    (tmp / "README.md").write_text(render_card({"base_model": base_id, "base_model_relation": "adapter", "library_name": "peft",
                                                 "tags": ["qconvert", "lora", "qlora"]}, body))
    for f in ("adapter_model.safetensors", "README.md", "adapter_config.json"):  # the config last
        os.replace(tmp / f, out / f)
    shutil.rmtree(tmp, ignore_errors=True)
