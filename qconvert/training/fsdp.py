"""FSDP-QLoRA: `qconvert train --fsdp` shards the frozen 4-bit base and the adapter with PyTorch FSDP2.

Each transformer block (the model's ``_no_split_modules`` classes), the input embedding and the
output head (unless tied), and then the whole model become ``torch.distributed.fsdp.fully_shard``
units over a 1-D device mesh of all processes. Every parameter of a unit is a DTensor sharded along dim 0: the packed 4-bit codes (``weight``, uint8),
the block scales (``absmax``, and ``nested_absmax`` under double quantization, turned from buffers
into frozen Parameters by :func:`scales_to_parameters` so that FSDP shards them too), the
unquantized tensors (norms, embeddings, head) and the LoRA weights, whose gradients are
reduce-scattered and whose optimizer state lives with their shard. FSDP gathers a block's tensors
for its forward (and again for its backward) and frees them after, so between blocks a process
holds about 1/N of the model. The 16-entry code table and the 256-entry nested table stay
replicated buffers.

The loss of a step is already normalised by the global batch's label tokens, so gradients must be
SUMMED across processes: FSDP2 averages by default, and :func:`shard` sets every unit's gradient
divide factor to 1.

Loading: the model is first built by :func:`qconvert.load_model` on the CPU, whose tensors are
zero-copy views of the memory-mapped safetensors files; ``fully_shard`` copies each process's own
rows out of them (moving them to the GPU when the mesh is on CUDA), so a process reads only its
share of the file's pages (the reader's checks also read every block-scale table, about 1/32 of
the codes' bytes) and keeps only its shard once the views are dropped (measured in docs/train.md).

Checkpoints (:func:`save_sharded`, :func:`load_sharded`): ``checkpoint-N/sharded/`` holds the LoRA
weights and the optimizer state, one safetensors file per process and a JSON manifest, readable by
any number of processes and loaded without pickle (fsdp_checkpoint.py); ``trainer_state.safetensors`` holds the rest (scheduler, step, every
rank's RNG state) and ``adapter_model.safetensors`` the gathered adapter, as a single-process
checkpoint does. bitsandbytes' optimizers run on each process's shards (bnb_shards.py), whose
8-bit state is also written as it is, per process, next to the sharded files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import DataError, OptionError

SHARDED = "sharded"
#: set once this process has made a torch.distributed process group for training (qconvert.cli.main.run reads it)
GROUP_USED = False


def ensure_group(world: int, device: torch.device) -> bool:
    """A process group for FSDP. torchrun's is made by the loop; a single process without torchrun
    gets a one-process group here (FSDP over one process: the CPU-offload case). True when this
    function made it (and :func:`end_group` should destroy it)."""
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    if world != 1:
        raise OptionError("--fsdp: no process group", hint="launch with torchrun --nproc-per-node N")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    mark_group_used()
    return True


def mark_group_used() -> None:
    global GROUP_USED
    GROUP_USED = True


def leave_process(code: int) -> None:
    """End a process that used a process group, after the group was destroyed: output flushed, then
    ``os._exit``, skipping interpreter finalization, where gloo aborted about once in ten loaded runs
    ("terminate called without an active exception") while freeing what still referred to the group."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_group(made: bool) -> None:
    if made:
        import torch.distributed as dist

        dist.destroy_process_group()


def scales_to_parameters(model) -> int:
    """Turn every Linear4bit's block scales (``absmax``, ``nested_absmax``) from buffers into frozen
    Parameters, so that FSDP shards them with the packed codes. Returns how many were turned."""
    from ..nn.linear4bit import Linear4bit

    n = 0
    for m in model.modules():
        if not isinstance(m, Linear4bit):
            continue
        for name in ("absmax", "nested_absmax"):
            t = m._buffers.get(name)
            if t is None:
                continue
            del m._buffers[name]
            m.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
            n += 1
    return n


def blocks(model) -> list[torch.nn.Module]:
    """The transformer blocks: modules of the classes transformers never splits across devices."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(inner, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if not found:
        raise OptionError(f"--fsdp: {type(inner).__name__} names no transformer block class (_no_split_modules)",
                          hint="train this model without --fsdp")
    return found


def _ends(model) -> list[torch.nn.Module]:
    """The input embedding and the output head as units of their own (gathered only around their own
    forward and backward, not for the whole step as the root unit is), unless they share a weight."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    if emb is None or head is None or head.weight is emb.weight:
        return []
    return [emb, head]


