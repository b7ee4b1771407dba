"""Watching and repeating a `qconvert train` run: the start summary's numbers are the data's, off a
terminal one plain line per logged step and per evaluation, loss.png holds the metrics' series, and
the saved config.yaml repeats the run exactly."""

from __future__ import annotations

import json
import re
import struct
import subprocess

import pytest

from helpers import QCONVERT, run_cli_here
from test_hostile_train import one_line_error
from test_train import WORDS, memorize_set, metrics, qmodel, train  # noqa: F401  (qmodel is a fixture)


@pytest.mark.slow
def test_summary_numbers_log_lines_and_loss_png_come_from_the_run(qmodel, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from qconvert.training.data import build_examples, load_records
    from qconvert.training.plot import read_png_series

    data = memorize_set(tmp_path)
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(json.dumps({"prompt": WORDS[i], "completion": WORDS[i + 1]}) for i in range(3)) + "\n")
    out = tmp_path / "run"
    err = tmp_path / "stderr.txt"
    args = [*QCONVERT, "train", str(qmodel), "--data", str(data), "--eval-data", str(ev), "--output", str(out), "--backend", "reference",
            "--batch-size", "2", "--grad-accum", "1", "--num-train-epochs", "2", "--logging-steps", "3", "--eval-steps", "4",
            "--lora-r", "2", "--target-modules", "q_proj", "--lr-scheduler", "linear", "--warmup-ratio", "0.25"]
    with open(err, "w") as f:  # off a terminal: stderr is a file
        r = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=f)
    text = err.read_text()
    assert r.returncode == 0, text[-3000:]
    tok = AutoTokenizer.from_pretrained(qmodel)
    ex = build_examples(load_records(data), tok)
    tokens, with_loss = sum(len(e.input_ids) for e in ex), sum(sum(l != -100 for l in e.labels[1:]) for e in ex)
    assert f"examples: 8 for training, 3 for evaluation; {tokens} tokens, {with_loss} with loss" in text, text
    assert "steps: 8 = 2.00 epochs x 4 steps; effective batch 2 = 2 per device x 1 accumulation x 1 process(es)" in text, text
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert f"{sum(t.numel() for t in adapter.values()):,} trainable parameters" in text, text
    assert "optimizer adamw, lr 0.0002 linear, 2 warmup steps; device cpu; memory peak RSS" in text
    assert re.search(r"^threads: \d+ \((OMP_NUM_THREADS=|QCONVERT_THREADS=|\S+ of \d+ available CPUs idle|\d+ available CPU)", text, re.M), text
    assert "FutureWarning" not in text and "use_cache" not in text and "\r" not in text  # no bar, no third-party noise
    rows = metrics(out)
    train_rows = [m for m in rows if "loss" in m]
    steps = [(int(s), float(l)) for s, l in re.findall(r"^step (\d+)/8  loss (\S+)  lr", text, re.M)]
    assert steps == [(m["step"], round(m["loss"], 4)) for m in train_rows] and [s for s, _ in steps] == [3, 6, 8]
    evals = [(int(s), float(l)) for s, l in re.findall(r"^step (\d+)/8  eval_loss (\S+)$", text, re.M)]
    assert evals == [(m["step"], round(m["eval_loss"], 4)) for m in rows if "eval_loss" in m] and [s for s, _ in evals] == [4, 8]
    assert f"loss curve: {out}/loss.png" in text and f"--config {out}/config.yaml" in text
    # loss.png: a valid PNG whose plotted series are metrics.jsonl's
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR" and struct.unpack(">II", png[16:24]) == (700, 400)
    series = read_png_series(out / "loss.png")  # CRC-checked
    assert series["train loss"] == {"x": [m["step"] for m in train_rows], "y": [m["loss"] for m in train_rows]}
    assert series["learning rate"] == {"x": [m["step"] for m in train_rows], "y": [m["lr"] for m in train_rows]}
    eval_rows = [m for m in rows if "eval_loss" in m]
    assert series["eval loss"] == {"x": [m["step"] for m in eval_rows], "y": [m["eval_loss"] for m in eval_rows]}
    from PIL import Image

    with Image.open(out / "loss.png") as im:
        im.verify()
    assert "](loss.png)" in (out / "README.md").read_text()


@pytest.mark.slow
def test_config_file_with_hf_names_flags_override_and_saved_config_repeats_the_run(qmodel, tmp_path):
    import yaml

    data = memorize_set(tmp_path)
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"model_name_or_path: {qmodel}\ndataset_name: {data}\noutput_dir: {tmp_path / 'a'}\n"
        "learning_rate: 1e-3\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 2\nnum_train_epochs: 3\n"
        "r: 4\nlora_alpha: 8\nlora_dropout: 0.1\nlr_scheduler_type: cosine\nwarmup_ratio: 0.2\nseed: 7\nbackend: reference\n"
        "save_steps: 0\noptim: adamw\n"
    )
    r = subprocess.run([*QCONVERT, "train", "--config", str(cfg), "--learning-rate", "2e-3"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert saved["learning_rate"] == 2e-3 and saved["lora_r"] == 4 and saved["num_train_epochs"] == 3.0
    assert saved["per_device_train_batch_size"] == 2 and saved["model_name_or_path"] == str(qmodel.resolve())
    r = subprocess.run([*QCONVERT, "train", "--config", str(tmp_path / "a" / "config.yaml"), "--output", str(tmp_path / "b")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert len(a) == 6 and [m["loss"] for m in a] == [m["loss"] for m in b] and [m["lr"] for m in a] == [m["lr"] for m in b]
    # repeating it into its own folder is refused (a previous run is never overwritten silently)
    r = run_cli_here("train", "--config", tmp_path / "a" / "config.yaml", ok=False)
    one_line_error(r, "already holds files")


def test_config_keys_aliases_and_refusals(tmp_path):
    from qconvert.errors import OptionError
    from qconvert.training.config import read_config

    j = tmp_path / "finlora.json"
    j.write_text(json.dumps({"lora_r": 8, "quant_bits": 4, "learning_rate": 1e-4, "num_epochs": 2, "batch_size": 4,
                             "gradient_accumulation_steps": 2}))
    assert read_config(j) == {"lora_r": 8, "lr": 1e-4, "epochs": 2, "batch_size": 4, "grad_accum": 2}
    for body, needle in (({"quant_bits": 8}, "quant_bits: 8 is not supported"), ({"lora_r": 4, "r": 8}, "sets lora_r a second time")):
        j.write_text(json.dumps(body))
        try:
            read_config(j)
        except OptionError as e:
            assert needle in str(e)
        else:
            raise AssertionError(body)
    y = tmp_path / "typo.yaml"
    y.write_text("learning_rat: 1e-4\n")
    r = run_cli_here("train", "--config", y, ok=False)
    line = one_line_error(r, "unknown key 'learning_rat'")
    assert "did you mean 'learning_rate'?" in line
    y.write_text("learning_rate: fast\n")
    r = run_cli_here("train", "--config", y, ok=False)
    one_line_error(r, "learning_rate", "not a valid float")
