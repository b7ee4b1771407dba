"""Every write goes through one writer (qconvert.io.writes), and `train` keeps the output policy of
the other commands: a link planted at any name a run writes (a fixed temporary name, the lock, the
log it appends to) never leads to writing, appending, creating or deleting outside; `train` never
writes inside its inputs, the current or home folder; `--overwrite` removes only what a previous
run recorded in its manifest; a second run into the same OUT is refused while one holds the lock;
a resumed run's log continues from its checkpoint; a full disk during a checkpoint is one clear
line and leaves no checkpoint that looks complete."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import QCONVERT
from test_hostile_train import one_line_error
from test_train import memorize_set, metrics, qmodel, train  # noqa: F401  (qmodel is a fixture)

from qconvert.errors import OutputExistsError


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder outside every output, holding a file that must keep its bytes."""
    d = tmp_path / "outside"
    d.mkdir()
    (d / "precious.txt").write_text("precious")
    return d


def untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert (outside / "precious.txt").read_text() == "precious"


# ---------------------------------------------------------------- the writer: links never followed


def test_config_yaml_written_past_a_link_at_its_old_temporary_name(tmp_path, outside):
    from qconvert.training.config import write_config

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml.tmp").symlink_to(outside / "precious.txt")
    (out / "config.yaml").symlink_to(outside / "precious.txt")  # the file itself a link: replaced, not written through
    write_config(out / "config.yaml", {"lr": 0.001})
    untouched(outside)
    assert not (out / "config.yaml").is_symlink() and "lr: 0.001" in (out / "config.yaml").read_text()


def test_loss_plot_and_verify_plot_written_past_links(tmp_path, outside):
    from qconvert.convert.verify_plot import plot_quantization_error
    from qconvert.training.plot import read_png_series, write_loss_plot

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n')
    (out / "loss.png.tmp").symlink_to(outside / "precious.txt")
    write_loss_plot(out / "metrics.jsonl", out / "loss.png")
    assert read_png_series(out / "loss.png")["train loss"]["y"] == [2.0, 1.5]
    (out / ".e.png.tmp").symlink_to(outside / "e.png")  # verify --plot's old temporary name
    error = {"tensors": [{"name": "model.layers.0.self_attn.q_proj.weight", "sqnr_db": 20.0}], "sqnr_db_mean": 20.0,
             "sqnr_db_min": 20.0}
    plot_quantization_error(error, out / "e.png")
    untouched(outside)
    assert (out / "e.png").read_bytes().startswith(b"\x89PNG")


def test_adapter_config_rewrite_past_a_link(tmp_path, outside):
    from qconvert.model.adapters import stable_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps({"target_modules": ["v", "q"], "r": 2}))
    (tmp_path / "adapter_config.json.tmp").symlink_to(outside / "precious.txt")
    assert stable_adapter_config(tmp_path)["target_modules"] == ["q", "v"]
    untouched(outside)


def test_metrics_log_is_never_appended_through_a_link(tmp_path, outside):
    from qconvert.training.loop import _append

    (tmp_path / "metrics.jsonl").symlink_to(outside / "precious.txt")
    with pytest.raises(OutputExistsError, match="metrics.jsonl: is a symbolic link"):
        _append(tmp_path / "metrics.jsonl", {"step": 1})
    untouched(outside)
    _append(tmp_path / "fresh.jsonl", {"step": 1})
    assert (tmp_path / "fresh.jsonl").read_text() == '{"step": 1}\n'


def test_lock_file_link_creates_nothing_outside(tmp_path, outside):
    from qconvert.io.staging import lock_path, output_lock

    out = tmp_path / "out"
    lock_path(out).symlink_to(outside / "created-by-the-lock")
    with pytest.raises(OutputExistsError, match="the lock file is a symbolic link"):
        with output_lock(out):
            pass
    untouched(outside)
    assert lock_path(out).is_symlink()  # the link is the user's to remove; nothing was written through it


