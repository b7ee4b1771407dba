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

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DataError, FormatError, OptionError
from ..model.checks import check_positions, position_limit
from .checkpoint import check_compatible, find_resume, load_state, run_signature, save_checkpoint, set_rng_state
from .data import (PROMPT_FORMAT_FILE, DataReport, build_examples, check_token_ids, collate, data_label, load_records, pack,
                   prompt_format, prompt_format_text)
from .outdir import claim_output
from .report import Plan, data_lines, memory_text, on_terminal, start_lines, step_line
from .resume import resumed_config, run_settings
from .score import label_loss_sum, loss_sums
from .settings import OPTIMIZERS, TrainConfig

AUTO_SAVE_MIN_STEPS = 50


def _dist():
    """(rank, world, made) — torch.distributed initialised from torchrun's environment when present;
    ``made``: this call created the process group (and :func:`_end_dist` destroys it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import torch.distributed as dist

        made = not dist.is_initialized()
        if made:
            from .fsdp import mark_group_used

            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
            mark_group_used()
        return dist.get_rank(), world, made
    return 0, 1, False


def _end_dist(made: bool, finished: bool) -> None:
    """Destroy the process group :func:`_dist` made. After a finished or interrupted run every
    process first waits for the others (one leaving early can abort another's teardown); after an
    error it cannot, as another process may never arrive."""
    if not made:
        return
    import torch.distributed as dist

    if finished:
        dist.barrier()
    dist.destroy_process_group()


def make_optimizer(name: str, params, lr: float, device: torch.device, say: Callable[[str], None], sharded: bool = False):
    """The optimizer ``name`` over ``params`` and the name of the one used. bitsandbytes' optimizers
    on CUDA; off CUDA its 8-bit AdamW (its CPU kernels; nothing is paged there) for the 8-bit
    choices and torch's AdamW for the 32-bit ones. ``sharded``: the parameters are FSDP's DTensors
    (bitsandbytes then updates each process's shard, see bnb_shards.py)."""
    if name not in OPTIMIZERS:
        raise DataError(f"unknown --optim {name!r}", hint=f"use one of {', '.join(OPTIMIZERS)}")
    params = list(params)
    if name == "adamw" or (device.type != "cuda" and "8bit" not in name):
        if name != "adamw":
            say(f"note: {name} needs a CUDA device; using torch AdamW (32-bit, not paged) on {device.type}")
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), "adamw"
    import bitsandbytes as bnb

    used = name if device.type == "cuda" else "adamw_8bit"
    if used != name:
        say(f"note: {name}: bitsandbytes pages optimizer state on CUDA only; using its 8-bit AdamW, not paged, on {device.type}")
    cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
           "adamw_8bit": bnb.optim.AdamW8bit}[used]

    def make(tensors):
        return cls(tensors, lr=lr, weight_decay=0.0)

    if sharded:
        from .bnb_shards import ShardedBnb

        return ShardedBnb(params, make), used
    return make(params), used


