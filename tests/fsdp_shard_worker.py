"""Run under torchrun by test_fsdp.py (and tools/bench_fsdp.py reads the same numbers): load a 4-bit
model, shard it as `qconvert train --fsdp` does, run one forward and backward, then write this
process's local bytes of the frozen base (from the DTensors' local shards) and its peak RSS."""

import json
import os
import resource
import sys

import torch
import torch.distributed as dist

from qconvert.train import fsdp


def main(model: str, out: str) -> None:
    from peft import LoraConfig, get_peft_model

    import qconvert

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    base = qconvert.load_model(model, device="cpu", backend="reference")
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    _, whole_before = fsdp.local_bytes(peft)
    fsdp.shard(peft, dist.get_world_size(), torch.device("cpu"), offload=False)
    ids = torch.arange(8).reshape(1, 8)
    peft(input_ids=ids).logits.float().sum().backward()  # the blocks are gathered and freed again
    mine, whole = fsdp.local_bytes(peft)
    from torch.distributed.tensor import DTensor

    scales = [m.absmax for m in peft.modules() if isinstance(m, qconvert.nn.Linear4bit)]
    row = {"rank": rank, "mine": mine, "whole": whole, "whole_before": whole_before,
           "scales_sharded": all(isinstance(s, DTensor) for s in scales) and len(scales) > 0,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