def test_shard_writer_leftover_link_is_replaced_not_written_through(tmp_path, outside):
    import torch

    from qconvert.io.shards import ShardWriter

    (tmp_path / "model.safetensors.tmp").symlink_to(outside / "precious.txt")
    (tmp_path / "model.safetensors.data").symlink_to(outside / "precious.txt")
    for reserve in (None, 4096):
        w = ShardWriter(tmp_path / "model.safetensors", {"format": "pt"}, reserve=reserve)
        w.add("w", torch.ones(4))
        w.close()
    untouched(outside)
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "model.safetensors"))["w"].tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.slow
def test_train_run_writes_past_links_planted_at_its_temporary_names(qmodel, tmp_path, outside):
    """A stopped run, then links planted at every fixed name a checkpoint, the adapter, the config
    and the plot were built under, old and new; resuming writes none of them through."""
    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    common = ["--max-steps", 2, "--batch-size", 2, "--grad-accum", 1, "--lora-r", 2, "--save-steps", 1]
    train(qmodel, data, out, *common, "--stop-after", 1)
    for i, name in enumerate([".checkpoint-2.tmp", ".checkpoint-2.qconvert-tmp", ".adapter.tmp", ".adapter.qconvert-tmp"]):
        (outside / f"d{i}").mkdir()
        (out / name).symlink_to(outside / f"d{i}")
    for name in ("config.yaml.tmp", "loss.png.tmp"):
        (out / name).symlink_to(outside / "precious.txt")
    train(qmodel, data, out, *common, "--resume")
    assert sorted(p.name for p in outside.iterdir()) == ["d0", "d1", "d2", "d3", "precious.txt"]
    assert all(not any((outside / f"d{i}").iterdir()) for i in range(4))
    untouched_file = (outside / "precious.txt").read_text()
    assert untouched_file == "precious"
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2]
    assert (out / "checkpoint-1").is_dir() and (out / "adapter_model.safetensors").is_file()
    assert not any(p.name.endswith(".qconvert-tmp") for p in out.iterdir())


# ---------------------------------------------------------------- train's output policy


def _run_train(model, data, out, *extra, cwd=None, config=None):
    args = [*QCONVERT, "train", str(model), "--data", str(data), "--output", str(out), "--max-steps", "1", "--batch-size", "2",
            "--grad-accum", "1", "--lora-r", "2", "--backend", "reference", *map(str, extra)]
    if config:
        args += ["--config", str(config)]
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd)


def _folder(path: Path) -> dict[str, bytes | None]:
    return {p.relative_to(path).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(path.rglob("*"))}


@pytest.mark.slow
def test_train_into_the_current_folder_with_overwrite_is_refused(qmodel, tmp_path):
    """The issue's case: `train ../q --data ../d.jsonl --config config.yaml --output . --overwrite`
    deleted the folder's runs/ and replaced the user's config.yaml."""
    data = memorize_set(tmp_path)
    work = tmp_path / "work"
    (work / "runs" / "exp1").mkdir(parents=True)
    (work / "runs" / "exp1" / "events").write_text("mine")
    (work / "config.yaml").write_text("max_steps: 1\n")
    before = _folder(work)
    r = _run_train(qmodel, data, ".", "--overwrite", cwd=work, config="config.yaml")
    one_line_error(r, "work: the output holds the input config.yaml")
    r = _run_train(qmodel, data, ".", "--overwrite", cwd=work)
    one_line_error(r, "the output is the current folder")
    assert _folder(work) == before


@pytest.mark.slow
@pytest.mark.parametrize("where", ["dataset folder", "inside the dataset folder", "config folder"])
def test_train_never_writes_inside_an_input(qmodel, tmp_path, where):
    ds = tmp_path / "ds"
    ds.mkdir()
    data = memorize_set(ds)
    cfg = tmp_path / "cfgs" / "run.yaml"
    cfg.parent.mkdir()
    cfg.write_text("lora_r: 2\n")
    out, given, needle = {"dataset folder": (ds, data, f"ds: the output holds the input {data}"),
                          "inside the dataset folder": (ds / "run", ds, f"run: the output is inside the input {ds}"),
                          "config folder": (cfg.parent, data, f"cfgs: the output holds the input {cfg}")}[where]
    before = _folder(tmp_path)
    r = _run_train(qmodel, given, out, "--overwrite", config=cfg)
    one_line_error(r, needle)
    assert _folder(tmp_path) == before


