"""A train run refused for its input after it claimed --output (bad data, a tokenizer past the
embeddings, records past the positions) leaves only its manifest there. The corrected command, run
again into the same folder, must start: the old code refused it with "already holds files (a
previous run?)" though no run had written anything."""

from __future__ import annotations

import pytest

from runtime_helpers import cli, make_word_llama, write_jsonl


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("hostile-rerun")
    quantize_checkpoint(str(make_word_llama(d / "src")), d / "q", compute_dtype="float32")
    return d / "q"


def test_rerun_after_a_refused_train_starts(qmodel, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    out = tmp_path / "out"
    rc, _, err = cli(capsys, "train", qmodel, "--data", bad, "--output", out, "--max-steps", 1, "--backend", "reference")
    assert rc == 1 and "not valid JSON" in err, err
    assert sorted(p.name for p in out.iterdir()) == [".qconvert-run.json"]  # what the refused run left: its claim
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "w1 w2 w3 w4"}] * 4)
    rc, _, err = cli(capsys, "train", qmodel, "--data", good, "--output", out, "--max-steps", 1, "--backend", "reference")
    assert rc == 0, err
    assert (out / "adapter_model.safetensors").is_file()


def test_a_folder_with_a_users_file_beside_the_claim_is_still_refused(qmodel, tmp_path, capsys):
    """Only a folder that holds nothing but the claim counts as empty."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".qconvert-run.json").write_text('{"qconvert": "train", "version": 1, "files": []}\n')
    (out / "notes.txt").write_text("mine")
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": "w1 w2 w3 w4"}] * 4)
    rc, _, err = cli(capsys, "train", qmodel, "--data", good, "--output", out, "--max-steps", 1, "--backend", "reference")
    assert rc == 1 and "already holds files" in err, err
    assert (out / "notes.txt").read_text() == "mine"
