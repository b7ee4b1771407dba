"""Data, prompt and config files that are not what their name says: JSON nested past Python's
recursion limit (the old code ended in an unexpected RecursionError, reported as a bug), a record
that names a key twice (json kept the last value in silence), and a FIFO or device where a file was
expected (the old code blocked forever opening it)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from qconvert.errors import DataError, OptionError


def records(path, **kw):
    from qconvert.training.data import DataReport, load_records

    report = DataReport()
    return load_records(str(path), report=report, **kw), report


DEEP = "[" * 100_000


@pytest.mark.parametrize("name, text", [
    ("deep.json", DEEP + "\n"),
    ("deep.jsonl", '{"text": "w1"}\n' + DEEP + "\n"),
    ("deep-value.jsonl", '{"text": "w1"}\n{"text": ' + DEEP + "}\n"),
])
def test_nesting_past_the_recursion_limit_is_one_error(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DataError, match="nested too deep"):
        records(p)


def test_a_deep_line_is_dropped_and_counted_when_not_strict(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "w1"}\n' + DEEP + '\n{"text": "w2"}\n')
    got, report = records(p, strict=False)
    assert [r["text"] for _, r in got] == ["w1", "w2"] and report.n_dropped == 1


@pytest.mark.parametrize("name, text", [
    ("twice.jsonl", '{"text": "w1", "text": "w2"}\n'),
    ("twice.json", '[{"prompt": "a", "completion": "b", "completion": "c"}]'),
])
def test_a_record_naming_a_key_twice_is_refused_not_cut_to_one_value(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    with pytest.raises(DataError, match="twice"):
        records(p)


def test_valid_files_read_as_before(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "w1"}, {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    p.write_text("\n".join(map(json.dumps, rows)) + "\n")
    assert [r for _, r in records(p)[0]] == rows
    q = tmp_path / "d.json"
    q.write_text(json.dumps(rows))
    assert [r for _, r in records(q)[0]] == rows


def unblock(fifo):
    """Open the FIFO for writing after a while, so a reader that blocked on it returns (the test
    then fails instead of hanging)."""
    def later():
        fd = os.open(fifo, os.O_WRONLY)
        os.close(fd)

    t = threading.Timer(5.0, later)
    t.daemon = True
    t.start()
    return t


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_given_as_data_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    t, t0 = unblock(fifo), time.monotonic()
    try:
        with pytest.raises(DataError, match="not a regular file"):
            records(fifo)
    finally:
        t.cancel()
    assert time.monotonic() - t0 < 4  # refused at once, not released by the timer opening the other end


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_given_as_a_prompts_or_config_file_is_refused_without_opening_it(tmp_path):
    from qconvert.export.compare import read_prompts
    from qconvert.io.readers import read_yaml

    fifo = tmp_path / "p.txt"
    os.mkfifo(fifo)
    t = unblock(fifo)
    try:
        with pytest.raises(OptionError, match="not a regular file"):
            read_prompts(str(fifo))
        with pytest.raises(OptionError, match="not a regular file"):
            read_yaml(fifo, "a run config", OptionError, limit=1000)
    finally:
        t.cancel()


@pytest.mark.parametrize("text, match", [
    ("[" * 60_000, "nested too deep"),
    ('{"format": "text", "formats": {"text": 1}, "format": "chat"}', "twice"),
])
def test_an_adapters_prompt_format_record_is_read_within_bounds(tmp_path, text, match):
    """qconvert_prompt_format.json (generate and eval --adapter read it; export-adapter copies it)."""
    from qconvert.training.data import PROMPT_FORMAT_FILE, read_prompt_format

    (tmp_path / PROMPT_FORMAT_FILE).write_text(text)
    with pytest.raises(DataError, match=match):
        read_prompt_format(tmp_path)


def test_an_adapters_prompt_format_record_that_links_out_is_refused(tmp_path):
    from qconvert.errors import SourceError
    from qconvert.training.data import PROMPT_FORMAT_FILE, read_prompt_format

    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"format": "text", "formats": {"text": 3}}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / PROMPT_FORMAT_FILE).symlink_to(outside)
    with pytest.raises(SourceError, match="outside the adapter folder"):
        read_prompt_format(adapter)
    (adapter / PROMPT_FORMAT_FILE).unlink()
    (adapter / PROMPT_FORMAT_FILE).write_text(outside.read_text())
    assert read_prompt_format(adapter)["format"] == "text"