@pytest.mark.slow
def test_overwrite_removes_only_what_the_previous_run_recorded(qmodel, tmp_path):
    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    r = _run_train(qmodel, data, out, "--save-steps", 1, "--max-steps", 2)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / ".qconvert-run.json").read_text())["files"][-1] == "checkpoint-1"
    # the user's own files beside the run, and another tool's checkpoint
    (out / "notes.txt").write_text("mine")
    (out / "checkpoint-7").mkdir()
    (out / "checkpoint-7" / "optimizer.pt").write_bytes(b"other tool")
    (out / "my-runs").mkdir()
    theirs = {n: _folder(out).get(n) for n in ("notes.txt", "checkpoint-7/optimizer.pt")}
    r = _run_train(qmodel, data, out, "--overwrite", "--max-steps", 1, "--save-steps", 0)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not (out / "checkpoint-1").exists()  # the old run's checkpoint went
    assert {n: _folder(out).get(n) for n in theirs} == theirs and (out / "my-runs").is_dir()
    assert [m["step"] for m in metrics(out)] == [1]
    # --resume picks this run's checkpoints, never the other tool's checkpoint-7
    r = _run_train(qmodel, data, out, "--resume")
    one_line_error(r, "no checkpoint-N folder to resume from")


@pytest.mark.slow
def test_overwrite_of_a_folder_no_run_recorded_is_refused_naming_its_files(qmodel, tmp_path):
    data = memorize_set(tmp_path)
    out = tmp_path / "other"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "model.bin").write_bytes(b"x")
    (out / "config.yaml").write_text("theirs")
    before = _folder(out)
    r = _run_train(qmodel, data, out, "--overwrite")
    one_line_error(r, "holds files no qconvert train run recorded", "checkpoint-7, config.yaml", "hint: --overwrite removes only what",
                   "choose another --output")
    assert _folder(out) == before


@pytest.mark.slow
def test_second_overwrite_while_a_run_holds_the_lock_is_refused(qmodel, tmp_path):
    from qconvert.io.staging import output_lock

    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".qconvert-run.json").write_text(json.dumps({"qconvert": "train", "version": 1, "files": ["checkpoint-3"]}))
    (out / "checkpoint-3").mkdir()
    (out / "checkpoint-3" / "trainer_state.safetensors").write_bytes(b"the running run's")
    before = _folder(out)
    with output_lock(out):  # the running run
        r = _run_train(qmodel, data, out, "--overwrite")
    one_line_error(r, "another qconvert run is writing it")
    assert _folder(out) == before


def test_a_crafted_manifest_cannot_name_files_outside_the_run(tmp_path, outside):
    from qconvert.training.outdir import prepare_output

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    names = ["../outside/precious.txt", "/etc/passwd", "notes.txt", "", 7, "checkpoint-1/../../outside"]
    (out / ".qconvert-run.json").write_text(json.dumps({"qconvert": "train", "version": 1, "files": names}))
    prepare_output(out, resume=None, overwrite=True)
    untouched(outside)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("resume", [None, "auto"])
def test_train_output_turned_into_a_link_after_the_checks_is_refused(tmp_path, outside, resume):
    """The train CLI refuses a linked --output (io.staging.check_location); one planted afterwards, before
    the run prepares its folder, is refused there too, and nothing is written where it points."""
    from qconvert.errors import OutputExistsError
    from qconvert.training.outdir import prepare_output

    out = tmp_path / "run"
    out.symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        prepare_output(out, resume=resume, overwrite=False)
    untouched(outside)


def test_train_output_made_as_a_plain_folder(tmp_path):
    """prepare_output makes a missing --output (with its parents) and writes the manifest there."""
    from qconvert.training.outdir import prepare_output

    out = tmp_path / "a" / "run"
    prepare_output(out, resume=None, overwrite=False)
    assert out.is_dir() and not out.is_symlink() and json.loads((out / ".qconvert-run.json").read_text())["qconvert"] == "train"


# ---------------------------------------------------------------- the log after a resume (issue 24, item 7)


