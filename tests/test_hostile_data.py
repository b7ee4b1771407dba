"""Training data as careless users and hostile files bring it: not UTF-8, empty, broken rows among
good ones, records longer than --max-length. One clear line when nothing can be used; otherwise the
bad rows are left out and counted (never a whole run lost to one row) unless --strict-data."""

from __future__ import annotations

import json

import pytest

from test_hostile_train import one_line_error
from test_train import WORDS, qmodel, train  # noqa: F401  (qmodel is a fixture)


def good_rows(n: int = 8) -> list[str]:
    return [json.dumps({"text": " ".join(WORDS[(i * 7 + j) % 120] for j in range(6))}) for i in range(n)]


@pytest.mark.parametrize(
    "name, content, needle",
    [
        ("d.jsonl", b"", "the file is empty"),
        ("d.jsonl", b"  \n\n ", "the file is empty"),
        ("d.json", b"[]", "holds no records"),
        ("d.jsonl", "{\"text\": \"caf\xe9\"}\n".encode("latin-1"), "not UTF-8"),
        ("d.jsonl", '{"text": "w1"}\n'.encode("utf-16"), "not UTF-8"),
        ("d.csv", "text\ncaf\xe9\n".encode("latin-1"), "d.csv: not UTF-8 text"),
        ("d.jsonl", b'{"question": "w1"}\n', "no usable example"),
        ("d.exe", b"MZ", "unknown data file type '.exe'"),
    ],
)
@pytest.mark.slow
def test_unusable_data_is_one_line(qmodel, tmp_path, name, content, needle):
    data = tmp_path / name
    data.write_bytes(content)
    r = train(qmodel, data, tmp_path / "out", ok=False)
    one_line_error(r, needle)
    assert not (tmp_path / "out" / "adapter_config.json").exists()


@pytest.mark.slow
def test_bad_rows_are_left_out_and_counted_unless_strict(qmodel, tmp_path):
    rows = good_rows(8)
    bad = [
        '{"text": oops}',  # not JSON
        "[1, 2]",  # not an object
        '{"question": "w1"}',  # no known shape
        '{"prompt": "' + " ".join(WORDS[:40]) + '", "completion": "w1"}',  # prompt fills --max-length
    ]
    data = tmp_path / "d.jsonl"
    data.write_bytes(("\n".join(rows[:4] + bad[:2] + rows[4:] + bad[2:]) + "\n").encode() + "{\"text\": \"\xe9\"}\n".encode("latin-1"))
    out = tmp_path / "out"
    r = train(qmodel, data, out, "--max-length", 16, "--max-steps", 1, "--grad-accum", 1)
    assert "data: 13 records" in r.stderr and "5 dropped, 0 truncated at --max-length 16" in r.stderr, r.stderr
    for reason in ("1 not valid JSON", "1 not an object", "1 unknown shape", "1 prompt fills --max-length", "1 not UTF-8"):
        assert reason in r.stderr, r.stderr
    assert "examples: 8 for training" in r.stderr and (out / "adapter_config.json").exists()
    r = train(qmodel, data, tmp_path / "strict", "--max-length", 16, "--strict-data", ok=False)
    one_line_error(r, "d.jsonl:5: not valid JSON")


@pytest.mark.slow
def test_truncation_is_counted_and_drop_leaves_records_out(qmodel, tmp_path):
    from transformers import AutoTokenizer

    from qconvert.training.data import DataReport, build_examples

    tok = AutoTokenizer.from_pretrained(qmodel)
    long = {"prompt": " ".join(WORDS[:4]), "completion": " ".join(WORDS[10:30])}  # 4 + 20 + EOS = 25 tokens
    short = {"prompt": WORDS[1], "completion": WORDS[2]}
    recs = [(1, long), (2, short), (3, long)]
    rep = DataReport()
    ex = build_examples(recs, tok, max_length=12, report=rep, strict=False)
    assert rep.truncated == 2 and rep.n_dropped == 0 and [len(e.input_ids) for e in ex] == [12, 3, 12]
    assert ex[0].input_ids[-1] != tok.eos_token_id and ex[1].input_ids[-1] == tok.eos_token_id  # the cut takes the EOS with it
    rep = DataReport()
    ex = build_examples(recs, tok, max_length=12, truncation="drop", report=rep, strict=False)
    assert rep.truncated == 0 and rep.dropped == {"longer than --max-length": 2} and len(ex) == 1
    data = tmp_path / "long.jsonl"
    data.write_text("\n".join(json.dumps(r) for _, r in recs) + "\n")
    r = train(qmodel, data, tmp_path / "out", "--max-length", 12, "--max-steps", 1, "--grad-accum", 1)
    assert "0 dropped, 2 truncated at --max-length 12" in r.stderr and "lose their tail and EOS" in r.stderr, r.stderr


# ---------------------------------------------------------------- bounded reading (issue 21)


