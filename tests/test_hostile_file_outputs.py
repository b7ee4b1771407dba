"""Commands that write one file (export-gguf's OUTPUT, verify --plot FILE.png) keep the output rules
of the folder writers (io.staging.check_file_output):

- `verify CKPT --against SRC --plot CKPT/x.png` wrote the picture into its input folder (inputs are
  never modified; the folder writers refuse an OUTPUT inside an input);
- an existing folder at the file's name (`--plot figs.png/`, `export-gguf M out/`): the whole run
  was done, then it failed naming a hidden temporary file ("Is a directory"); now it is refused
  before the work, naming the folder."""

from __future__ import annotations

import pytest

from hostile_util import make_llama_files, tree_digest
from test_hostile_runtime import refused


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("hostile-file-outputs")
    src = make_llama_files(d / "src")
    quantize_checkpoint(str(src), d / "q")
    return {"src": src, "q": d / "q"}


@pytest.mark.parametrize("inside", ["q", "src"])
def test_verify_plot_inside_an_input_is_refused(env, capsys, inside):
    before = {k: tree_digest(env[k]) for k in ("q", "src")}
    refused(capsys, "verify", env["q"], "--against", env["src"], "--plot", env[inside] / "sqnr.png",
            match=f"the output is inside the input {env[inside]}")
    assert {k: tree_digest(env[k]) for k in ("q", "src")} == before


def test_verify_plot_onto_a_folder_is_refused_before_the_work(env, capsys, tmp_path):
    (tmp_path / "figs.png").mkdir()
    (tmp_path / "figs.png" / "keep.txt").write_text("mine")
    refused(capsys, "verify", env["q"], "--against", env["src"], "--plot", tmp_path / "figs.png", "--overwrite",
            match="is a folder; this output is one file")
    assert [p.name for p in (tmp_path / "figs.png").iterdir()] == ["keep.txt"]


def test_export_gguf_onto_a_folder_is_refused_before_the_work(env, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    refused(capsys, "export-gguf", env["src"], out, match="is a folder; this output is one file")  # empty: check_output lets it by
    (out / "keep.txt").write_text("mine")
    refused(capsys, "export-gguf", env["src"], out, "--overwrite", match="is a folder; this output is one file")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_verify_plot_beside_the_inputs_is_written(env, capsys, tmp_path):
    from runtime_helpers import cli

    rc, out, err = cli(capsys, "verify", env["q"], "--against", env["src"], "--plot", tmp_path / "sqnr.png")
    assert rc == 0, err
    assert (tmp_path / "sqnr.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00", bytes(range(256)) * 4])
def test_compare_with_a_damaged_gguf_is_one_line(env, capsys, tmp_path, content):
    """compare A.gguf B: llama-cpp-python raises a bare ValueError for a file it cannot load (was
    reported as a bug in qconvert)."""
    pytest.importorskip("llama_cpp")
    bad = tmp_path / "m.gguf"
    bad.write_bytes(content)
    refused(capsys, "compare", bad, env["src"], match="llama.cpp cannot load this GGUF file")


def test_export_adapter_reads_nothing_around_a_plain_adapter(tmp_path, capsys):
    """export-adapter looked for the run's config.yaml in the adapter's parent folder too: another
    tool's config.yaml there (data_format: alpaca) made the card state a prompt format the adapter
    was never trained on. Only a checkpoint-N that a train run's manifest lists reads its run's."""
    from hostile_util import make_lora
    from runtime_helpers import cli

    base = make_llama_files(tmp_path / "base")
    project = tmp_path / "project"
    adapter = make_lora(project / "adapter", base)
    (project / "config.yaml").write_text("data_format: alpaca\n")
    rc, _, err = cli(capsys, "export-adapter", adapter, tmp_path / "out")
    assert rc == 0, err
    card = (tmp_path / "out" / "README.md").read_text()
    assert "alpaca" not in card and "### Instruction" not in card, card
    # a train run's checkpoint still takes its run's format
    run = tmp_path / "run"
    ckpt = make_lora(run / "checkpoint-3", base)
    (run / "config.yaml").write_text("data_format: alpaca\n")
    (run / ".qconvert-run.json").write_text('{"qconvert": "train", "version": 1, "files": ["config.yaml", "checkpoint-3"]}\n')
    rc, _, err = cli(capsys, "export-adapter", ckpt, tmp_path / "out2")
    assert rc == 0, err
    assert "Prompt format: alpaca" in (tmp_path / "out2" / "README.md").read_text()
