"""`qconvert train --fsdp` (FSDP2 over the 4-bit base): two processes follow one process's loss curve
and end with its adapter, each process holds about 1/N of the base, a run stopped by SIGTERM and
resumed ends where an uninterrupted one does, and a checkpoint resumes under another process count."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import QCONVERT
from tolerances import LOSS_ACROSS_RUNS_REL
from test_train import free_port, memorize_set, metrics, qmodel, train  # noqa: F401  (qmodel: the fixture)

HERE = Path(__file__).parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")
TOL = LOSS_ACROSS_RUNS_REL  # losses and adapters across process counts (tests/README.md)


def torchrun(n: int, *args, ok: bool = True, popen: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), f"--master-port={free_port()}", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def train_fsdp(n: int, model, data, out, *extra, ok: bool = True, popen: bool = False):
    return torchrun(n, "-m", "qconvert", "train", model, "--data", data, "--output", out, "--backend", "reference", "--fsdp",
                    *extra, ok=ok, popen=popen)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def assert_close_adapters(a: dict, b: dict, tol: float = TOL) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert (a[k] - b[k]).abs().max() <= tol * a[k].abs().max(), k


def assert_same_curve(one: list[dict], two: list[dict]) -> None:
    one, two = [m for m in one if "loss" in m], [m for m in two if "loss" in m]
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < TOL * abs(a["loss"]), (a, b)


@pytest.mark.slow
def test_two_fsdp_processes_match_one_process(qmodel, tmp_path):
    data = memorize_set(tmp_path)
    common = ["--max-steps", 4, "--grad-accum", 2, "--lora-r", 4, "--lora-dropout", 0.0, "--lr", "1e-3", "--optim", "adamw",
              "--eval-split", 0.25, "--eval-steps", 2]
    train(qmodel, data, tmp_path / "one", *common, "--batch-size", 1, "--grad-accum", 4)
    r = train_fsdp(2, qmodel, data, tmp_path / "two", *common, "--batch-size", 1)  # accumulation: one reduce-scatter per step
    assert "memory estimate per process (FSDP over 2)" in r.stderr and "FSDP: this process holds" in r.stderr
    assert_same_curve(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    evals = [[m["eval_loss"] for m in metrics(tmp_path / d) if "eval_loss" in m] for d in ("one", "two")]
    assert len(evals[0]) == 2 and all(abs(a - b) < TOL * a for a, b in zip(*evals)), evals  # every process evaluates under FSDP
    assert_close_adapters(adapter(tmp_path / "one"), adapter(tmp_path / "two"))
    # the final adapter is PEFT's, written as one process writes it, byte for byte (target_modules sorted)
    assert (tmp_path / "one" / "adapter_config.json").read_bytes() == (tmp_path / "two" / "adapter_config.json").read_bytes()
    assert not list((tmp_path / "two").glob("*.distcp"))


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_each_process_holds_its_share_of_the_base(qmodel, tmp_path, n):
    torchrun(n, HERE / "fsdp_shard_worker.py", qmodel, tmp_path)
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(n)]
    whole = rows[0]["whole"]
    for row in rows:
        assert row["scales_sharded"], row  # the block scales are sharded with the codes, not replicated
        assert abs(row["mine"] - whole / n) <= 0.02 * whole / n, (row, n)  # dim-0 chunks: a few rows of padding at most
    assert sum(row["mine"] for row in rows) >= whole


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_gives_the_uninterrupted_adapter(qmodel, tmp_path):
    data = memorize_set(tmp_path)
    common = ["--max-steps", 24, "--batch-size", 1, "--grad-accum", 2, "--lora-r", 4, "--lora-dropout", 0.1, "--lr", "1e-3",
              "--lr-scheduler", "cosine", "--warmup-ratio", 0.2, "--seed", 3, "--optim", "adamw", "--save-steps", 0]
    train_fsdp(2, qmodel, data, tmp_path / "straight", *common)
    split = tmp_path / "split"
    p = train_fsdp(2, qmodel, data, split, *common, popen=True)
    deadline = time.monotonic() + 300
    while not ((split / "metrics.jsonl").exists() and len(metrics(split)) >= 2):
        assert p.poll() is None and time.monotonic() < deadline, "the run ended before it could be stopped"
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)  # torchrun passes it to every worker, as Slurm or docker stop would
    err = p.communicate(timeout=300)[1]
    assert "interrupted at step" in err, err[-3000:]
    [ckpt] = [c for c in split.iterdir() if c.name.startswith("checkpoint-")]
    stopped = int(ckpt.name.split("-")[1])
    # the workers end cleanly, rank 0 with one line; the one traceback (and exit 1) is torchrun's own agent's
    # (its SignalException): `qconvert train --nproc-per-node` exits 143 without it (test_hostile_train.py)
    assert f"interrupted at step {stopped}: saved {ckpt}; resume with --resume\n" in err, err[-3000:]
    assert err.count("Traceback") <= 1 and ("Traceback" not in err or "SignalException" in err.split("Traceback")[1]), err[-3000:]
    assert 2 <= stopped < 24 and (ckpt / "sharded").is_dir() and (ckpt / "adapter_model.safetensors").is_file()
    assert not (split / "adapter_config.json").exists()
    train_fsdp(2, qmodel, data, split, *common, "--resume")
    a, b = adapter(tmp_path / "straight"), adapter(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(split)]


@pytest.mark.slow
def test_checkpoint_of_one_process_resumes_on_two(qmodel, tmp_path):
    """FSDP over one process (no torchrun) writes a checkpoint that two processes resume: the same
    global batch (grad-accum 4 x 1 process = 2 x 2), the same curve and adapter within tolerance."""
    data = memorize_set(tmp_path)
    common = ["--max-steps", 5, "--batch-size", 2, "--lora-r", 4, "--lora-dropout", 0.0, "--lr", "1e-3", "--optim", "adamw"]
    train_fsdp(2, qmodel, data, tmp_path / "two", *common, "--grad-accum", 2)
    train(qmodel, data, tmp_path / "mixed", *common, "--grad-accum", 4, "--fsdp", "--stop-after", 2)
    assert (tmp_path / "mixed" / "checkpoint-2" / "sharded").is_dir()
    train_fsdp(2, qmodel, data, tmp_path / "mixed", *common, "--grad-accum", 2, "--resume")
    assert_same_curve(metrics(tmp_path / "two"), metrics(tmp_path / "mixed"))
    assert_close_adapters(adapter(tmp_path / "two"), adapter(tmp_path / "mixed"))


@pytest.mark.slow
def test_fsdp_over_one_process_matches_the_plain_run_and_offload_too(qmodel, tmp_path):
    data = memorize_set(tmp_path)
    common = ["--max-steps", 3, "--batch-size", 2, "--grad-accum", 2, "--lora-r", 4, "--lora-dropout", 0.0, "--lr", "1e-3",
              "--optim", "adamw"]
    train(qmodel, data, tmp_path / "plain", *common)
    r = train(qmodel, data, tmp_path / "fsdp", *common, "--fsdp", "--fsdp-offload")
    assert "memory estimate per process (FSDP over 1)" in r.stderr and "in host memory (offloaded)" in r.stderr
    assert_same_curve(metrics(tmp_path / "plain"), metrics(tmp_path / "fsdp"))
    assert_close_adapters(adapter(tmp_path / "plain"), adapter(tmp_path / "fsdp"))


@pytest.mark.slow
def test_checkpoints_do_not_cross_between_fsdp_and_plain_runs(qmodel, tmp_path):
    data = memorize_set(tmp_path)
    common = ["--max-steps", 3, "--batch-size", 2, "--grad-accum", 1, "--lora-r", 4, "--optim", "adamw"]
    train(qmodel, data, tmp_path / "f", *common, "--fsdp", "--stop-after", 1)
    r = train(qmodel, data, tmp_path / "f", *common, "--resume", ok=False)
    first, *rest = r.stderr.strip().splitlines()[-2:]
    assert r.returncode == 1 and "written with --fsdp" in first and rest == ["hint: resume it with --fsdp"], r.stderr[-2000:]
    train(qmodel, data, tmp_path / "p", *common, "--stop-after", 1)
    r = train(qmodel, data, tmp_path / "p", *common, "--resume", "--fsdp", ok=False)
    assert r.returncode == 1 and "written without --fsdp" in r.stderr and "hint: resume it without --fsdp" in r.stderr, r.stderr[-2000:]


def test_config_file_keys(tmp_path):
    from qconvert.training.config import read_config

    (tmp_path / "a.yaml").write_text("fsdp: true\nfsdp_offload_params: true\n")
    assert read_config(tmp_path / "a.yaml") == {"fsdp": True, "fsdp_offload": True}
    r = subprocess.run([*QCONVERT, "train", "--help"], capture_output=True, text=True)
    assert "--fsdp" in r.stdout and "--fsdp-offload" in r.stdout


def test_offload_without_fsdp_is_refused(qmodel, tmp_path):
    r = train(qmodel, memorize_set(tmp_path), tmp_path / "o", "--fsdp-offload", ok=False)
    assert r.returncode == 1 and "qconvert: error: --fsdp-offload without --fsdp" in r.stderr and "hint: add --fsdp" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """A model wide enough that bitsandbytes keeps LoRA's optimizer state in 8 bits on a shard of two:
    with rank 16 every LoRA tensor has 8,192 values, 4,096 per process (bitsandbytes' smallest 8-bit
    tensor), and every shard's bound falls on a 256-value block of the 8-bit state."""
    from qconvert.convert.quantize import quantize_checkpoint
    from test_train import make_tokenizer
    from helpers import make_tiny_llama

    d = tmp_path_factory.mktemp("wide")
    src = make_tiny_llama(d / "src", hidden=512, intermediate=1024, heads=4, kv_heads=4, vocab=128, dtype=torch.float32)
    make_tokenizer(src)
    quantize_checkpoint(str(src), d / "q", compute_dtype="float32")
    return d / "q"


