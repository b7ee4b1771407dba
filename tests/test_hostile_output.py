"""Careless and hostile output paths: OUT overlapping an input, under a file, a link, the current
folder; staging folders that are links; a tampered resume journal; a merge that would write NaN.
A refused run modifies no input and leaves nothing that looks complete."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import QCONVERT
from hostile_util import make_llama_files, make_lora, tree_digest
from qconvert.convert import quantize as Q
from qconvert.convert.quantize import quantize_checkpoint
from qconvert.io.staging import staging_dir
from qconvert.errors import FormatError, OptionError, OutputExistsError
from qconvert.export.adapter import export_adapter
from qconvert.export.merge import merge_adapter


def quantize(src, out, **kw):
    return quantize_checkpoint(str(src), str(out), log=lambda m: None, **kw)


@pytest.fixture
def src(tmp_path) -> Path:
    return make_llama_files(tmp_path / "src")


@pytest.fixture
def base(tmp_path, src) -> Path:
    quantize(src, tmp_path / "base")
    return tmp_path / "base"


def nothing_complete(out: Path) -> None:
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert not staging_dir(out).exists() or not (staging_dir(out) / "config.json").exists()


def test_output_is_the_source(tmp_path, src):
    before = tree_digest(src)
    for out in (src, tmp_path / "." / "src", tmp_path / "x" / ".." / "src"):
        with pytest.raises(OptionError, match="the output is the input"):
            quantize(src, out, overwrite=True)
    assert tree_digest(src) == before


def test_output_inside_or_around_the_source(tmp_path, src):
    before = tree_digest(src)
    with pytest.raises(OptionError, match="the output is inside the input"):
        quantize(src, src / "out")
    assert not (src / "out").exists() and not staging_dir(src / "out").exists()
    with pytest.raises(OptionError, match="the output holds the input"):
        quantize(src, tmp_path, overwrite=True)
    link = tmp_path / "elsewhere" / "link"
    link.parent.mkdir()
    link.symlink_to(src)
    with pytest.raises(OptionError, match="the output is inside the input"):
        quantize(src, link / "out")  # the same folder reached through a link
    assert tree_digest(src) == before


def test_output_under_a_regular_file(tmp_path, src):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OptionError, match=r"cannot create the output under .*notes.txt, which is a file"):
        quantize(src, tmp_path / "notes.txt" / "out")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_output_that_is_a_link(tmp_path, src):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    (tmp_path / "out").symlink_to(target)
    with pytest.raises(OptionError, match="the output is a symbolic link"):
        quantize(src, tmp_path / "out", overwrite=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OptionError, match="the output is a symbolic link"):
        quantize(src, tmp_path / "dangling")
    assert (target / "keep.txt").read_text() == "mine" and (tmp_path / "out").is_symlink()


def test_output_that_is_the_current_folder_or_above_it(tmp_path, src, monkeypatch):
    work = tmp_path / "a" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out, what in ((".", "the current folder"), ("..", "a parent of the current folder"), ("/", "holds the input|a parent of the current")):
        with pytest.raises(OptionError, match=what):
            quantize(src, out, overwrite=True)
    assert (work / "keep.txt").read_text() == "mine"


def test_staging_folder_that_is_a_link_is_not_emptied(tmp_path, src):
    """The staging folder is emptied when it holds another run's work: through a link planted in
    its place that would delete the files of the folder it points to."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    staging_dir(tmp_path / "out").symlink_to(victim)
    with pytest.raises(OptionError, match="in the way of the output"):
        quantize(src, tmp_path / "out")
    assert (victim / "thesis.tex").read_text() == "years of work"


def test_overwrite_replaces_its_own_output_never_a_users_files(tmp_path, src):
    """--overwrite replaces a folder qconvert wrote (leaving no trash beside it), never a file where
    the output folder goes, a user's file inside the folder or a hidden folder such as .git: each is
    refused, named, and kept byte for byte."""
    out = tmp_path / "out"
    out.write_text("old")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="a file, where this output is a folder" if overwrite else "not empty"):
            quantize(src, out, overwrite=overwrite)
    assert out.read_text() == "old"
    out.unlink()
    quantize(src, out)
    quantize(src, out, overwrite=True)
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    for planted in ("notes.txt", ".git/HEAD", "sub/data.csv", "empty/"):
        path = out / planted
        if planted.endswith("/"):
            path.mkdir()
        else:
            path.parent.mkdir(exist_ok=True)
            path.write_text("mine")
        with pytest.raises(OutputExistsError, match=f"holds what qconvert does not write \\({planted}\\)"):
            quantize(src, out, overwrite=True)
        assert path.is_dir() if planted.endswith("/") else path.read_text() == "mine"
        shutil.rmtree(out / planted.split("/")[0]) if "/" in planted else path.unlink()
    (out / "link").symlink_to(tmp_path / "src")  # a link counts by its own name, its target untouched
    with pytest.raises(OutputExistsError, match="link"):
        quantize(src, out, overwrite=True)


