"""`qconvert train` against hostile and careless input: a crafted checkpoint runs no code, a previous
run is never overwritten or mixed in, SIGTERM saves like Ctrl-C, and every bad option or model is one
clear line (exit 1), never a traceback and never a run that "succeeds" on nothing."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import QCONVERT, make_tiny_bert, run_cli_here, whole_error
from test_train import free_port, memorize_set, metrics, qmodel, train  # noqa: F401  (qmodel is a fixture)

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """The run failed with exit 1 and a single `qconvert: error:` line of at most 200 characters
    (pytest's long temporary folder names not counted: a user's path is as long as it is)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    err = [l for l in lines if l.startswith("qconvert: error:")]
    assert len(err) == 1 and len(re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/]+", "/tmp/T", err[0])) <= 200, lines
    block = "\n".join(lines[lines.index(err[0]):])  # the error: its first line, then detail and hint lines
    assert all(l.startswith(("  ", "hint: ")) for l in block.splitlines()[1:]), block
    whole = "\n".join([whole_error(err[0], block.splitlines()[1:]), block])
    for n in needles:
        assert n in whole, block
    return block


# ---------------------------------------------------------------- checkpoints: nothing executed


class _Evil:
    """Unpickling this would create a folder (a stand-in for running any code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.mkdir, (self.marker,))


@pytest.mark.slow
def test_resume_refuses_a_crafted_pickle_and_runs_nothing(qmodel, tmp_path):
    """The trainer state is safetensors and JSON, never unpickled: a pickle whose loading would run
    code, planted as the old trainer_state.pt or in place of trainer_state.safetensors, is refused
    in one line and runs nothing."""
    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    common = ["--max-steps", 3, "--batch-size", 2, "--grad-accum", 1, "--lora-r", 4]
    train(qmodel, data, out, *common, "--stop-after", 1)
    marker = tmp_path / "pwned"
    ckpt = out / "checkpoint-1"
    torch.save({"version": 2, "step": 1, "payload": _Evil(marker)}, ckpt / "trainer_state.safetensors")
    r = train(qmodel, data, out, *common, "--resume", ok=False)
    one_line_error(r, "trainer_state.safetensors: not a readable training state")
    (ckpt / "trainer_state.safetensors").rename(ckpt / "trainer_state.pt")
    r = train(qmodel, data, out, *common, "--resume", str(ckpt), ok=False)
    one_line_error(r, "trainer_state.pt: an earlier qconvert's state, a pickle (never read)")
    assert not marker.exists()
    assert not (out / "adapter_config.json").exists()


def test_trainer_state_round_trips_without_pickle_and_refuses_what_it_never_writes(tmp_path):
    """save_state / load_state keep every value as it was (tensors bit for bit, tuples, int keys,
    nan and inf, booleans, None); a file whose JSON skeleton names a missing tensor, a node kind or key
    it never writes, nests too deep or is no JSON is one DataError."""
    from safetensors.torch import save_file

    from qconvert.errors import DataError
    from qconvert.training.checkpoint import SKELETON, STATE_VERSION, load_state, save_state
    from qconvert.training.outdir import STATE

    state = {"version": STATE_VERSION, "step": 7, "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3)}},
             "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-4, "eps": float("nan"), "max": float("inf"), "fused": None,
                               "amsgrad": False, "params": [0]}]}, "rng": {"numpy": {"key": "MT19937", "state": torch.arange(5)}}}
    (tmp_path / "good").mkdir()
    save_state(state, tmp_path / "good" / STATE)
    got = load_state(tmp_path / "good")
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
    group = got["optimizer"]["param_groups"][0]
    assert group["betas"] == (0.9, 0.999) and isinstance(group["betas"], tuple) and group["lr"] == 1e-4
    assert math.isnan(group["eps"]) and group["max"] == float("inf") and group["fused"] is None and group["amsgrad"] is False
    assert list(got["optimizer"]["state"]) == [0] and got["rng"]["numpy"]["key"] == "MT19937" and got["step"] == 7
    bad = {"missing tensor": {"dict": [["version", {"value": STATE_VERSION}], ["x", {"tensor": "t9"}]]},
           "unknown kind": {"dict": [["version", {"value": STATE_VERSION}], ["x", {"pickle": "gASV"}]]},
           "float key": {"dict": [[1.5, {"value": 1}]]},
           "deep": "[" * 5000 + "]" * 5000, "not json": "{oops"}
    for name, skeleton in bad.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        save_file({"t0": torch.zeros(1)}, folder / STATE, metadata={SKELETON: skeleton if isinstance(skeleton, str) else json.dumps(skeleton)})
        with pytest.raises(DataError, match="trainer_state.safetensors"):
            load_state(folder)


@pytest.mark.parametrize("damage, needle", [
    ('{"step": 2, "lo{"step": 3, "loss": 1.0}', "metrics.jsonl:2: not a metrics row (not valid JSON)"),  # killed mid-write
    ("[" * 50_000, "metrics.jsonl:2: not a metrics row (not valid JSON)"),  # a RecursionError before
    ('{"step": "2", "loss": 1.0}', "metrics.jsonl:2: not a metrics row (a JSON object with a numeric step"),
    ('{"step": 2, "loss": "' + "x" * 70_000 + '"}', "metrics.jsonl:2: a line over 65536 bytes"),
])
def test_damaged_metrics_log_is_one_named_line(tmp_path, damage, needle):
    from qconvert.errors import DataError
    from qconvert.training.plot import read_metrics

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.5, "lr": 0.001}\n' + damage + "\n")
    with pytest.raises(DataError, match=re.escape(needle)):
        read_metrics(log)
    log.write_text('{"step": 1, "loss": 2.5, "lr": 0.001}\n\n{"step": 1, "eval_loss": 2.0}\n')
    assert read_metrics(log) == [{"step": 1, "loss": 2.5, "lr": 0.001}, {"step": 1, "eval_loss": 2.0}]


@pytest.mark.slow
def test_resume_after_a_kill_mid_write_cuts_the_damaged_metrics_line_and_says_so(qmodel, tmp_path):
    """A run killed while appending to metrics.jsonl leaves half a line: --resume cuts the log back to
    its checkpoint (that line included), says how many lines went, and the finished log reads cleanly,
    one row per step (no duplicate, nothing damaged)."""
    from qconvert.training.plot import read_metrics

    data, out = memorize_set(tmp_path), tmp_path / "run"
    common = ["--max-steps", 3, "--batch-size", 2, "--grad-accum", 1, "--lora-r", 4]
    train(qmodel, data, out, *common, "--stop-after", 1)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a run killed while writing its log
    r = train(qmodel, data, out, *common, "--resume")
    assert "metrics.jsonl: removed 1 unreadable lines" in r.stdout + r.stderr
    steps = [row["step"] for row in read_metrics(out / "metrics.jsonl") if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 3


def test_checkpoint_state_loads_with_weights_only_and_restores_every_rng():
    import random

    import numpy as np

    from qconvert.training.checkpoint import rng_state, set_rng_state

    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's state
    saved = rng_state()
    buf = __import__("io").BytesIO()
    torch.save({"rng": saved}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["rng"]
    want = (torch.rand(3), random.random(), np.random.standard_normal(2))
    set_rng_state(loaded)
    got = (torch.rand(3), random.random(), np.random.standard_normal(2))
    assert torch.equal(want[0], got[0]) and want[1] == got[1] and np.array_equal(want[2], got[2])


OBJECT_COLLECTIVES = ("all_gather_object", "gather_object", "broadcast_object_list", "scatter_object_list",
                      "send_object_list", "recv_object_list")


@pytest.mark.slow
def test_rng_states_are_gathered_across_processes_without_pickle():
    """A multi-process checkpoint gathers each process's RNG state (train/checkpoint._gather_rng) as
    safetensors bytes in tensors; all_gather_object would unpickle what the other processes send."""
    worker = ROOT / "tests" / "rng_gather_worker.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}", str(worker)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok 0" in r.stderr and "ok 1" in r.stderr


def test_no_pickle_is_loaded_without_weights_only_anywhere_in_the_package():
    import ast

    offenders = []
    for f in (ROOT / "qconvert").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            where = f"{f.relative_to(ROOT)}:{node.lineno}"
            if (owner, node.func.attr) == ("torch", "load"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
                if not safe:
                    offenders.append(f"{where}: torch.load without weights_only=True")
            elif owner in ("pickle", "dill", "joblib", "cloudpickle") and node.func.attr in ("load", "loads"):
                offenders.append(f"{where}: {owner}.{node.func.attr}")
            elif node.func.attr in OBJECT_COLLECTIVES:  # torch.distributed pickles these objects across processes
                offenders.append(f"{where}: {node.func.attr}")
    assert not offenders, offenders


# ---------------------------------------------------------------- the output folder: nothing lost


@pytest.mark.slow
def test_existing_run_refused_then_overwrite_starts_clean_and_resume_refuses_another_run(qmodel, tmp_path):
    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    common = ["--batch-size", 2, "--grad-accum", 1, "--lora-dropout", 0.0, "--save-steps", 0]
    train(qmodel, data, out, *common, "--max-steps", 3, "--lora-r", 4, "--stop-after", 2)
    assert [p.name for p in sorted(out.glob("checkpoint-*"))] == ["checkpoint-2"]
    before = (out / "metrics.jsonl").read_text()
    # 1. a second run into the same folder is refused and changes nothing
    r = train(qmodel, data, out, *common, "--max-steps", 2, "--lora-r", 8, ok=False)
    one_line_error(r, "already holds files", "--overwrite")
    assert (out / "metrics.jsonl").read_text() == before and (out / "checkpoint-2").is_dir()
    # 2. resuming it with another LoRA shape is refused, by name (training/resume.py): its adapter would not fit
    r = train(qmodel, data, out, *common, "--max-steps", 3, "--lora-r", 8, "--resume", ok=False)
    one_line_error(r, "--lora-r 8 contradicts the run being resumed: its lora_r is 4")
    # 3. --overwrite: the old run's checkpoints and metrics are gone, the new run is complete
    train(qmodel, data, out, *common, "--max-steps", 2, "--lora-r", 8, "--overwrite")
    assert not list(out.glob("checkpoint-*"))
    rows = metrics(out)
    assert [m["step"] for m in rows] == [1, 2]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
    # 4. and --resume now has nothing of the old run to pick up
    r = train(qmodel, data, out, *common, "--max-steps", 3, "--lora-r", 8, "--resume", ok=False)
    one_line_error(r, "no checkpoint-N folder to resume from")


def test_resume_and_overwrite_together_refused(tmp_path):
    r = run_cli_here("train", tmp_path, "--data", tmp_path / "d.jsonl", "--output", tmp_path, "--resume", "--overwrite", ok=False)
    one_line_error(r, "--resume and --overwrite")


def test_output_that_is_a_file_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    r = run_cli_here("train", tmp_path / "m", "--data", tmp_path / "d.jsonl", "--output", tmp_path / "notes.txt", ok=False)
    one_line_error(r, "notes.txt: exists and is not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_config_file_cannot_build_python_objects(tmp_path):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f'learning_rate: !!python/object/apply:os.mkdir ["{marker}"]\n')
    r = run_cli_here("train", "--config", cfg, ok=False)
    one_line_error(r, "run.yaml:1: not valid YAML")
    assert not marker.exists()


# ---------------------------------------------------------------- SIGTERM saves, as Ctrl-C does


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resume_equals_an_uninterrupted_run(qmodel, tmp_path):
    from safetensors.torch import load_file

    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    common = ["--batch-size", "2", "--grad-accum", "1", "--lora-r", "4", "--lora-dropout", "0.1", "--lr", "1e-3",
              "--warmup-ratio", "0", "--seed", "5", "--optim", "adamw"]
    args = [*QCONVERT, "train", str(qmodel), "--data", str(data), "--output", str(out), "--backend", "reference", *common]
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        p = subprocess.Popen([*args, "--max-steps", "400"], stdout=subprocess.DEVNULL, stderr=err, text=True)
        deadline = time.time() + 180
        while time.time() < deadline and p.poll() is None:
            if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3:
                break
            time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=120)
    text = err_file.read_text()
    assert p.returncode == 128 + signal.SIGTERM, text[-2000:]
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and "resume with --resume" in text and not (out / "adapter_config.json").exists()
    done = int(ckpts[0].name.split("-")[1])
    # the last line says where the checkpoint is and how to go on; no traceback
    assert "Traceback" not in text and text.strip().splitlines()[-1] == f"interrupted at step {done}: saved {ckpts[0]}; resume with --resume"
    assert 3 <= done < 400
    from qconvert.training.plot import read_png_series

    # loss.png is drawn at each save, the interrupt's included, from the metrics so far
    assert read_png_series(out / "loss.png")["train loss"]["x"] == [m["step"] for m in metrics(out)]
    r = subprocess.run([*args, "--max-steps", str(done + 2), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    train(qmodel, data, tmp_path / "straight", *common, "--max-steps", done + 2)
    a = load_file(str(out / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(tmp_path / "straight")]


def _stop_when_logged(args: list[str], out: Path, signum: int, steps: int = 3) -> tuple[subprocess.Popen, str]:
    """Start ``args``, send ``signum`` once ``steps`` metrics rows are logged; (process, its stderr)."""
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= steps):
        assert p.poll() is None and time.time() < deadline, "the run ended before it could be stopped"
        time.sleep(0.1)
    p.send_signal(signum)
    return p, p.communicate(timeout=300)[1]


@pytest.mark.slow
@pytest.mark.parametrize("signum, mode", [(signal.SIGTERM, []), (signal.SIGINT, ["--fsdp"])])
def test_nproc_per_node_stopped_by_a_signal_saves_exits_128_plus_it_and_resumes_exactly(qmodel, tmp_path, signum, mode):
    """`train --nproc-per-node 2`: the signal reaches both processes, each saves its part of the
    checkpoint, and the launcher exits as one process would (130 / 143, one line, no traceback; torchrun
    exits 1 with its own). Resumed, the run ends with the adapter of an uninterrupted one."""
    from safetensors.torch import load_file

    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    common = ["--batch-size", "1", "--grad-accum", "1", "--lora-r", "4", "--lora-dropout", "0.1", "--lr", "1e-3", "--seed", "5", "--warmup-ratio", "0",
              "--optim", "adamw", "--save-steps", "0", *mode]
    args = [*QCONVERT, "train", str(qmodel), "--nproc-per-node", "2", "--data", str(data), "--output", str(out), "--backend", "reference",
            *common]
    p, err = _stop_when_logged([*args, "--max-steps", "400"], out, signum)
    assert p.returncode == 128 + signum and "Traceback" not in err, err[-3000:]
    ckpts = list(out.glob("checkpoint-*"))
    assert len(ckpts) == 1, (sorted(p.name for p in out.iterdir()), err[-3000:])
    [ckpt] = ckpts
    done = int(ckpt.name.split("-")[1])
    assert 3 <= done < 400 and err.strip().splitlines()[-1] == f"interrupted at step {done}: saved {ckpt}; resume with --resume", err[-2000:]
    assert not (out / "adapter_config.json").exists()
    r = subprocess.run([*args, "--max-steps", str(done + 2), "--resume"], capture_output=True, text=True)
    assert r.returncode == 0 and f"resumed from {ckpt} at step {done}" in r.stderr, r.stderr[-3000:]
    straight = tmp_path / "straight"
    r = subprocess.run([*args[:args.index("--output") + 1], str(straight), *args[args.index("--output") + 2:], "--max-steps", str(done + 2)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(straight / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(straight)]


@pytest.mark.slow
def test_nproc_per_node_error_is_one_line_not_one_per_process(qmodel, tmp_path):
    base = [*QCONVERT, "train", str(qmodel), "--nproc-per-node", "2", "--output", str(tmp_path / "out"), "--backend", "reference"]
    r = subprocess.run([*base, "--data", str(tmp_path / "d.jsonl"), "--lr", "-1"], capture_output=True, text=True)
    one_line_error(r, "--lr -1.0: must be > 0")  # checked before any process starts
    r = subprocess.run([*base, "--data", str(tmp_path / "missing.jsonl")], capture_output=True, text=True)
    one_line_error(r, "missing.jsonl: no such file")  # both processes fail alike: rank 0 says it, once
    assert not (tmp_path / "out" / "adapter_config.json").exists()


# ---------------------------------------------------------------- options: one line each


@pytest.mark.slow
def test_output_that_is_the_model_folder_is_refused_even_with_overwrite(qmodel, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(qmodel, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    r = train(model, memorize_set(tmp_path), f"{model}/", "--max-steps", 1, "--overwrite", ok=False)
    one_line_error(r, f"--output {model}/ is the model folder itself", "hint: give --output a folder of its own")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before  # its card was replaced, an adapter written in


@pytest.mark.parametrize("missing", ["MODEL", "--data", "--output"])
def test_missing_model_data_or_output_is_a_usage_error(tmp_path, missing):
    args = {"MODEL": [str(tmp_path / "m")], "--data": ["--data", str(tmp_path / "d.jsonl")], "--output": ["--output", str(tmp_path / "o")]}
    r = run_cli_here("train", *[a for k, v in args.items() if k != missing for a in v], ok=False)
    assert r.returncode == 2 and r.stderr.splitlines() == [
        f"qconvert: error: missing {missing}: give it on the command line or in the --config file", "hint: see `qconvert train --help`"], r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--lora-r", "0"], "--lora-r 0: must be >= 1"),
        (["--lr", "-1"], "--lr -1.0: must be > 0"),
        (["--eval-split", "1.5"], "--eval-split 1.5: must be >= 0 and < 1"),
        (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
        (["--lora-dropout", "1"], "--lora-dropout 1.0: must be >= 0 and < 1"),
        (["--max-steps", "0"], "--max-steps 0: must be >= 1"),
        (["--lr", "nan"], "--lr nan: must be > 0"),
    ],
)
def test_bad_option_is_one_line(tmp_path, flags, needle):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "w1 w2"}\n')
    r = run_cli_here("train", tmp_path / "no-model", "--data", data, "--output", tmp_path / "out", *flags, ok=False)
    one_line_error(r, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_eval_split_that_leaves_nothing_to_train_on_is_refused(qmodel, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text('{"text": "w1 w2 w3"}\n')
    r = train(qmodel, data, tmp_path / "out", "--eval-split", "0.5", ok=False)
    one_line_error(r, "--eval-split 0.5 of 1 examples leaves none to train on")
    assert not (tmp_path / "out" / "adapter_config.json").exists()


@pytest.mark.slow
def test_target_modules_comma_form_accepted_and_a_misspelt_name_refused_with_the_list(qmodel, tmp_path):
    from safetensors.torch import load_file

    data = memorize_set(tmp_path)
    out = tmp_path / "qv"
    train(qmodel, data, out, "--target-modules", "q_proj,v_proj", "--max-steps", 1, "--lora-r", 2, "--grad-accum", 1)
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == ["q_proj", "v_proj"]
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "v_proj"} and len(keys) == 2 * 2 * 2  # 2 layers x 2 modules x A,B
    r = train(qmodel, data, tmp_path / "bad", "--target-modules", "q_prj", "--max-steps", 1, ok=False)
    line = one_line_error(r, "--target-modules 'q_prj'")
    assert "available: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj" in line
    assert not (tmp_path / "bad" / "adapter_config.json").exists()


def _tiny_t5(folder: Path) -> Path:
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("kind, needle", [("t5", "is an encoder-decoder model"), ("bert", "BertModel is not a causal language model")])
def test_encoder_models_refused(tmp_path, kind, needle):
    model = _tiny_t5(tmp_path / "t5") if kind == "t5" else make_tiny_bert(tmp_path / "bert")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "w1 w2"}\n')
    r = run_cli_here("train", model, "--data", data, "--output", tmp_path / "out", ok=False)
    one_line_error(r, needle, "decoder-only causal LM")
