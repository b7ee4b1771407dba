"""Run under torchrun by test_fsdp_checkpoint.py: FSDP2 shards of a small model and torch's AdamW.

``save OUT``: three steps on seeded gradients, then the sharded checkpoint into OUT/ckpt, and (rank 0)
OUT/reference.safetensors: every trainable tensor and moment at that point, whole, and the
parameters after two more steps. ``load OUT``: a fresh model and optimizer on this process count
read OUT/ckpt with every unpickling function of pickle and torch replaced by one that records its
call, then take the same two steps; each process writes what matched to OUT/load{world}/rank{r}.json."""

import pickle
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import finish_worker


def model(world: int) -> torch.nn.Module:
    """33 rows split unevenly (17/16 over two, 9/9/9/6 over four); a frozen bias that is not saved."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 33, bias=False), torch.nn.Linear(33, 64, bias=True))
    m[1].bias.requires_grad_(False)
    mesh = init_device_mesh("cpu", (world,))
    fully_shard(m[0], mesh=mesh)
    fully_shard(m, mesh=mesh)
    return m


def steps(m, opt, first: int, n: int) -> None:
    from torch.distributed.tensor import distribute_tensor

    for i in range(first, first + n):
        g = torch.Generator().manual_seed(i)
        for p in m.parameters():
            if p.requires_grad:
                p.grad = distribute_tensor(torch.randn(p.shape, generator=g) * (i + 1), p.device_mesh, p.placements)
        opt.step()
        opt.zero_grad(set_to_none=True)


def whole(m, opt) -> dict[str, torch.Tensor]:
    """Every trainable tensor and its moments, gathered (a collective)."""
    out = {}
    for name, p in [(n, p) for n, p in m.named_parameters() if p.requires_grad]:
        out[f"param/{name}"] = p.detach().full_tensor()
        for k, v in opt.state[p].items():
            out[f"state/{name}/{k}"] = v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
    return out


def make(m, lr: float = 1e-2, betas=(0.8, 0.95)):
    return torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr, betas=betas, weight_decay=0.01)


class Recorded:
    calls: list[str] = []

    @classmethod
    def patch(cls) -> None:
        def record(name):
            def f(*a, **k):
                cls.calls.append(name)
                raise RuntimeError(f"{name} called")
            return f

        for name in ("load", "loads", "Unpickler"):
            setattr(pickle, name, record(f"pickle.{name}"))
        torch.load = record("torch.load")


def main(mode: str, out: str) -> None:
    from safetensors.torch import load_file, save_file

    from qconvert.training import fsdp

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out)
    m = model(world)
    opt = make(m) if mode == "save" else make(m, 5e-3, (0.9, 0.999))  # the checkpoint's settings replace these
    row = {"rank": rank}
    if mode == "save":
        steps(m, opt, 0, 3)
        if rank == 0:
            (out / "ckpt").mkdir(parents=True)
        dist.barrier()
        fsdp.save_sharded(m, opt, out / "ckpt")
        ref = whole(m, opt)
        steps(m, opt, 3, 2)
        ref.update({f"final/{k}": v for k, v in whole(m, opt).items() if k.startswith("param/")})
        if rank == 0:
            save_file(ref, str(out / "reference.safetensors"))
    else:
        Recorded.patch()
        fsdp.load_sharded(m, opt, out / "ckpt")
        ref = load_file(str(out / "reference.safetensors"))
        got = whole(m, opt)
        row["loaded"] = sorted(k for k in got if torch.equal(got[k], ref[k]))
        row["expected"] = sorted(k for k in ref if not k.startswith("final/"))
        row["lr_betas"] = [opt.param_groups[0]["lr"], list(opt.param_groups[0]["betas"])]
        steps(m, opt, 3, 2)
        row["final"] = all(torch.equal(v, ref[f"final/{k}"]) for k, v in whole(m, opt).items() if k.startswith("param/"))
        row["unpickling_calls"] = Recorded.calls
        row["dcp_imported"] = "torch.distributed.checkpoint.filesystem" in sys.modules
    where = out if mode == "save" else out / f"load{world}"
    where.mkdir(exist_ok=True)
    finish_worker(str(where), rank, row)


if __name__ == "__main__":
    main(*sys.argv[1:])
