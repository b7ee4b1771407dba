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

    from qconvert.train.data import DataReport, build_examples

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