def test_truncate_metrics_keeps_rows_up_to_the_checkpoint(tmp_path):
    from qconvert.training.outdir import truncate_metrics

    p = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3, 4)] + [{"step": 2, "eval_loss": 0.5}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    note = truncate_metrics(p, 2)
    assert note == "metrics.jsonl: removed 2 rows after step 2 (logged after that checkpoint) and 1 unreadable lines"
    assert [json.loads(l) for l in p.read_text().splitlines()] == [rows[0], rows[1], rows[4]]
    assert truncate_metrics(p, 2) is None


@pytest.mark.slow
def test_resume_after_a_hard_kill_logs_each_step_once(qmodel, tmp_path):
    """A run killed after step 3, whose last checkpoint is step 2, resumed: steps 3 and 4 were
    logged twice and the loss curve drew a line back from 3 to 2."""
    from qconvert.training.plot import read_png_series

    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    common = ["--max-steps", 4, "--batch-size", 2, "--grad-accum", 1, "--lora-r", 2, "--save-steps", 2, "--lora-dropout", 0.0]
    train(qmodel, data, out, *common, "--stop-after", 3)
    import shutil

    shutil.rmtree(out / "checkpoint-3")  # the kill came before the interrupt's checkpoint: the last one is step 2
    first = {m["step"]: m["loss"] for m in metrics(out)}
    r = train(qmodel, data, out, *common, "--resume")
    assert "metrics.jsonl: removed 1 rows after step 2" in r.stderr
    steps = [m["step"] for m in metrics(out)]
    assert steps == [1, 2, 3, 4]
    again = {m["step"]: m["loss"] for m in metrics(out)}
    assert again[3] == first[3]  # the same step, computed again from the checkpoint: the same loss
    xs = read_png_series(out / "loss.png")["train loss"]["x"]
    assert xs == sorted(xs) == [1, 2, 3, 4]


# ---------------------------------------------------------------- a full disk during a checkpoint

#: Runs the CLI (argv[2:]) with files limited to argv[1] bytes (a full disk in effect: a write past
#: the limit fails with EFBIG; SIGXFSZ ignored as a shell's `ulimit -f` child would not).
UNDER_FILE_SIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from qconvert.cli.main import main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("limit, file", [(100_000, "trainer_state.safetensors"), (30_000, "adapter_model.safetensors")])
def test_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_checkpoint(qmodel, tmp_path, limit, file):
    """torch.save and safetensors turn the write's OSError into a RuntimeError / SafetensorError
    that said "unexpected ... this is a bug"; and the half-written `.checkpoint-1.tmp/` stayed."""
    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    args = ["train", str(qmodel), "--data", str(data), "--output", str(out), "--max-steps", "2", "--batch-size", "2",
            "--grad-accum", "1", "--lora-r", "8", "--save-steps", "1", "--backend", "reference"]
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([sys.executable, "-c", UNDER_FILE_SIZE, str(limit), *args], capture_output=True, text=True, env=env)
    block = one_line_error(r, f"checkpoint-1/{file}: File too large", "hint: free space on that file system")
    assert "unexpected" not in block
    assert not any(p.name.startswith((".checkpoint", "checkpoint")) for p in out.iterdir()), sorted(out.iterdir())


# ---------------------------------------------------------------- terminal escapes in export-adapter's line


def test_export_adapter_line_escapes_the_base_model_name(tmp_path):
    from test_hostile_adapter import _adapter_folder

    a = _adapter_folder(tmp_path)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/x\x1b]0;owned\x07\x1b[2J"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    r = subprocess.run([*QCONVERT, "export-adapter", str(a), str(tmp_path / "clean")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout + r.stderr and "acme/x\\x1b]0;owned\\x07\\x1b[2J" in r.stdout


def test_loss_plot_skips_a_damaged_metrics_line(tmp_path):
    """A run killed mid-append leaves half a line: drawing the plot raised JSONDecodeError (a "bug" line)."""
    from qconvert.training.plot import read_png_series, write_loss_plot

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n[1]\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    write_loss_plot(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert read_png_series(tmp_path / "loss.png")["train loss"] == {"x": [1.0, 2.0], "y": [2.0, 1.5]}