def lr_lambda(kind: str, warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if kind == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def base_model_id(model_path: str, repo_id: str | None) -> str:
    """What the adapter names as its base: the Hub id when the model came from the Hub (never the
    local cache path it was downloaded to), else the folder as the user gave it."""
    return repo_id or str(model_path)


def train(
    model: str,
    data: str | os.PathLike | Any,
    output: str | os.PathLike,
    config: TrainConfig | None = None,
    *,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
    config_file: str | os.PathLike | None = None,
    keep_quantized: str | os.PathLike | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train a LoRA adapter on the frozen 4-bit ``model``; see the module docstring and the README.

    The run's options are ``config`` (a :class:`qconvert.training.settings.TrainConfig`; default: its
    defaults) with ``options`` over it, the same names as keywords (``lr=1e-3, max_steps=10``);
    each option, its default and its range are described there. Every value is checked before
    anything is loaded (OptionError). ``config_file``: the --config file the options came from
    (an input: the output may not be it, lie inside it or hold it). The output folder's rules are
    in outdir.py. ``data``: a file, folder or Hub dataset id, or the records themselves (a
    ``datasets.Dataset`` or a list of dicts, as SFTTrainer takes them; data.py). A 16-bit ``model`` is quantized on the way in (convert/on_load.py), into
    ``keep_quantized`` when given, else a temporary folder; the adapter names ``model`` as its base.
    Returns {"interrupted", "step", "loss", "eval_loss", "optimizer", "examples", "steps_per_epoch"}."""
    cfg = TrainConfig.of(config, options)
    cfg.check()
    same_folder = Path(model).is_dir() and Path(output).resolve() == Path(model).resolve()
    if same_folder and not (cfg.resume and cfg.overwrite):  # (both given: prepare_output says they contradict)
        raise OptionError(f"--output {output} is the model folder itself",
                          hint="give --output a folder of its own: the adapter would be written into the model (and its card replaced)")
    rank, world, made = _dist()
    finished = False
    try:
        say = (log or (lambda m: None)) if rank == 0 else (lambda m: None)
        out = Path(output)
        with contextlib.ExitStack() as held:
            path_data = data if isinstance(data, (str, os.PathLike)) else None  # else records given as objects (data.py)
            claim_output(out, cfg.resume, cfg.overwrite, (model, path_data, cfg.eval_data, config_file), rank, world, held)
            ckpt_dir = find_resume(out, cfg.resume)
            st = load_state(ckpt_dir) if ckpt_dir is not None else None  # a crafted file is refused before the model loads
            if st is not None:  # the run's own settings; a given option that contradicts them is refused (resume.py)
                cfg = resumed_config(cfg, st.get("settings"), world, ckpt_dir, say)
            from ..convert.on_load import four_bit_base

            base = four_bit_base(model, cfg.revision, keep_quantized, held, say, world)
            with warnings.catch_warnings():
                # transformers' deprecation notices (gradient_checkpointing_enable...) are not the user's to act on
                warnings.simplefilter("ignore", FutureWarning)
                result = _train(model, data, out, cfg, cfg.target_modules, rank, world, say, progress, (ckpt_dir, st), base)
        finished = True
        return result
    finally:
        _end_dist(made, finished)


def _train(model, data, out: Path, o: TrainConfig, targets, rank: int, world: int, say, progress, resumed, base=None) -> dict[str, Any]:
    from ..io.source import resolve_model_path
    from . import fsdp as fs

    random.seed(o.seed)
    torch.manual_seed(o.seed)
    root, repo_id = resolve_model_path(base or model, None if base else o.revision)  # base: the local 4-bit copy of a 16-bit model
    check_causal_lm(root)
    tok = _tokenizer(root)
    examples, eval_examples, reports = read_data(data, tok, o)
    ckpt_dir, st = resumed
    device = fs.local_rank_device()
    made_group = fs.ensure_group(world, device) if o.fsdp else False
    try:
        r = _Run(o, out, rank, world, device, say)
        r.setup_model(root, targets)
        check_token_ids(examples + eval_examples, r.model.get_input_embeddings(), tok, data_label(data))
        check_positions(max(len(e.input_ids) for e in examples + eval_examples), position_limit(r.model), data_label(data),
                        hint="pass --max-length {limit} or lower")
        r.plan = make_plan(examples, eval_examples, o, world)
        r.sched = torch.optim.lr_scheduler.LambdaLR(r.optimizer, lr_lambda(o.lr_scheduler, r.plan.warmup_steps, r.plan.total_steps))
        if ckpt_dir is not None:
            r.resume(ckpt_dir, st)
        r.prepare_outputs(model, data if isinstance(data, (str, os.PathLike)) else None, ckpt_dir)  # records given as objects: none to name
        r.report_start(reports, targets)
        r.data_format = _trained_format(reports["data"], o.fmt)
        r.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        result = r.run(examples, eval_examples, progress)
        if result.get("interrupted"):
            return result
        r.finish(o.base_model_id or base_model_id(model, repo_id), len(examples), reports["data"].formats)
        return result
    finally:
        fs.end_group(made_group)


def _tokenizer(root: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(root)
    except Exception as e:  # transformers raises several types for a missing or broken tokenizer
        raise DataError(f"{root}: no usable tokenizer ({type(e).__name__})", hint="copy the tokenizer files into the model folder") from None


class _Run:
    """One training run's state, from the loaded model to the final adapter (`_train` drives it)."""

    def __init__(self, o: TrainConfig, out: Path, rank: int, world: int, device, say):
        self.o, self.out, self.rank, self.world, self.device, self.say = o, out, rank, world, device, say
        self.fsdp = bool(o.fsdp)
        self.step = 0
        self.last_loss = self.last_eval = None
        self.metrics_path = out / "metrics.jsonl"
        self.show = say
        self.memory_line = None
        self.settings = {"settings": run_settings(o, world)}  # recorded in each checkpoint, taken back on --resume

    def setup_model(self, root: Path, targets) -> None:
        """The 4-bit base, gradient checkpointing, LoRA, FSDP sharding (with --fsdp), the optimizer."""
        from peft import LoraConfig, get_peft_model

        from ..model.adapters import adapts_conv1d, module_targets_kept
        from ..model.loader import load_model
        from .targets import choose as choose_targets
        from . import fsdp as fs

        o = self.o
        # with --fsdp the whole model is built on the CPU as views of the mapped files; sharding copies each process's rows
        base = load_model(root, device=torch.device("cpu") if self.fsdp else self.device, backend=o.backend)
        self.targets = choose_targets(base, targets, o.lora_experts)
        base.config.use_cache = False  # no KV cache while training (and no notice about it)
        if o.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        # Targets by name (qconvert.training.targets), never PEFT's "all-linear", which also takes the routed experts'
        # 3-D parameters; those only with --lora-experts, where PEFT's parameter LoRA allows no dropout.
        dropout = 0.0 if self.targets.parameters else o.lora_dropout
        if dropout != o.lora_dropout:
            self.say(f"note: --lora-experts: LoRA dropout 0 (not {o.lora_dropout:g}): PEFT's LoRA on parameters cannot apply dropout")
            self.o = o = dataclasses.replace(o, lora_dropout=dropout)  # config.yaml records the dropout the run used
        self.cfg = LoraConfig(r=o.lora_r, lora_alpha=o.lora_alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                              target_modules=self.targets.modules, target_parameters=self.targets.parameters or None)
        torch.manual_seed(o.seed)
        from ..nn.experts4bit_lora import peft_sees_4bit_experts

        with module_targets_kept(), peft_sees_4bit_experts(base):
            self.model = get_peft_model(base, self.cfg)
        if adapts_conv1d(self.model):  # GPT-2 style: the 16-bit model stores these weights [in, out] (qconvert.model.adapters)
            self.model.peft_config["default"].fan_in_fan_out = True  # saved in adapter_config.json; the layers keep False
        self.signature = run_signature(config_identity(root), self.model.peft_config["default"])
        self.n_total = count_parameters(self.model)
        if self.fsdp:
            self.memory_line = fs.memory_estimate(self.model, world=self.world, fsdp=True, offload=o.fsdp_offload,
                                                  optim=o.optim, batch_size=o.batch_size, max_length=o.max_length,
                                                  checkpointing=o.gradient_checkpointing, device_type=self.device.type)
            fs.shard(self.model, self.world, self.device, o.fsdp_offload)
            mine, whole = fs.local_bytes(self.model)
            self.memory_line += f"\nFSDP: this process holds {mine:,} of the frozen base's {whole:,} bytes"
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, self.optim_used = make_optimizer(o.optim, self.params, o.lr, self.device, self.say, sharded=self.fsdp)

    def resume(self, ckpt_dir: Path, st: dict) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from . import fsdp as fs

        check_compatible(ckpt_dir, st, self.signature)
        if self.fsdp:
            note = fs.load_sharded(self.model, self.optimizer, ckpt_dir)
            if note:
                self.say(note)
            rng = st["rng"][self.rank % len(st["rng"])] if isinstance(st["rng"], list) else st["rng"]
        else:
            if "optimizer" not in st:
                raise DataError(f"{ckpt_dir}: a checkpoint written with --fsdp", hint="resume it with --fsdp")
            set_peft_model_state_dict(self.model, load_file(str(ckpt_dir / "adapter_model.safetensors")))
            self.optimizer.load_state_dict(st["optimizer"])
            rng = st["rng"][self.rank % len(st["rng"])] if isinstance(st["rng"], list) else st["rng"]
        self.sched.load_state_dict(st["scheduler"])
        self.step = st["step"]
        set_rng_state(rng)
        self.say(f"resumed from {ckpt_dir} at step {self.step}")

    def prepare_outputs(self, model, data, ckpt_dir) -> None:
        from ..io.writes import make_dir, remove
        from .config import resolved_config, write_config
        from .outdir import truncate_metrics

        if self.rank == 0:
            make_dir(self.out, exist_ok=True)  # a plain folder, never a link
            if ckpt_dir is None:
                remove(self.metrics_path)
            else:
                note = truncate_metrics(self.metrics_path, self.step)
                if note:
                    self.say(note)
            write_config(self.out / "config.yaml", resolved_config(model, data, self.out, self.o))

    def report_start(self, reports, targets) -> None:
        o = self.o
        n_trainable = sum(p.numel() for p in self.params)
        for name, rep in reports.items():
            for line in data_lines(name, rep, o.max_length, o.truncation, show_split=name == "eval data"):
                self.say(line)
        from .targets import describe

        lora_text = f"r {o.lora_r}, alpha {o.lora_alpha:g}, dropout {self.cfg.lora_dropout:g} on {describe(self.model, self.targets)}"
        for line in start_lines(self.plan, trainable=n_trainable, total_params=self.n_total, lora=lora_text, optim=self.optim_used,
                                lr=o.lr, scheduler=o.lr_scheduler, device=self.device, save_text=_save_text(self.plan, self.out, o)):
            self.say(line)
        if self.device.type == "cpu" and self.world == 1:  # torch's threads and why (_cpus.py)
            from .._cpus import thread_line

            self.say(thread_line())
        if self.memory_line:
            for line in self.memory_line.splitlines():
                self.say(line)

    def run(self, examples, eval_examples, progress) -> dict[str, Any]:
        """The step loop; returns the result dict (``interrupted`` when a signal or --stop-after ended it)."""
        o, plan = self.o, self.plan
        stop = _StopSignals(self.world)
        bar = None
        if self.rank == 0 and on_terminal(progress):
            from tqdm.auto import tqdm

            bar = tqdm(total=plan.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        self.bar = bar
        self.show = bar.write if bar else self.say
        self.tb = _tensorboard(self.out) if self.rank == 0 else None
        self.model.train()
        self.t_start = time.perf_counter()
        ran = 0
        try:
            while self.step < plan.total_steps:
                if stop.requested():
                    break
                self.one_step(examples)
                ran += 1
                last_step = self.step == plan.total_steps
                if eval_examples and ((plan.eval_steps and self.step % plan.eval_steps == 0) or last_step):
                    self.evaluate(eval_examples)
                if plan.save_steps and self.step % plan.save_steps == 0 and not last_step:
                    self.checkpoint(self.show)
                if o.stop_after is not None and ran >= o.stop_after:
                    stop.request(None)
            if stop.flag and self.step < plan.total_steps:
                self.checkpoint(lambda m: None)
                self.say(f"interrupted at step {self.step}: saved {self.out / f'checkpoint-{self.step}'}; resume with --resume")
                return {"interrupted": True, "step": self.step, "loss": self.last_loss, "signal": stop.signum}
        finally:
            if bar:
                bar.close()
            if self.tb:
                self.tb.close()
            stop.restore()
        return {"interrupted": False, "step": self.step, "loss": self.last_loss, "eval_loss": self.last_eval,
                "optimizer": self.optim_used, "examples": len(examples), "steps_per_epoch": plan.steps_per_epoch}

    def one_step(self, examples) -> None:
        o, plan, rank, world = self.o, self.plan, self.rank, self.world
        epoch, pos = divmod(self.step, plan.steps_per_epoch)
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(o.seed + epoch)).tolist()
        per_step = plan.effective_batch
        chunk = [examples[i] for i in order[pos * per_step : (pos + 1) * per_step]]
        t0 = time.perf_counter()
        self.last_loss, tokens = _step(self.model, chunk[rank::world], chunk, o.batch_size, self.pad, self.device, self.params, world,
                                       fsdp=self.fsdp)
        torch.nn.utils.clip_grad_norm_(self.params, o.max_grad_norm)
        self.optimizer.step()
        self.sched.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if rank == 0:
            self.log_row(tokens * world / (time.perf_counter() - t0))

    def log_row(self, tokens_per_s: float) -> None:
        step, plan, bar = self.step, self.plan, self.bar
        row = {"step": step, "loss": self.last_loss, "lr": self.sched.get_last_lr()[0], "tokens_per_s": tokens_per_s,
               "epoch": step / plan.steps_per_epoch}
        if step % self.o.logging_steps == 0 or step == plan.total_steps:
            _append(self.metrics_path, row)
            if self.tb:
                for key in ("loss", "lr", "tokens_per_s"):
                    self.tb.add_scalar(f"train/{key}", row[key], step)
            if not bar:
                self.say(step_line(step, plan.total_steps, row, time.perf_counter() - self.t_start))
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")

    def evaluate(self, eval_examples) -> None:
        """Rank 0 evaluates (every process does under FSDP: each forward gathers from all of them)."""
        if self.rank != 0 and not self.fsdp:
            return
        self.last_eval = evaluate(self.model, eval_examples, self.pad, self.o.batch_size, self.device)
        if self.rank != 0:
            return
        _append(self.metrics_path, {"step": self.step, "eval_loss": self.last_eval})
        if self.tb:
            self.tb.add_scalar("eval/loss", self.last_eval, self.step)
        self.show(f"step {self.step}/{self.plan.total_steps}  eval_loss {self.last_eval:.4f}")

    def checkpoint(self, show) -> None:
        o = self.o
        if self.fsdp:
            from .checkpoint import save_fsdp_checkpoint

            path = save_fsdp_checkpoint(self.model, self.optimizer, self.sched, self.step, self.out, o.save_total_limit, self.rank,
                                        self.world, self.signature, extra=self.settings)
        else:
            path = save_checkpoint(self.model, self.optimizer, self.sched, self.step, self.out, o.save_total_limit, self.rank,
                                   self.world, self.signature, extra=self.settings)
        if self.rank == 0:
            _plot(self.out)
            show(f"step {self.step}: saved {path}")

    def finish(self, base_id: str, n_examples: int, formats: dict | None = None) -> None:
        from . import fsdp as fs

        state = fs.full_adapter(self.model) if self.fsdp else None  # a collective: every process gathers
        if self.rank == 0:
            _write_adapter(self.model, self.out, base_id, self.cfg, {
                "steps": self.step, "examples": n_examples, "optimizer": self.optim_used, "lr": self.o.lr,
                "final_loss": self.last_loss, "eval_loss": self.last_eval, "formats": dict(formats or {}),
                "format": getattr(self, "data_format", None),
            }, state_dict=state)
            _plot(self.out)
        elapsed = time.perf_counter() - self.t_start
        from .outdir import run_checkpoints

        for line in final_lines(self.out, self.step, elapsed, self.last_loss, self.last_eval, run_checkpoints(self.out), self.device):
            self.say(line)


def _step(model, mine, chunk, batch_size: int, pad: int, device, params, world: int, fsdp: bool = False) -> tuple[float, int]:
    """Forward and backward over this process's share of one global batch; returns (loss, tokens).
    The loss is normalised by the label tokens of the whole global batch (every process's share).
    Under FSDP the gradients are reduce-scattered (summed) after the last micro-batch only."""
    micro = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
    n_tok = torch.tensor(float(sum(sum(l != -100 for l in e.labels[1:]) for e in chunk)))
    loss_sum = torch.zeros(())
    tokens = 0
    for i, mb in enumerate(micro):
        if fsdp:
            model.set_requires_gradient_sync(i == len(micro) - 1)
        b = {k: v.to(device) for k, v in collate(mb, pad).items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        loss = label_loss_sum(logits, b["labels"]) / n_tok
        loss.backward()
        loss_sum += loss.detach().cpu()
        tokens += int(b["attention_mask"].sum())
    if world > 1:
        import torch.distributed as dist

        if not fsdp:
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
    from ..nn.linear4bit import Linear4bit

    packed = set()
    total = 0
    for m in model.modules():
        if isinstance(m, Linear4bit):
            packed.add(id(m.weight))
            total += m.out_features * m.in_features
    return total + sum(p.numel() for p in model.parameters() if id(p) not in packed)


def check_causal_lm(root: Path) -> None:
    """`train` needs a decoder-only causal LM: refuse encoders (BERT) and encoder-decoders (T5)."""
    from ..model.checks import read_config

    try:
        cfg = read_config(Path(root))  # the one config.json reader, its size limit
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


def read_data(data, tok, o: TrainConfig):
    """(training examples, evaluation examples, {name: DataReport}); refuses a run left with none."""
    strict = o.strict_data
    kw = dict(fmt=o.fmt, max_length=o.max_length, train_on_inputs=o.train_on_inputs, truncation=o.truncation, strict=strict)
    reports = {"data": DataReport(data_label(data))}
    recs = load_records(data, split=o.data_split, config=o.data_config, strict=strict, report=reports["data"])
    examples = build_examples(recs, tok, source=data_label(data), report=reports["data"], **kw)
    _none_left(examples, reports["data"], "--data")
    eval_examples: list = []
    eval_source = o.eval_data or (data if o.eval_data_split else None)  # --eval-data-split alone: a split of --data
    if eval_source:
        rep = reports["eval data"] = DataReport(str(eval_source))
        same = str(eval_source) == str(data)
        recs = load_records(eval_source, split=o.eval_data_split, config=o.data_config if same else None, strict=strict,
                            report=rep, evaluation=True)
        if same and rep.split is not None and rep.split == reports["data"].split:
            raise DataError(f"{eval_source}: the evaluation split {rep.split!r} is the split trained on",
                            hint="name another split with --eval-data-split, or hold out a fraction of --data with --eval-split")
        eval_examples = build_examples(recs, tok, source=str(eval_source), report=rep, **kw)
        _none_left(eval_examples, rep, "--eval-data")
    elif o.eval_split > 0:
        n_eval = max(1, int(len(examples) * o.eval_split))
        if n_eval >= len(examples):
            raise DataError(f"--eval-split {o.eval_split} of {len(examples)} examples leaves none to train on",
                            hint="lower --eval-split or give more data")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(o.seed)).tolist()
        eval_examples = [examples[i] for i in order[:n_eval]]
        examples = [examples[i] for i in sorted(order[n_eval:])]
    if o.packing:
        examples = pack(examples, o.max_length)
    return examples, eval_examples, reports


def _trained_format(report: DataReport, fmt: str) -> str:
    """The format the adapter learned its prompts in: the option, or with auto the one most records had."""
    return fmt if fmt != "auto" or not report.formats else report.formats.most_common(1)[0][0]


def _none_left(examples: list, report: DataReport, flag: str) -> None:
    if examples:
        return
    why = f" (all {report.n_dropped} dropped; first: {report.first_problem(90)})" if report.problems else ""
    raise DataError(f"{flag} {report.source}: no usable example{why}", hint=report.first_hint or "check the records' shape")


def make_plan(examples, eval_examples, o: TrainConfig, world: int) -> Plan:
    per_step = o.batch_size * o.grad_accum * world
    steps_per_epoch = max(1, len(examples) // per_step)
    total = o.max_steps or max(1, math.ceil(o.epochs * steps_per_epoch))
    save = o.save_steps
    if save is None:  # at each epoch's end, but at least 50 steps and a tenth of the run apart
        save = max(steps_per_epoch, math.ceil(total / 10), AUTO_SAVE_MIN_STEPS)
    ev = o.eval_steps
    if ev is None:
        ev = save
    return Plan(examples=len(examples), eval_examples=len(eval_examples), tokens=sum(len(e.input_ids) for e in examples),
                label_tokens=sum(sum(l != -100 for l in e.labels[1:]) for e in examples), batch_size=o.batch_size,
                grad_accum=o.grad_accum, world=world, steps_per_epoch=steps_per_epoch, total_steps=total,
                warmup_steps=int(o.warmup_ratio * total), save_steps=save, eval_steps=ev)


def _save_text(plan: Plan, out: Path, o: TrainConfig) -> str:
    if plan.save_steps and plan.save_steps < plan.total_steps:
        keep = f"the newest {o.save_total_limit} kept" if o.save_total_limit else "all kept"
        text = f"checkpoints: every {plan.save_steps} steps into {out}/checkpoint-N ({keep})"
    else:
        text = "checkpoints: none before the end (--save-steps); Ctrl-C or SIGTERM saves one"
    if plan.eval_examples:
        often = plan.eval_steps and plan.eval_steps < plan.total_steps
        text += f"; evaluation every {plan.eval_steps} steps and at the end" if often else "; evaluation at the end"
    return text


def _plot(out: Path) -> None:
    from .plot import write_loss_plot

    write_loss_plot(out / "metrics.jsonl", out / "loss.png")


def _append(path: Path, row: dict) -> None:
    from ..io.writes import append_text

    append_text(path, json.dumps(row) + "\n")  # never through a link planted at metrics.jsonl


def _tensorboard(out: Path):
    try:  # TensorBoard when it is installed
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    from ..io.writes import make_dir

    return SummaryWriter(str(make_dir(out / "runs", exist_ok=True)))  # a plain folder, never a link


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
    """The eval loss train logs: the one scorer's token-weighted mean (score.py); 0.0 with no labelled token."""
    total, count = loss_sums(model, examples, pad, batch_size, device)
    return total / max(1, count)


def _write_adapter(model, out: Path, base_id: str, cfg, info: TrainConfig, state_dict: dict | None = None) -> None:
    from ..model.adapters import stable_adapter_config
    from ..io.cards import adapter_card, shown, usage_section
    from ..io.writes import building, fresh_dir, remove, replace_file, write_file

    tmp = fresh_dir(out, "adapter")  # made new, never a link followed; removed if the save fails
    with building(tmp, out / "adapter_model.safetensors"):
        model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        stable_adapter_config(tmp, base_model_name_or_path=base_id)
    body = (f"# LoRA adapter for {shown(base_id)}\n\nTrained with qconvert on a 4-bit NF4 base: r={cfg.r}, alpha={cfg.lora_alpha}, "
            f"dropout={cfg.lora_dropout}; {info['steps']} steps on {info['examples']} examples, optimizer {info['optimizer']}, "
            f"lr {info['lr']}, final training loss {info['final_loss']:.4f}"
            + (f", evaluation loss {info['eval_loss']:.4f}" if info.get("eval_loss") is not None else "")
            + ".\n\n![Training and evaluation loss against step, learning rate on the right axis](loss.png)\n\n"
            + usage_section(base_id, out.name, info.get("format")))  # a card never carries a local path (io/cards.shown)
    fmt = prompt_format(info.get("formats") or {})
    write_file(tmp / PROMPT_FORMAT_FILE, json.dumps(fmt, indent=2) + "\n")
    write_file(tmp / "README.md", adapter_card(base_id, body + prompt_format_text(fmt), extra_tags=("qlora",)))
    for f in ("adapter_model.safetensors", "README.md", PROMPT_FORMAT_FILE, "adapter_config.json"):  # the config last
        replace_file(tmp / f, out / f)  # a link at that name is replaced, never written through
    remove(tmp)