def _card(folder, path: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "README.md").write_text(f"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: {path}\n---\n")
    (folder / "inside.jsonl").write_text('{"text": "w1 w2"}\n')


@pytest.mark.parametrize("how", ["dotdot", "absolute", "link-out"])
def test_dataset_files_stay_inside_the_dataset_folder(tmp_path, how):
    """A card's data_files with ../ or an absolute path, or a data file that links out, is refused
    and the outside file is not read (the old reader trained on it, and echoed its keys)."""
    from qconvert.errors import DataError
    from qconvert.training.data import load_records

    secret = tmp_path / "outside" / "secret.jsonl"
    secret.parent.mkdir()
    secret.write_text('{"text": "w9 w9", "api_key": "SECRET-VALUE"}\n')
    ds = tmp_path / "ds"
    if how == "link-out":
        ds.mkdir()
        (ds / "train.jsonl").symlink_to(secret)
    else:
        _card(ds, "../outside/secret.jsonl" if how == "dotdot" else str(secret))
    with pytest.raises(DataError, match="outside the dataset") as e:
        load_records(ds)
    assert "SECRET-VALUE" not in str(e.value) and "api_key" not in str(e.value)
    _card(tmp_path / "good", "inside.jsonl")
    assert load_records(tmp_path / "good") == [(1, {"text": "w1 w2"})]


def test_csv_with_200000_columns_is_refused_within_bounds(tmp_path):
    """The old reader handed it to ``datasets`` (over 60 s and growing); now refused from its header."""
    from hostile_util import run_limited

    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(f"c{i}" for i in range(200_000)) + "\n" + ",".join("x" * 200_000) + "\n")
    narrow = tmp_path / "many.csv"
    narrow.write_text(",".join(f"c{i}" for i in range(20_000)) + "\n" + ",".join("x" * 20_000) + "\n")
    code = ("import sys; from qconvert.training.data import load_records\n"
            "for p in sys.argv[1:]:\n    try:\n        load_records(p)\n    except Exception as e:\n        print(type(e).__name__, e)")
    r, seconds = run_limited(code, wide, narrow, mem_mb=1024, timeout_s=30)
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and "the header line is over 1048576 bytes" in lines[0], (r.stdout, r.stderr[-2000:])
    assert lines[1].startswith("DataError") and "many.csv has 20000 columns, over the 10000 qconvert reads" in lines[1], lines


