"""`qconvert train` data sources through the `datasets` library: parquet, CSV, txt, ShareGPT, and a
Hub dataset id fetched through the real huggingface_hub client from a loopback Hub server (olah)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

import olah_server
from test_train import WORDS, metrics, qmodel, train  # noqa: F401  (qmodel is a fixture)

ALPACA = [{"instruction": f"{WORDS[i]} {WORDS[i + 1]}", "input": "", "output": f"{WORDS[i + 2]} {WORDS[i + 3]}"} for i in range(0, 40, 4)]


def write_parquet(rows: list[dict], path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.slow
def test_parquet_and_csv_train_the_same_records_as_jsonl(qmodel, tmp_path):
    import csv

    from qconvert.training.data import load_records

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in ALPACA) + "\n")
    pq_file = write_parquet(ALPACA, tmp_path / "a.parquet")
    csv_file = tmp_path / "a.csv"
    with open(csv_file, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(ALPACA)
    want = [r for _, r in load_records(jsonl)]
    assert [r for _, r in load_records(pq_file)] == want
    # CSV: an empty cell reads as absent (None), which alpaca treats as no input
    assert [{**r, "input": r.get("input", "")} for _, r in load_records(csv_file)] == want
    common = ["--max-steps", 3, "--batch-size", 2, "--grad-accum", 1, "--lora-r", 2, "--lora-dropout", 0, "--save-steps", 0]
    losses = {}
    for f in (jsonl, pq_file, csv_file):
        r = train(qmodel, f, tmp_path / f.suffix[1:], *common)
        assert f"data: 10 records from {f} (alpaca 10); 0 dropped" in r.stderr, r.stderr
        losses[f.suffix] = [m["loss"] for m in metrics(tmp_path / f.suffix[1:])]
    assert losses[".parquet"] == losses[".jsonl"] == losses[".csv"]


def test_sharegpt_and_txt_records(qmodel, tmp_path):
    from transformers import AutoTokenizer

    from qconvert.training.data import DataReport, build_examples, load_records

    tok = AutoTokenizer.from_pretrained(qmodel)
    w = lambda *ids: " ".join(WORDS[i] for i in ids)  # noqa: E731
    share = {"conversations": [{"from": "system", "value": w(1)}, {"from": "human", "value": w(2)}, {"from": "gpt", "value": w(3, 4)}]}
    chat = {"messages": [{"role": "system", "content": w(1)}, {"role": "user", "content": w(2)}, {"role": "assistant", "content": w(3, 4)}]}
    rep = DataReport()
    a, b = build_examples([(1, share), (2, chat)], tok, report=rep)
    assert (a.input_ids, a.labels) == (b.input_ids, b.labels) and rep.formats == {"sharegpt": 1, "chat": 1}
    learned = tok.convert_ids_to_tokens([t for t in a.labels if t != -100])
    assert WORDS[3] in learned and WORDS[4] in learned and WORDS[2] not in learned and WORDS[1] not in learned
    bad = {"conversations": [{"from": "alien", "value": w(1)}]}
    rep = DataReport()
    assert build_examples([(1, bad)], tok, strict=False, report=rep) == [] and rep.dropped == {"malformed": 1}
    assert "unknown speaker 'alien'" in rep.problems[0]
    txt = tmp_path / "t.txt"
    txt.write_text(f"{w(1, 2)}\n{w(3)}\n")
    assert load_records(txt) == [(1, {"text": w(1, 2)}), (2, {"text": w(3)})]


# ---------------------------------------------------------------- a Hub dataset, through a loopback Hub


def add_dataset_repo(hub: olah_server.OlahHub, repo_id: str, folder: Path) -> str:
    """As OlahHub.add_repo, for a dataset repo (olah serves datasets/ORG/NAME the way it serves models)."""
    org, name = repo_id.split("/")
    g = hub.mirrors / "datasets" / org / name
    g.mkdir(parents=True)
    olah_server.git(g, "init", "-q", "-b", "main")
    for p in folder.rglob("*"):
        if p.is_file():
            dst = g / p.relative_to(folder)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(p.read_bytes())
    olah_server.git(g, "add", "-A")
    olah_server.git(g, "commit", "-q", "-m", "upload")
    sha = olah_server.git(g, "rev-parse", "HEAD")
    rev = hub.repos / "api" / "datasets" / org / name / "revision"
    for r in ("main", sha):
        (rev / r).mkdir(parents=True, exist_ok=True)
        (rev / r / "resolved_commit.json").write_text(json.dumps({"status_code": 200, "headers": {}, "cached_at": time.time()}))
        (rev / r / "resolved_commit.json.body").write_text(sha)
    (rev / sha / "meta_head.json").write_text(json.dumps({"sha": sha, "lastModified": "2026-11-22T00:00:00.000Z"}))
    return sha


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    if not olah_server.available():
        if os.environ.get("QCONVERT_REQUIRE_OLAH"):
            pytest.fail("olah is required (QCONVERT_REQUIRE_OLAH=1) but .venv-olah is missing", pytrace=False)
        pytest.skip("olah not installed (tools/setup_olah.sh)")
    d = tmp_path_factory.mktemp("hubdata")
    repo = d / "repo"
    write_parquet(ALPACA[:8], repo / "data" / "train-00000-of-00001.parquet")
    write_parquet(ALPACA[8:], repo / "data" / "test-00000-of-00001.parquet")
    write_parquet([{"text": f"{WORDS[i]} {WORDS[i + 1]} {WORDS[i + 2]}"} for i in range(5)], repo / "plain" / "train.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*\n"
        "  - split: test\n    path: data/test-*\n- config_name: plain\n  data_files:\n  - split: train\n    path: plain/train.parquet\n---\n# tiny\n"
    )
    h = olah_server.OlahHub(d / "olah")
    add_dataset_repo(h, "acme/tiny-alpaca", repo)
    h.start()
    yield h
    h.stop()


def hub_env(hub, tmp_path, offline=False) -> dict:
    return dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_OFFLINE="1" if offline else "0",
                HF_HUB_DISABLE_XET="1", HF_HUB_ETAG_TIMEOUT="30", HF_HUB_DOWNLOAD_TIMEOUT="30")


@pytest.mark.slow
def test_hub_dataset_id_trained_on_with_split_and_config(qmodel, hub, tmp_path):
    env = hub_env(hub, tmp_path)
    common = ["--max-steps", 2, "--batch-size", 2, "--grad-accum", 1, "--lora-r", 2, "--save-steps", 0]
    r = train(qmodel, "acme/tiny-alpaca", tmp_path / "train", *common, env=env)
    assert "data: 8 records from acme/tiny-alpaca (alpaca 8); 0 dropped" in r.stderr, r.stderr + (hub.dir / "olah.log").read_text()[-2000:]
    assert len(metrics(tmp_path / "train")) == 2
    r = train(qmodel, "acme/tiny-alpaca", tmp_path / "test", *common, "--data-split", "test", env=env)
    assert "data: 2 records from acme/tiny-alpaca (alpaca 2)" in r.stderr, r.stderr
    r = train(qmodel, "acme/tiny-alpaca", tmp_path / "plain", *common, "--data-config", "plain", env=env)
    assert "data: 5 records from acme/tiny-alpaca (text 5)" in r.stderr, r.stderr
    # offline, from the cache the first run filled; an unknown split and an unknown repo are one line each
    r = train(qmodel, "acme/tiny-alpaca", tmp_path / "offline", *common, env=hub_env(hub, tmp_path, offline=True))
    assert "data: 8 records from acme/tiny-alpaca" in r.stderr, r.stderr
    r = train(qmodel, "acme/tiny-alpaca", tmp_path / "nosplit", *common, "--data-split", "validation", env=env, ok=False)
    assert r.returncode == 1 and r.stderr.startswith("qconvert: error: acme/tiny-alpaca: cannot read the data (split 'validation'"), r.stderr
    r = train(qmodel, "acme/missing", tmp_path / "missing", *common, env=env, ok=False)
    assert r.returncode == 1 and r.stderr.startswith("qconvert: error: acme/missing") and "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_eval_data_from_the_hub_reads_its_evaluation_split_never_the_train_split(qmodel, hub, tmp_path):
    env = hub_env(hub, tmp_path)
    common = ["--max-steps", 1, "--batch-size", 2, "--grad-accum", 1, "--lora-r", 2, "--save-steps", 0, "--seed", 1]

    def eval_loss(out: Path) -> float:
        [e] = [m["eval_loss"] for m in metrics(out) if "eval_loss" in m]
        return e

    # the same Hub dataset as --eval-data: its test split (no validation split), as the start summary says
    r = train(qmodel, "acme/tiny-alpaca", tmp_path / "hub", *common, "--eval-data", "acme/tiny-alpaca", env=env)
    assert "eval data: 2 records from acme/tiny-alpaca split test (alpaca 2); 0 dropped" in r.stderr, r.stderr
    assert "examples: 8 for training, 2 for evaluation" in r.stderr, r.stderr
    # --eval-data-split alone names a split of --data; a local copy of the test rows scores the very same loss
    train(qmodel, "acme/tiny-alpaca", tmp_path / "split", *common, "--eval-data-split", "test", env=env)
    local = tmp_path / "test.jsonl"
    local.write_text("".join(json.dumps(row) + "\n" for row in ALPACA[8:]))
    train(qmodel, "acme/tiny-alpaca", tmp_path / "local", *common, "--eval-data", local, env=env)
    assert eval_loss(tmp_path / "hub") == eval_loss(tmp_path / "split") == eval_loss(tmp_path / "local")
    # a config with a train split only is refused, and so is naming the split trained on; nothing is written
    r = train(qmodel, "acme/tiny-alpaca", tmp_path / "plain", *common, "--data-config", "plain", "--eval-data", "acme/tiny-alpaca",
              env=env, ok=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-2:] == [
        "qconvert: error: acme/tiny-alpaca: no 'validation' or 'test' split to evaluate on (its splits: train)",
        "hint: name one with --eval-data-split, or hold out a fraction of --data with --eval-split (e.g. 0.1)"], r.stderr
    r = train(qmodel, "acme/tiny-alpaca", tmp_path / "same", *common, "--eval-data-split", "train", env=env, ok=False)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-2:] == [
        "qconvert: error: acme/tiny-alpaca: the evaluation split 'train' is the split trained on",
        "hint: name another split with --eval-data-split, or hold out a fraction of --data with --eval-split"], r.stderr
    assert not (tmp_path / "plain" / "adapter_config.json").exists() and not (tmp_path / "same" / "adapter_config.json").exists()


@pytest.mark.slow
def test_eval_split_of_a_folder_is_validation_else_test_and_never_train(tmp_path):
    from qconvert.errors import DataError
    from qconvert.training.data import DataReport, load_records

    def folder(name: str, *splits: str) -> Path:
        for s in splits:
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f"{s}.jsonl").write_text(json.dumps({"text": f"{WORDS[0]} {s}"}) + "\n")
        return tmp_path / name

    for name, splits, want in [("a", ("train", "valid", "test"), "validation"), ("b", ("train", "test"), "test")]:
        rep = DataReport()
        recs = load_records(folder(name, *splits), evaluation=True, report=rep)
        assert rep.split == want and [r["text"] for _, r in recs] == [f"{WORDS[0]} {'valid' if want == 'validation' else want}"]
    rep = DataReport()
    assert [r["text"] for _, r in load_records(tmp_path / "a", split="train", evaluation=True, report=rep)] == [f"{WORDS[0]} train"]
    with pytest.raises(DataError) as e:
        load_records(folder("c", "train"), evaluation=True)
    assert str(e.value) == f"{tmp_path / 'c'}: no 'validation' or 'test' split to evaluate on (its splits: train)"
    with pytest.raises(DataError) as e:
        load_records(folder("a", "train"), evaluation=True, split="validation") and load_records(tmp_path / "a" / "train.jsonl", split="test",
                                                                                                 evaluation=True)
    assert str(e.value) == f"{tmp_path / 'a' / 'train.jsonl'}: --eval-data-split 'test' applies to Hub datasets and folders, not to one file"
