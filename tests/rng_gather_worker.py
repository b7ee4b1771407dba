"""Run by torch.distributed.run in test_hostile_train: every process gathers every process's RNG
state through train/checkpoint._gather_rng with pickle made unusable, and checks what it got."""

import pickle
import sys

import torch
import torch.distributed as dist


def refuse(*a, **k):
    raise AssertionError("pickle was used")


pickle.loads = pickle.load = refuse
pickle.Unpickler = refuse  # type: ignore[assignment,misc]

from qconvert.training.checkpoint import _gather_rng  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
expected = []
for r in range(world):
    torch.manual_seed(1000 + r)
    expected.append(torch.get_rng_state())
torch.manual_seed(1000 + rank)
got = _gather_rng(world)
assert isinstance(got, list) and len(got) == world
for r in range(world):
    assert torch.equal(got[r]["torch"], expected[r]), r
    assert got[r]["python"]["state"].dtype == torch.int64 and got[r]["numpy"]["state"].numel() == 624
dist.barrier()
dist.destroy_process_group()
print(f"ok {rank}", file=sys.stderr)
