"""`qconvert train --resume` is the run it resumes (issue 24, item 1): the run's own settings come
back from the checkpoint, a given option that contradicts them is refused by name before anything
loads, and config.yaml and the card describe the real run."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml

from helpers import QCONVERT
from test_hostile_train import one_line_error
from test_train import WORDS, metrics, qmodel, train  # noqa: F401  (qmodel is a fixture)
from qconvert.errors import OptionError
from qconvert.training.resume import resumed_config, run_settings
from qconvert.training.settings import TrainConfig

RUN = {"eval_split": 0.1, "batch_size": 8, "grad_accum": 1, "lr": 3e-3}


def flags(*args: str) -> TrainConfig:
    """The TrainConfig `qconvert train ARGS` builds (what was given recorded), without running it."""
    from qconvert.cli.train import given_options, train as command
    from qconvert.training.config import load_run

    ctx = command.make_context("train", ["base", "--data", "d.jsonl", "--output", "out", *args])
    params = dict(ctx.params)
    model, config_file = params.pop("model"), params.pop("config_file")
    return load_run(config_file, given_options(ctx, model, params))[1]


def resumed(*args: str, world: int = 1, run=RUN, run_world: int = 1, said=None) -> TrainConfig:
    saved = run_settings(TrainConfig.of(None, run), run_world)
    return resumed_config(flags("--resume", *args), saved, world, "out/checkpoint-1", (said if said is not None else []).append)


def test_resume_takes_the_run_settings_and_refuses_a_contradiction_by_name():
    with pytest.raises(OptionError, match=r"--resume: --lora-r 8 contradicts the run being resumed: its lora_r is 64"):
        resumed("--lora-r", "8")
    with pytest.raises(OptionError, match=r"--lr 0.0002 contradicts .* its lr is 0.003"):
        resumed("--lr", "2e-4")  # given equal to the default is still given
    cfg = resumed()
    assert (cfg.eval_split, cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.lora_r) == (0.1, 8, 1, 3e-3, 64)
    said: list[str] = []
    cfg = resumed("--max-steps", "20", "--save-steps", "5", "--backend", "reference", "--lr", "3e-3", said=said)
    assert (cfg.max_steps, cfg.save_steps, cfg.backend, cfg.lr) == (20, 5, "reference", 3e-3)
    assert said == ["resume: --max-steps 20 (the run had none)", "resume: --save-steps 5 (the run had none)"]


def test_resume_keeps_the_global_batch_across_process_counts():
    run = dict(RUN, batch_size=2, grad_accum=4)
    assert resumed("--grad-accum", "2", world=2, run=run).grad_accum == 2  # 2 x 2 x 2 processes = 2 x 4 x 1
    with pytest.raises(OptionError, match=r"2 process\(es\) give a global batch of 16, the run being resumed has 8") as e:
        resumed(world=2, run=run)
    assert e.value.hint == "give --grad-accum 2"
    with pytest.raises(OptionError, match=r"--batch-size 4 gives a global batch of 16"):
        resumed("--batch-size", "4", run=run)


@pytest.mark.slow
def test_issue_reproduction_resume_is_the_run_it_resumes(qmodel, tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(WORDS[i] for i in torch.randint(0, 120, (12,), generator=g).tolist())} for _ in range(20)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = ["--eval-split", 0.1, "--batch-size", 8, "--grad-accum", 1, "--lr", "3e-3", "--lora-r", 4, "--lora-dropout", 0.0,
           "--target-modules", "q_proj", "--max-steps", 3]
    train(qmodel, data, tmp_path / "straight", *run)
    out = tmp_path / "split"
    train(qmodel, data, out, *run, "--stop-after", 1)
    before = (out / "config.yaml").read_text()
    r = train(qmodel, data, out, "--resume", "--lora-r", 8, ok=False)
    one_line_error(r, "--lora-r 8 contradicts the run being resumed: its lora_r is 4")
    assert "examples:" not in r.stderr and (out / "config.yaml").read_text() == before  # refused before anything loaded
    r = subprocess.run([*QCONVERT, "train", str(qmodel), "--data", str(data), "--output", str(out), "--resume"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "examples: 18 for training, 2 for evaluation" in r.stderr, r.stderr[-3000:]
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["learning_rate"], saved["eval_split"], saved["per_device_train_batch_size"], saved["gradient_accumulation_steps"],
            saved["lora_r"], saved["max_steps"]) == (3e-3, 0.1, 8, 1, 4, 3)
    assert "lr 0.003" in (out / "README.md").read_text()
    assert [m.get("loss") for m in metrics(out)] == [m.get("loss") for m in metrics(tmp_path / "straight")]
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