def lora_deltas(a: dict) -> dict[str, torch.Tensor]:
    """Each layer's learned weight change B @ A (B starts at zero, so all of it was learned)."""
    return {k[: -len("lora_A.weight")]: a[k[: -len("lora_A.weight")] + "lora_B.weight"] @ a[k] for k in a if k.endswith("lora_A.weight")}


def assert_same_8bit_run(a: dict, b: dict, other: dict) -> None:
    """Two adapters trained with the 8-bit optimizer on the same data, a and b, learned the same weight
    changes far more closely than a and an adapter trained with 32-bit AdamW (other). 8-bit state is
    not continuous: a gradient summed over processes, rounded otherwise than one process's, moves a
    few values to the next 8-bit code, so the 1e-4 of the 32-bit runs does not hold element by
    element (measured over 3 steps, 2 processes against 1: largest difference 5.9e-3 of a tensor's
    max; in B @ A, at most 1.0e-4 relative in norm, against at least 8.0e-3 between 8-bit and 32-bit)."""
    a, b, other = lora_deltas(a), lora_deltas(b), lora_deltas(other)
    assert a.keys() == b.keys() == other.keys() and len(a) == 14
    for k in a:
        near, far = ((a[k] - t).norm() / a[k].norm() for t in (b[k], other[k]))
        assert near < 1e-2 and near < far / 10, (k, near, far)