#: glibc's mallopt parameters, and the fixed threshold set for FSDP runs (see fixed_mmap_threshold)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 128 * 1024


def fixed_mmap_threshold() -> bool:
    """Give freed host buffers back to the system (glibc on Linux; elsewhere nothing is done).

    FSDP allocates and frees a gathered copy of every unit twice per step. glibc serves a large
    buffer with mmap and returns it on free, but after the first such free it raises its mmap
    threshold to that size, so later gathers come from the heap, whose freed memory stays in the
    process: measured on CPU (gloo, 2 processes, a 210 MiB 4-bit base), the resident memory after one
    forward and backward was 1,262 MiB with the default and 658 MiB with the threshold fixed at 128 KiB
    (830 MiB unsharded). Fixing the threshold turns that adjustment off. Returns True when set."""
    import ctypes
    import platform

    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    mallopt(_M_TRIM_THRESHOLD, MMAP_THRESHOLD)
    return ok


def shard(model, world: int, device: torch.device, offload: bool) -> None:
    """fully_shard each block, then the whole model; gradients summed (not averaged) across processes.
    ``offload``: sharded parameters, gradients and optimizer state stay in (pinned) host memory and
    only a block being computed is copied to the device (FSDP2's CPUOffloadPolicy)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard

    fixed_mmap_threshold()  # the gathered copies' host memory is returned once freed
    mesh = init_device_mesh(device.type, (world,))
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    scales_to_parameters(model)
    for unit in [*blocks(model), *_ends(model)]:
        fully_shard(unit, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM; nothing to scale)


def local_bytes(model, frozen: bool = True) -> tuple[int, int]:
    """(bytes this process holds, bytes of the whole) over the frozen (or trainable) parameters,
    from the sharded tensors' local sizes."""
    from torch.distributed.tensor import DTensor

    mine = whole = 0
    for p in model.parameters():
        if p.requires_grad == frozen:
            continue
        size = p.element_size()
        local = p.to_local() if isinstance(p, DTensor) else p
        mine += local.numel() * size
        whole += p.numel() * size
    return mine, whole


def full_adapter(model) -> dict[str, torch.Tensor]:
    """The trainable tensors gathered to full size on the CPU (a collective: every process calls it),
    under the model's own names, for PEFT's save_pretrained(state_dict=...)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.detach()
            out[name] = (t.full_tensor() if isinstance(t, DTensor) else t).cpu()
    return out


def save_sharded(model, optimizer, folder: Path) -> None:
    """The LoRA shards and the optimizer state into ``folder/sharded`` (every process writes its own
    file, process 0 the manifest; fsdp_checkpoint.py: safetensors and JSON, no pickle)."""
    from ..io.writes import make_dir
    from . import fsdp_checkpoint

    make_dir(folder / SHARDED, exist_ok=True)  # a link or file planted at that name is refused
    fsdp_checkpoint.save(model, optimizer, folder / SHARDED, *_rank_world())
    if hasattr(optimizer, "save_exact"):  # bitsandbytes' 8-bit state as it is, per process (bnb_shards.py)
        optimizer.save_exact(folder / SHARDED, *_rank_world())
    if _rank_world()[1] > 1:  # the checkpoint is whole (process 0's manifest written) when any process returns
        import torch.distributed as dist

        dist.barrier()


def load_sharded(model, optimizer, folder: Path) -> str | None:
    """Read ``folder/sharded`` back into this run's shards, whatever the process count that wrote it.
    Returns a note to show when bitsandbytes' 8-bit state could not be restored bit for bit."""
    from . import fsdp_checkpoint

    if not (folder / SHARDED).is_dir():
        raise DataError(f"{folder}: a checkpoint written without --fsdp", hint="resume it without --fsdp")
    rank, world = _rank_world()
    try:
        checked = fsdp_checkpoint.check(model, optimizer, folder / SHARDED)
    except Exception as e:
        _agree(e, folder)
        raise
    _agree(None, folder)
    fsdp_checkpoint.apply(checked, optimizer, rank, world)
    if hasattr(optimizer, "load_exact"):  # bitsandbytes' 8-bit state as it was written, when the shards are the same
        if optimizer.load_exact(folder / SHARDED, rank, world) is False:
            return (f"note: {folder} was written by another number of processes than {world}: "
                    f"the 8-bit optimizer state re-quantized from its float32 copy (not bit for bit the state it had)")
    return None


