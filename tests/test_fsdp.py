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
    # the final adapter is PEFT's, laid out as one process writes it (target_modules is a set: its order varies)
    a, b = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("one", "two"))
    assert sorted(a.pop("target_modules")) == sorted(b.pop("target_modules")) and a == b
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
    from qconvert.train.config import read_config

    (tmp_path / "a.yaml").write_text("fsdp: true\nfsdp_offload_params: true\n")
    assert read_config(tmp_path / "a.yaml") == {"fsdp": True, "fsdp_offload": True}
    r = subprocess.run([*QCONVERT, "train", "--help"], capture_output=True, text=True)
    assert "--fsdp" in r.stdout and "--fsdp-offload" in r.stdout


def test_offload_without_fsdp_is_refused(qmodel, tmp_path):
    r = train(qmodel, memorize_set(tmp_path), tmp_path / "o", "--fsdp-offload", ok=False)
    assert r.returncode == 1 and "qconvert: error: --fsdp-offload without --fsdp" in r.stderr and "hint: add --fsdp" in r.stderr, r.stderr
