"""bitsandbytes' optimizers (paged and 8-bit AdamW) over FSDP2's sharded parameters.

bitsandbytes' optimizers hand each parameter's storage to their own kernels, which do not take
the DTensor parameters FSDP2 makes (bitsandbytes issue #1633). Each process only ever updates its
own rows, so :class:`ShardedBnb` gives a bitsandbytes optimizer the *local shard* of every parameter
(a plain tensor sharing its storage with the DTensor) and that shard's gradient, and the optimizer
runs exactly as it would on a parameter of that size: its state (8-bit blocks of 256 values, or
32-bit; paged on CUDA) lives with the shard. The update of an element never depends on another
element (AdamW is elementwise); only the 8-bit state's block scales cover 256 consecutive values of
the shard, so they follow the shard's bounds (and bitsandbytes keeps a tensor under 4,096 values in
32-bit, judged by the shard's size).

For checkpoints (fsdp_checkpoint.py) the state is shown as torch's AdamW shows it: ``step`` and the two
moments ``exp_avg``/``exp_avg_sq`` in float32, as DTensors placed like their parameter, so a
checkpoint can be read back by any number of processes. 8-bit moments are dequantized for that; as
re-quantizing a dequantized block does not always give its codes back, each process also writes
its exact 8-bit state (:meth:`ShardedBnb.save_exact`), which a resume on the same number of
processes reads instead (:meth:`ShardedBnb.load_exact`).
"""

from __future__ import annotations

from pathlib import Path

import torch

#: bitsandbytes' 8-bit optimizer state: block size of its scales, and the keys of the 8-bit parts
BLOCK = 256
_QUANT = ("state1", "state2", "absmax1", "absmax2")
_MOMENTS = (("state1", "absmax1", "qmap1", "exp_avg"), ("state2", "absmax2", "qmap2", "exp_avg_sq"))


def _local(p: torch.Tensor) -> torch.Tensor:
    """The process's own rows of ``p``: the tensor itself (not a copy) when p is a DTensor."""
    from torch.distributed.tensor import DTensor

    return p._local_tensor if isinstance(p, DTensor) else p