WIDE = ["--batch-size", 1, "--lora-r", 16, "--lora-alpha", 16, "--lora-dropout", 0.0, "--lr", "1e-3", "--max-length", 16,
        "--save-steps", 0, "--optim", "paged_adamw_8bit"]
WIDE_32BIT = [*WIDE[:-1], "adamw"]


@pytest.mark.slow
def test_bitsandbytes_8bit_optimizer_under_fsdp_matches_one_process(wide_model, tmp_path):
    """bitsandbytes' 8-bit AdamW updates each process's shard (its own state, 8-bit blocks of the
    shard): two FSDP processes follow one plain process running the same optimizer."""
    from safetensors.torch import load_file

    data = memorize_set(tmp_path)
    one = train(wide_model, data, tmp_path / "one", *WIDE, "--max-steps", 3, "--grad-accum", 2)
    two = train_fsdp(2, wide_model, data, tmp_path / "two", *WIDE, "--max-steps", 3, "--grad-accum", 1, "--stop-after", 2)
    for r in (one, two):  # off CUDA nothing is paged: bitsandbytes' own 8-bit AdamW on its CPU kernels, said once
        assert "paged_adamw_8bit: bitsandbytes pages optimizer state on CUDA only; using its 8-bit AdamW" in r.stderr, r.stderr[-2000:]
        assert "does not take FSDP" not in r.stderr
    # the checkpoint: float32 moments for any process count, and each process's 8-bit state as it was
    ckpt = tmp_path / "two" / "checkpoint-2" / "sharded"
    for rank in (0, 1):
        exact = load_file(str(ckpt / f"optimizer-8bit-rank{rank}-of-2.safetensors"))
        codes = [t for k, t in exact.items() if k.endswith(".state1")]
        # 7 LoRA layers x 2 tensors x 2 blocks, every one 8-bit: 4,096 or 8,192 values of 8,192 or 16,384 per process
        assert len(codes) == 28 and all(t.dtype == torch.uint8 and t.numel() in (4096, 8192) for t in codes)
    train_fsdp(2, wide_model, data, tmp_path / "two", *WIDE, "--max-steps", 3, "--grad-accum", 1, "--resume")
    train(wide_model, data, tmp_path / "adamw", *WIDE_32BIT, "--max-steps", 3, "--grad-accum", 2)
    assert_same_curve(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    assert_same_8bit_run(adapter(tmp_path / "one"), adapter(tmp_path / "two"), adapter(tmp_path / "adamw"))


@pytest.mark.slow
def test_bitsandbytes_8bit_state_resumes_exactly_and_on_another_process_count(wide_model, tmp_path):
    """Stopped and resumed on the same two processes: the exact 8-bit state is read back and the run
    ends bit for bit where an uninterrupted one does. Resumed on one process: the state is
    re-quantized from its float32 copy, and the run ends within tolerance of the two-process one."""
    data = memorize_set(tmp_path)
    args = [*WIDE, "--max-steps", 4, "--grad-accum", 1]
    train_fsdp(2, wide_model, data, tmp_path / "straight", *args)
    train_fsdp(2, wide_model, data, tmp_path / "split", *args, "--stop-after", 2)
    train_fsdp(2, wide_model, data, tmp_path / "split", *args, "--resume")
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(tmp_path / "straight")] == [m["loss"] for m in metrics(tmp_path / "split")]
    train_fsdp(2, wide_model, data, tmp_path / "moved", *args, "--stop-after", 2)
    r = train(wide_model, data, tmp_path / "moved", *WIDE, "--max-steps", 4, "--grad-accum", 2, "--fsdp", "--resume")
    assert "8-bit optimizer state re-quantized" in r.stderr, r.stderr[-2000:]
    train(wide_model, data, tmp_path / "adamw", *WIDE_32BIT, "--max-steps", 4, "--grad-accum", 2)
    assert_same_curve(metrics(tmp_path / "straight"), metrics(tmp_path / "moved"))
    assert_same_8bit_run(adapter(tmp_path / "straight"), adapter(tmp_path / "moved"), adapter(tmp_path / "adamw"))