@pytest.mark.slow
def test_records_over_the_size_bound_are_cut_or_left_out_and_counted(tmp_path):
    """A text record over record_bound(max_length) characters is cut before tokenizing when it would
    be truncated anyway (same first tokens), any other is left out and counted."""
    from transformers import AutoTokenizer

    from qconvert.training.data import DataReport, build_examples, record_bound
    from test_train import make_tokenizer

    make_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    n = record_bound(16) // 3 + 10  # words of 3 characters: just over the bound
    long_text = {"text": "w1 w2 w3 " * (n // 3)}
    recs = [(1, long_text), (2, {"prompt": "w1 " * n, "completion": "w2"}), (3, {"text": "w4 w5", "raw": "x" * 3 * n}),
            (4, {"messages": [{"role": "user", "content": "w1 " * n}, {"role": "assistant", "content": "w2"}]})]
    rep = DataReport()
    ex = build_examples(recs, tok, max_length=16, report=rep, strict=True)
    want = tok("w1 w2 w3 " * 6)["input_ids"][:16]
    assert [e.input_ids for e in ex] == [want, tok("w4 w5")["input_ids"] + [tok.eos_token_id]]
    assert rep.truncated == 1 and rep.dropped == {"over the size bound": 2}, rep
    rep = DataReport()
    assert len(build_examples(recs, tok, max_length=16, truncation="drop", report=rep)) == 1 and rep.dropped == {"over the size bound": 3}


@pytest.mark.slow
def test_one_120_mb_record_in_a_12_kb_parquet_file_stays_bounded(tmp_path):
    """The old reader tokenized the record whole (5.6 GB reported; over the 2.8 GiB cap here). Reading it still takes about 0.9 GB.."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hostile_util import run_limited
    from test_train import make_tokenizer

    make_tokenizer(tmp_path / "tok")
    data = tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": ["w1 w2 w3 " * (120 * 2**20 // 9), "w4 w5"]}), data, compression="zstd", compression_level=19)
    assert data.stat().st_size < 16_000
    code = ("import sys; from transformers import AutoTokenizer; from qconvert.training.data import DataReport, build_examples, load_records\n"
            "tok = AutoTokenizer.from_pretrained(sys.argv[1]); rep = DataReport()\n"
            "ex = build_examples(load_records(sys.argv[2], report=rep), tok, max_length=64, report=rep)\n"
            "print([len(e.input_ids) for e in ex], rep.truncated, rep.n_dropped)")
    r, seconds = run_limited(code, tmp_path / "tok", data, mem_mb=2900, timeout_s=90)
    assert r.stdout.strip() == "[64, 3] 1 0", (r.stdout, r.stderr[-2000:])


@pytest.mark.slow
def test_token_ids_past_the_model_embeddings_are_one_line(qmodel, tmp_path):
    """A tokenizer with a token added after the model was saved: the old run ended in an IndexError."""
    import shutil

    from transformers import AutoTokenizer

    model = tmp_path / "m"
    shutil.copytree(qmodel, model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.add_tokens(["zzqq"])
    tok.save_pretrained(model)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(good_rows(4) + [json.dumps({"text": "w1 zzqq w2"})]) + "\n")
    r = train(model, data, tmp_path / "out", "--max-steps", 1, ok=False)
    one_line_error(r, "the tokenizer gives token id 128 ('zzqq'), past the model's 128 input embeddings")


CHAT = [(1, {"messages": [{"role": "system", "content": "w1"}, {"role": "user", "content": "w2"}, {"role": "assistant", "content": "w3"}]}),
        (2, {"messages": [{"role": "user", "content": "w2"}, {"role": "assistant", "content": "w3 w4"}]})]
REFUSES_SYSTEM = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"


@pytest.mark.slow
def test_chat_template_that_refuses_a_record_drops_that_record_only(tmp_path):
    """Gemma's and Mistral's templates raise for a system turn: the old run ended on that record."""
    from transformers import AutoTokenizer

    from qconvert.errors import DataError
    from qconvert.training.data import DataReport, build_examples
    from test_train import make_tokenizer

    make_tokenizer(tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    want = build_examples(CHAT[1:], tok, max_length=64)[0]
    tok.chat_template = REFUSES_SYSTEM + tok.chat_template
    rep = DataReport()
    ex = build_examples(CHAT, tok, max_length=64, strict=False, report=rep)
    assert [(e.input_ids, e.labels) for e in ex] == [(want.input_ids, want.labels)]
    assert rep.dropped == {"chat template refused": 1} and "refuses this record (System role not supported)" in rep.problems[0]
    with pytest.raises(DataError, match="data:1: the chat template refuses this record"):
        build_examples(CHAT, tok, max_length=64, strict=True)


@pytest.mark.parametrize("body, needle", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "the chat template ran past 2 s rendering one record"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}" + "x" * 60 + "{% endfor %}{% endfor %}",
     "the chat template produced over 4194304 characters rendering one record"),
], ids=["loops", "floods"])
@pytest.mark.slow
def test_chat_template_that_loops_or_floods_is_stopped(tmp_path, body, needle):
    """The old render ran for hours (loops) or grew to gigabytes (floods); now a DataError within the
    bounds (QCONVERT_TEMPLATE_SECONDS=2 here), in a child capped at 1.5 GiB."""
    from hostile_util import run_limited
    from test_train import make_tokenizer

    make_tokenizer(tmp_path / "tok")
    code = ("import os, sys; os.environ['QCONVERT_TEMPLATE_SECONDS'] = '2'\n"
            "from transformers import AutoTokenizer; from qconvert.training.data import build_examples\n"
            "tok = AutoTokenizer.from_pretrained(sys.argv[1]); tok.chat_template = sys.argv[2] + tok.chat_template\n"
            f"try:\n    build_examples({CHAT!r}, tok, max_length=64, strict=False)\n"
            "except Exception as e:\n    print(type(e).__name__, e)")
    r, seconds = run_limited(code, tmp_path / "tok", body, mem_mb=1536, timeout_s=40)
    assert r.stdout.startswith("TemplateOverrun") and needle in r.stdout, (r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("raw", ["abc", "nan", "inf", "0", "-5"])
def test_deadline_settings_refuse_values_that_are_no_deadline(monkeypatch, raw):
    """QCONVERT_TEMPLATE_SECONDS and QCONVERT_DOWNLOAD_SECONDS: a positive number of seconds, else one
    error naming the variable (nan and inf were taken as no deadline at all, 0 or less as one already past)."""
    from qconvert.errors import DataError, SourceError
    from qconvert.io.hub import download_seconds
    from qconvert.training.templates import template_seconds

    monkeypatch.setenv("QCONVERT_TEMPLATE_SECONDS", raw)
    monkeypatch.setenv("QCONVERT_DOWNLOAD_SECONDS", raw)
    with pytest.raises(DataError, match="QCONVERT_TEMPLATE_SECONDS"):
        template_seconds()
    with pytest.raises(SourceError, match="QCONVERT_DOWNLOAD_SECONDS"):
        download_seconds()
    monkeypatch.setenv("QCONVERT_TEMPLATE_SECONDS", "2.5")
    monkeypatch.setenv("QCONVERT_DOWNLOAD_SECONDS", "")
    assert template_seconds() == 2.5 and download_seconds() > 0