def _agree(error: BaseException | None, folder: Path) -> None:
    """Every process checks the whole checkpoint, then learns whether any refused it (a collective),
    so that all fail together, each with its own line, and the launcher shows rank 0's: a process
    that failed alone would leave the others waiting in their next collective. Raises a DataError on
    a process that found nothing wrong when another did (the caller raises its own error)."""
    import torch.distributed as dist

    if dist.get_world_size() == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([0 if error is None else dist.get_rank() + 1], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    failed = int(flag.item())
    if failed and error is None:
        raise DataError(f"{folder}: process {failed - 1} refused this checkpoint", hint="see that process's message")


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.2f} GiB"


def _compute_bytes(model) -> int:
    """Bytes per activation value: the element size of the model's floating tensors (its compute dtype)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.element_size()
    return 4


def activation_bytes(model, *, tokens: int, checkpointing: bool) -> int:
    """What the forward keeps for the backward, at most, for ``tokens`` tokens (batch x length).

    Per block, per token, in the compute dtype: 10 x hidden + 3 x intermediate values (the norms'
    and projections' inputs, q/k/v, the attention output, the MLP's gate, up and product), and, when
    LoRA drops out its inputs, each LoRA layer's dropped input plus its one-byte mask. Then the
    logits and their float32 copy for the loss. With gradient checkpointing only each block's input
    is kept, plus one block's worth while it is recomputed. Attention's scores are not counted
    (fused attention does not keep them). Checked against the bytes autograd saves, measured with
    saved-tensor hooks on a small Llama (tests/test_fsdp.py)."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", 0) or 0
    layers = getattr(cfg, "num_hidden_layers", 0) or 0
    inter = getattr(cfg, "intermediate_size", 4 * hidden) or 4 * hidden
    size = _compute_bytes(model)
    per_token = (10 * hidden + 3 * inter) * size
    peft_cfg = getattr(model, "peft_config", {}).get("default") if hasattr(model, "peft_config") else None
    if peft_cfg is not None and getattr(peft_cfg, "lora_dropout", 0) > 0:
        one = next(iter(blocks(model)), None) if layers else None
        inputs = sum(m.in_features for m in (one.modules() if one is not None else ()) if hasattr(m, "lora_A") and hasattr(m, "in_features"))
        per_token += inputs * (size + 1)
    one_block = tokens * per_token
    acts = tokens * hidden * size * layers + one_block if checkpointing else one_block * layers
    return acts + tokens * (getattr(cfg, "vocab_size", 0) or 0) * (size + 4)  # logits and their float32 copy


def memory_estimate(model, *, world: int, fsdp: bool, offload: bool, optim: str, batch_size: int, max_length: int,
                    checkpointing: bool, device_type: str = "cuda") -> str:
    """One start line: what a process will hold (before sharding is applied), by part."""
    base = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    base += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter = sum(p.numel() * p.element_size() for p in trainable)
    n = sum(p.numel() for p in trainable)
    optim_bytes = n * (2 if "8bit" in optim else 8)
    per_block = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks(model)] if fsdp else [0]
    acts = activation_bytes(model, tokens=batch_size * max_length, checkpointing=checkpointing)
    share = world if fsdp else 1
    held = (base + 2 * adapter + optim_bytes) / share
    gathered = 2 * max(per_block)  # the block computed and the next one prefetched
    on_device = (gathered + acts) if offload else held + gathered + acts
    mode = f"FSDP over {world}" if fsdp else (f"DDP, {world} full copies" if world > 1 else "1 process")
    text = (f"memory estimate per process ({mode}): 4-bit base {_mb(base / share)}"
            + (f" (1/{world} of {_mb(base)})" if fsdp and world > 1 else "")
            + f", adapter + gradients {_mb(2 * adapter / share)}, optimizer {_mb(optim_bytes / share)}")
    if fsdp:
        text += f", 2 gathered blocks {_mb(gathered)}"
    text += f", activations ~{_mb(acts)} (batch {batch_size} x {max_length} tokens at most); ~{_mb(on_device)} on {device_type}"
    if offload:
        text += f" + {_mb(held)} in host memory (offloaded)"
    return text


def local_rank_device() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