@pytest.mark.slow
def test_bitsandbytes_optimizers_over_shards_are_bitsandbytes_over_the_whole(tmp_path):
    """Given the same gradients, bitsandbytes' 8-bit and paged 32-bit AdamW over two processes' shards
    leave every parameter bit-identical to the same optimizer over the whole tensors, before and after
    a sharded checkpoint is written and read into fresh shards."""
    torchrun(2, HERE / "fsdp_bnb_worker.py", tmp_path)
    for rank in (0, 1):
        row = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, dtypes in (("adamw_8bit", ["torch.float32", "torch.uint8"]), ("paged_adamw_32bit", ["torch.float32"])):
            assert row[name] == {"exact_before": True, "exact_after_resume": True, "params_loaded": True, "state_dtypes": dtypes}, row


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_one_and_on_four(qmodel, tmp_path):
    data = memorize_set(tmp_path)
    common = ["--max-steps", 4, "--batch-size", 1, "--lora-r", 4, "--lora-dropout", 0.0, "--lr", "1e-3", "--optim", "adamw"]
    train_fsdp(2, qmodel, data, tmp_path / "two", *common, "--grad-accum", 2)
    for n, accum in ((1, 4), (4, 1)):
        out = tmp_path / f"to{n}"
        train_fsdp(2, qmodel, data, out, *common, "--grad-accum", 2, "--stop-after", 2)
        train_fsdp(n, qmodel, data, out, *common, "--grad-accum", accum, "--resume")
        assert_same_curve(metrics(tmp_path / "two"), metrics(out))
        assert_close_adapters(adapter(tmp_path / "two"), adapter(out))


