"""`qconvert train ARGS` with FSDP checkpoints written as qconvert wrote them before its own format
(torch.distributed.checkpoint: a pickled ``.metadata`` and ``__*.distcp`` files), for
test_fsdp_checkpoint.py to craft hostile checkpoints from genuine ones."""

import sys

from qconvert.training import fsdp


def old_save_sharded(model, optimizer, folder) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True, strict=True))
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder / fsdp.SHARDED))


if __name__ == "__main__":
    fsdp.save_sharded = old_save_sharded
    sys.argv = ["qconvert", *sys.argv[1:]]
    from qconvert.cli.main import run

    run()