class ShardedBnb(torch.optim.Optimizer):
    """A bitsandbytes optimizer over the local shards of FSDP2's parameters (see the module).

    ``param_groups`` hold the model's own (DTensor) parameters, so learning-rate schedules,
    ``zero_grad`` and the checkpoint's ``state_dict``/``load_state_dict`` work as with torch's
    optimizers; ``make(tensors)`` builds the bitsandbytes optimizer over the shards."""

    def __init__(self, params, make):
        params = list(params)
        self._shards = [_local(p) for p in params]
        self.inner = make(self._shards)
        super().__init__(params, dict(self.inner.defaults))

    def _sync(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, shard) pairs, with the inner optimizer pointed at the current shard objects
        (FSDP may replace a parameter's local tensor when it sets up) and its settings (lr) copied."""
        pairs = []
        flat = [p for g in self.param_groups for p in g["params"]]
        inner_groups = self.inner.param_groups
        for group, inner in zip(self.param_groups, inner_groups):
            inner.update({k: v for k, v in group.items() if k != "params"})
        i = 0
        for inner in inner_groups:
            for j, old in enumerate(inner["params"]):
                new = _local(flat[i])
                if not new.is_contiguous():  # bitsandbytes would update a contiguous copy, not the shard
                    raise RuntimeError(f"parameter {i}'s local shard is not contiguous; bitsandbytes cannot update it in place")
                if new is not old:
                    inner["params"][j] = new
                    if old in self.inner.state:
                        self.inner.state[new] = self.inner.state.pop(old)
                pairs.append((flat[i], new))
                i += 1
        return pairs

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pairs = self._sync()
        for p, shard in pairs:
            shard.grad = None if p.grad is None else _local(p.grad)
        try:
            self.inner.step()
        finally:
            for p, shard in pairs:
                shard.grad = None
                if shard in self.inner.state:
                    self.state[p] = self.inner.state[shard]  # one dict: what state_dict reads
        return loss

    # ---- checkpoints: torch's AdamW names, float32, placed like the parameter ----

    def _moment(self, p: torch.Tensor, s: dict, key: str, absmax: str, qmap: str) -> torch.Tensor:
        t = s[key]
        if t.dtype == torch.uint8:
            import bitsandbytes.functional as F

            t = F.dequantize_blockwise(t.reshape(-1), absmax=s[absmax], code=s[qmap], blocksize=BLOCK).view(t.shape)
        return _as_param(p, t.float().clone())

    def state_dict(self) -> dict:
        state, groups, i = {}, [], 0
        for group in self.param_groups:
            ids = []
            for p in group["params"]:
                s = self.state.get(p)
                if s:
                    state[i] = {"step": torch.tensor(float(s["step"]))}
                    for key, absmax, qmap, name in _MOMENTS:
                        state[i][name] = self._moment(p, s, key, absmax, qmap)
                ids.append(i)
                i += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        return {"state": state, "param_groups": groups}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        pairs = self._sync()
        # the saved groups list the parameters in this optimizer's order (by index, or by name), as
        # torch's own load_state_dict reads them
        keys = [k for g in state_dict["param_groups"] for k in g["params"]]
        if len(keys) != len(pairs):
            raise ValueError(f"optimizer state for {len(keys)} parameters, this optimizer has {len(pairs)}")
        for i, (p, shard) in enumerate(pairs):
            saved = state_dict["state"].get(keys[i])
            if saved is None:
                continue
            s = self._inner_state(i, shard)
            s["step"] = int(_local(saved["step"]).item())
            for key, absmax, qmap, name in _MOMENTS:
                value = _local(saved[name]).to(shard.device, torch.float32)
                if s[key].dtype == torch.uint8:
                    codes, scales = requantize(value, s[qmap])
                    s[key].copy_(codes.view(s[key].shape))
                    s[absmax].copy_(scales)
                else:
                    s[key].copy_(value.view(s[key].shape))
            self.state[p] = s

    def _inner_state(self, index: int, shard: torch.Tensor) -> dict:
        """The bitsandbytes state of the index-th shard, made (zeros) if this run has not stepped yet."""
        if not self.inner.state.get(shard):
            g = 0
            for g, group in enumerate(self.inner.param_groups):
                if index < len(group["params"]):
                    break
                index -= len(group["params"])
            self.inner.init_state(self.inner.param_groups[g], shard, g, index)
        return self.inner.state[shard]

    # ---- the exact 8-bit state, per process ----

    def _quantized(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, (_, shard) in enumerate(self._sync()):
            s = self.inner.state.get(shard) or {}
            if s.get("state1") is not None and s["state1"].dtype == torch.uint8:
                out.update({f"{i}.{k}": s[k].detach().cpu().clone() for k in _QUANT})
        return out

    def save_exact(self, folder: Path, rank: int, world: int) -> None:
        """This process's 8-bit state as it is (nothing when every state is 32-bit)."""
        from safetensors.torch import save

        from ..io.writes import write_file

        quantized = self._quantized()
        if quantized:
            write_file(folder / exact_name(rank, world), save(quantized, metadata={"world": str(world)}))

    @torch.no_grad()
    def load_exact(self, folder: Path, rank: int, world: int) -> bool | None:
        """Replace the re-quantized 8-bit state by the one this rank wrote, when the checkpoint was
        written by as many processes and the shapes agree. True when it was used; None when this
        optimizer holds no 8-bit state."""
        mine = self._quantized()
        if not mine:
            return None
        path = folder / exact_name(rank, world)
        if not path.is_file():
            return False
        saved = _read_if_fits(path, mine)
        if saved is None:
            return False
        for i, (_, shard) in enumerate(self._sync()):
            s = self.inner.state.get(shard) or {}
            for k in _QUANT:
                if f"{i}.{k}" in saved:
                    s[k].copy_(saved[f"{i}.{k}"].to(s[k].device))
        return True


def _read_if_fits(path: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The tensors of ``path`` when its header lists exactly ``like``'s names, shapes and dtypes
    (compared before any tensor is read); None when it does not."""
    from safetensors import safe_open

    from ..errors import DataError

    codes = {torch.uint8: "U8", torch.float32: "F32"}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            heads = {k: f.get_slice(k) for k in f.keys()}
            if set(heads) != set(like) or any((list(heads[k].get_shape()), heads[k].get_dtype()) != (list(t.shape), codes.get(t.dtype))
                                             for k, t in like.items()):
                return None
            return {k: f.get_tensor(k) for k in like}
    except Exception as e:  # safetensors' SafetensorError: a damaged header or a truncated file
        raise DataError(f"{path}: not a readable 8-bit optimizer state ({type(e).__name__})",
                        hint="the checkpoint is damaged; resume from an earlier checkpoint-N") from None


def requantize(x: torch.Tensor, qmap: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit codes and block scales of ``x`` on the code table ``qmap``, as bitsandbytes' optimizer
    keeps them: each block of ``block`` values scaled by its largest magnitude, each value the
    nearest code. A block's scale is recovered from dequantized values too: its largest value sits
    on the table's largest code (1.0), or its most negative one on the smallest (about -0.993 in the
    signed table), so ``x`` that came from such codes gets its codes and scales back (bitsandbytes'
    quantize_blockwise takes the largest magnitude alone, which is 0.993 of the scale in the second
    case, and then moves codes)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = torch.nn.functional.pad(flat, (0, (-n) % block)).view(-1, block)
    top, low = qmap.max(), qmap.min()
    scales = blocks.clamp(min=0).amax(1) / top
    if low < 0:
        scales = torch.maximum(scales, (-blocks).clamp(min=0).amax(1) / -low)
    safe = torch.where(scales > 0, scales, torch.ones(()))[:, None]
    table, order = qmap.float().sort()
    index = torch.bucketize(blocks / safe, (table[1:] + table[:-1]) / 2)
    return order[index].to(torch.uint8).reshape(-1)[:n], scales


def exact_name(rank: int, world: int) -> str:
    return f"optimizer-8bit-rank{rank}-of-{world}.safetensors"


def _as_param(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (this process's rows) as a tensor placed like ``p``."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return local
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())
