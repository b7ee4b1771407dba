"""Run under torchrun by test_fsdp.py (and tools/bench_fsdp.py reads the same numbers): load a 4-bit
model, shard it as `qconvert train --fsdp` does, run one forward and backward, then write this
process's local bytes of the frozen base (from the DTensors' local shards) and its peak RSS."""

import resource
import sys

import torch
import torch.distributed as dist
from helpers import finish_worker

from qconvert.training import fsdp


def rss_mib() -> dict:
    """VmRSS (now) and VmHWM (peak) of this process, in MiB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM")}


def main(model: str, out: str, mode: str = "fsdp") -> None:
    from peft import LoraConfig, get_peft_model

    import qconvert
    from qconvert.nn.linear4bit import Linear4bit

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = qconvert.load_model(model, device="cpu", backend="reference")
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    _, whole_before = fsdp.local_bytes(peft)
    after_load = rss_mib()["VmRSS"]
    if mode == "fsdp":
        fsdp.shard(peft, dist.get_world_size(), torch.device("cpu"), offload=False)
    after_shard = rss_mib()["VmRSS"]
    ids = torch.arange(8).reshape(1, 8)
    peft(input_ids=ids).logits.float().sum().backward()  # the blocks are gathered and freed again
    mine, whole = fsdp.local_bytes(peft)
    from torch.distributed.tensor import DTensor

    if mode != "fsdp":
        mine = whole = sum(p.numel() * p.element_size() for p in peft.parameters() if not p.requires_grad)
    scales = [m.absmax for m in peft.modules() if isinstance(m, Linear4bit)]
    row = {"rank": rank, "mine": mine, "whole": whole, "whole_before": whole_before,
           "scales_sharded": all(isinstance(s, DTensor) for s in scales) and len(scales) > 0,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_after_load_mib": after_load,
           "rss_after_shard_mib": after_shard, "rss_end_mib": rss_mib()["VmRSS"]}
    finish_worker(out, rank, row)


if __name__ == "__main__":
    main(*sys.argv[1:])