def test_requantize_gives_bitsandbytes_8bit_state_back():
    """The 8-bit moments dequantized for a checkpoint are re-quantized to the codes and block scales
    bitsandbytes' optimizer had (a block whose extreme is negative included; a ragged last block);
    bitsandbytes' own quantize_blockwise does not give them back, which is why requantize exists."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    from qconvert.training.bnb_shards import requantize

    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(33, 250) * 0.01)
    p.data[0, :5] = 0.0
    opt = bnb.optim.AdamW8bit([p], lr=1e-3)
    for _ in range(3):
        p.grad = torch.randn_like(p)
        p.grad[0, :5] = 0.0
        opt.step()
    s = opt.state[p]
    assert s["state1"].dtype == torch.uint8
    negative_extreme = 0
    for k in ("1", "2"):
        codes, scales, table = s["state" + k], s["absmax" + k], s["qmap" + k]
        x = F.dequantize_blockwise(codes.reshape(-1), absmax=scales, code=table, blocksize=256)
        got, got_scales = requantize(x, table)
        assert torch.equal(got.view(codes.shape), codes)
        assert torch.allclose(got_scales, scales, rtol=2e-7, atol=0)
        theirs, q = F.quantize_blockwise(x, code=table, blocksize=256)
        negative_extreme += int((q.absmax < scales * (1 - 1e-6)).sum())
    assert negative_extreme > 0  # the case bitsandbytes' quantize_blockwise gets wrong occurs here


def saved_for_backward(model, ids) -> tuple[int, int]:
    """(bytes autograd keeps for the backward after a forward, the most one block adds), measured with
    saved-tensor hooks (tensors counted once per storage; parameters and buffers left out)."""
    from qconvert.training.fsdp import blocks

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    marks: list[int] = []
    per_block: list[int] = []

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    hooks = [b.register_forward_pre_hook(lambda *_: marks.append(sum(seen.values()))) for b in blocks(model)]
    hooks += [b.register_forward_hook(lambda *_: per_block.append(sum(seen.values()) - marks.pop())) for b in blocks(model)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    for h in hooks:
        h.remove()
    return sum(seen.values()), max(per_block)


@pytest.mark.parametrize("dropout", [0.0, 0.05])
def test_activation_estimate_matches_what_autograd_keeps(tmp_path, dropout):
    """The start line's activation figure against the bytes autograd really keeps for the backward on
    a small Llama: without gradient checkpointing, all of the forward's; with it, what the forward
    keeps plus the largest block's recomputation (measured in a run without checkpointing)."""
    from peft import LoraConfig, get_peft_model

    import qconvert
    from helpers import make_tiny_llama
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.training.fsdp import activation_bytes

    src = make_tiny_llama(tmp_path / "src", hidden=256, intermediate=688, layers=4, heads=4, kv_heads=2, vocab=1000, dtype=torch.float32)
    quantize_checkpoint(str(src), tmp_path / "q", compute_dtype="float32")
    ids = torch.randint(0, 1000, (2, 64), generator=torch.Generator().manual_seed(0))
    measured, estimated = {}, {}
    for checkpointing in (False, True):
        base = qconvert.load_model(tmp_path / "q", device="cpu", backend="reference")
        base.config.use_cache = False
        if checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            base.enable_input_require_grads()
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=16, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM"))
        model.train()
        measured[checkpointing] = saved_for_backward(model, ids)
        estimated[checkpointing] = activation_bytes(model, tokens=ids.numel(), checkpointing=checkpointing)
    kept_without, block = measured[False]
    kept_with, _ = measured[True]
    assert kept_with < kept_without / 3  # checkpointing really was on
    for est, real in ((estimated[False], kept_without), (estimated[True], kept_with + block)):
        assert 0.8 <= est / real <= 1.25, (dropout, est, real)
