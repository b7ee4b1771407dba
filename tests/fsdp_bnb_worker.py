"""Run under torchrun by test_fsdp.py: bitsandbytes' optimizers over FSDP2's shards (qconvert.training.bnb_shards)
against the same optimizer over the whole tensors, given the very same gradients, so that every update
must agree bit for bit; then a sharded checkpoint is written, read back into fresh shards, and both
runs go on. Each process writes what it found to OUT/rank{r}.json."""

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import finish_worker


def model() -> torch.nn.Module:
    """Tensors bitsandbytes keeps 8-bit per shard (16,384 and 16,896 values; 33 rows split 17/16, the
    bound still on a 256-value block) and a bias small enough to stay 32-bit."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(512, 33, bias=False), torch.nn.Linear(33, 512, bias=True))


def shard(m: torch.nn.Module, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    fully_shard(m[0], mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def steps(sharded, opt, ref, ref_opt, first: int, n: int) -> bool:
    """n steps with the same seeded gradients on both; True while every parameter agrees exactly."""
    from torch.distributed.tensor import distribute_tensor

    same = True
    for i in range(first, first + n):
        g = torch.Generator().manual_seed(i)
        for p, q in zip(sharded.parameters(), ref.parameters()):
            grad = torch.randn(q.shape, generator=g) * (i + 1)
            q.grad = grad
            p.grad = distribute_tensor(grad, p.device_mesh, p.placements)
        opt.step()
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        same &= all(torch.equal(p.full_tensor(), q.detach()) for p, q in zip(sharded.parameters(), ref.parameters()))
    return same


def main(out: str) -> None:
    import bitsandbytes as bnb

    from qconvert.training import fsdp
    from qconvert.training.bnb_shards import ShardedBnb

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    row = {"rank": rank}
    for name, cls in (("adamw_8bit", bnb.optim.AdamW8bit), ("paged_adamw_32bit", bnb.optim.PagedAdamW32bit)):
        def make(ts):
            return cls(ts, lr=1e-2, weight_decay=0.01)

        ref = model()
        ref_opt = make(list(ref.parameters()))
        sharded = shard(copy.deepcopy(ref), world)
        opt = ShardedBnb(sharded.parameters(), make)
        before = steps(sharded, opt, ref, ref_opt, 0, 3)
        kinds = sorted({str(s["state1"].dtype) for s in opt.inner.state.values()})
        folder = Path(out) / name
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        fsdp.save_sharded(sharded, opt, folder)
        again = shard(model(), world)  # fresh shards and a fresh optimizer, then the checkpoint
        opt2 = ShardedBnb(again.parameters(), make)
        fsdp.load_sharded(again, opt2, folder)
        loaded = all(torch.equal(p.full_tensor(), q.full_tensor()) for p, q in zip(again.parameters(), sharded.parameters()))
        after = steps(again, opt2, ref, ref_opt, 3, 2)
        row[name] = {"exact_before": before, "exact_after_resume": after, "params_loaded": loaded, "state_dtypes": kinds}
    finish_worker(out, rank, row)


if __name__ == "__main__":
    main(*sys.argv[1:])