def test_tampered_resume_journal_is_not_trusted(tmp_path, src, monkeypatch):
    """A journal edited to list other tensor names (or with fields of the wrong type) is not used:
    the result is the same as a clean run's."""
    out = tmp_path / "out"
    kw = dict(max_shard_size="2KB")
    quantize(src, tmp_path / "clean", **kw)

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Q, "_write_config", stop)
    with pytest.raises(KeyboardInterrupt):
        quantize(src, out, **kw)
    monkeypatch.undo()
    journal = staging_dir(out) / "journal.json"
    j = json.loads(journal.read_text())
    first = sorted(j["done"])[0]
    j["done"][first]["keys"] = ["../../../etc/passwd"] + j["done"][first]["keys"][1:]
    journal.write_text(json.dumps(j))
    quantize(src, out, **kw)
    assert json.loads((out / "model.safetensors.index.json").read_text()) == json.loads((tmp_path / "clean" / "model.safetensors.index.json").read_text())
    # a journal of the wrong shape: started over, no traceback
    monkeypatch.setattr(Q, "_write_config", stop)
    with pytest.raises(KeyboardInterrupt):
        quantize(src, out, overwrite=True, **kw)
    monkeypatch.undo()
    j = json.loads(journal.read_text())
    j["done"] = [j["done"]]
    journal.write_text(json.dumps(j))
    quantize(src, out, overwrite=True, **kw)
    assert (out / "model.safetensors.index.json").read_text() == (tmp_path / "clean" / "model.safetensors.index.json").read_text()


# ------------------------------------------------------------------ merge and export-adapter
def test_merge_output_overlapping_its_inputs(tmp_path, src, base):
    lora = make_lora(tmp_path / "lora", src)
    before = tree_digest(base), tree_digest(lora)
    for out, what in ((base, "is the input"), (lora / "merged", "is inside the input"), (tmp_path, "holds the input")):
        with pytest.raises(OptionError, match=what):
            merge_adapter(str(base), str(lora), out, overwrite=True)
    with pytest.raises(OptionError, match="is inside the input"):
        merge_adapter(str(base), str(lora), src / "merged", base_original=str(src))
    assert (tree_digest(base), tree_digest(lora)) == before and not (lora / "merged").exists()


def test_merge_output_under_a_regular_file(tmp_path, src, base):
    lora = make_lora(tmp_path / "lora", src)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OptionError, match="which is a file"):
        merge_adapter(str(base), str(lora), tmp_path / "file" / "merged")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_merge_with_a_non_finite_adapter_writes_nothing(tmp_path, src, base, bad):
    lora = make_lora(tmp_path / "lora", src)
    w = load_file(str(lora / "adapter_model.safetensors"))
    k = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    w[k][3, 1] = bad
    save_file(w, str(lora / "adapter_model.safetensors"))
    with pytest.raises(FormatError, match=r"the LoRA update of 'model.layers.0.self_attn.v_proj.weight' holds NaN or Inf"):
        merge_adapter(str(base), str(lora), tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not staging_dir(tmp_path / "merged").exists()


def test_merge_that_overflows_the_output_dtype_writes_nothing(tmp_path, src, base):
    lora = make_lora(tmp_path / "lora", src)
    w = load_file(str(lora / "adapter_model.safetensors"))
    w["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].fill_(1e5)  # finite in fp32, not in fp16
    save_file(w, str(lora / "adapter_model.safetensors"))
    with pytest.raises(FormatError, match=r"model.layers.0.self_attn.q_proj.weight: the merged weight holds NaN or Inf as float16"):
        merge_adapter(str(base), str(lora), tmp_path / "merged", dtype="float16")
    assert not (tmp_path / "merged").exists() and not staging_dir(tmp_path / "merged").exists()
    s = merge_adapter(str(base), str(lora), tmp_path / "merged", dtype="float32")  # float32 holds it
    assert s["merged_modules"] == 2 and torch.isfinite(load_file(str(tmp_path / "merged" / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]).all()


def test_export_adapter_output_inside_its_source(tmp_path, src):
    lora = make_lora(tmp_path / "lora", src)
    before = tree_digest(lora)
    with pytest.raises(OptionError, match="is inside the input"):
        export_adapter(lora, lora / "export")
    with pytest.raises(OptionError, match="is the input"):
        export_adapter(lora, lora, overwrite=True)
    assert tree_digest(lora) == before


# ------------------------------------------------------------------ the CLI's one line
def cli_fails(*args, cwd=None) -> str:
    r = subprocess.run([*QCONVERT, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.startswith("qconvert: error: ") and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.splitlines()) <= 3, r.stderr  # the error, perhaps its continuation, the hint
    return " ".join(r.stderr.split())


@pytest.mark.slow
def test_cli_one_line_for_output_refusals(tmp_path, src, base):
    before = tree_digest(src)
    assert "the output is the input" in cli_fails("quantize", src, src, "--overwrite")
    (tmp_path / "notes.txt").write_text("x")
    assert "which is a file" in cli_fails("merge", base, make_lora(tmp_path / "lora", src), tmp_path / "notes.txt" / "m")
    assert tree_digest(src) == before
