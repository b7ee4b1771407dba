"""Issue 24 item 4: `train` takes a 16-bit base and quantizes it on the way in (convert/on_load.py);
item 10's API part: `train(data=...)` takes a datasets.Dataset or a list of records."""

from __future__ import annotations

import json
import tempfile

import pytest
import torch
from helpers import make_tiny_llama
from safetensors.torch import load_file
from test_train import WORDS, make_tokenizer

OPTS = dict(max_steps=2, batch_size=2, lr=1e-2, backend="reference", lora_r=4, lora_alpha=8, lora_dropout=0.0)


def records(n: int = 6) -> list[dict]:
    return [{"prompt": " ".join(WORDS[i:i + 3]), "completion": " ".join(WORDS[i + 3:i + 7])} for i in range(0, 7 * n, 7)]


@pytest.fixture(scope="module")
def base16(tmp_path_factory):
    d = tmp_path_factory.mktemp("base16")
    src = make_tiny_llama(d / "src16", hidden=64, intermediate=128, layers=1, dtype=torch.bfloat16)
    make_tokenizer(src)
    data = d / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    return src, data


def adapter(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


@pytest.mark.slow
def test_16bit_base_trains_as_quantize_then_train(base16, tmp_path, monkeypatch):
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.training.loop import train

    src, data = base16
    q = tmp_path / "q"
    quantize_checkpoint(str(src), q)
    train(str(q), str(data), tmp_path / "two-steps", **OPTS)
    said: list[str] = []
    train(str(src), str(data), tmp_path / "on-load", log=said.append, keep_quantized=tmp_path / "kept", **OPTS)
    assert [m for m in said if m.startswith("base: ")] == [
        f"base: {src} is 16-bit; quantizing it to 4-bit NF4 on the way in, as `qconvert quantize` does (kept in {tmp_path / 'kept'})"]
    a, b = adapter(tmp_path / "two-steps"), adapter(tmp_path / "on-load")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical adapters
    assert (tmp_path / "kept" / "model.safetensors").read_bytes() == (q / "model.safetensors").read_bytes()
    cfg = json.loads((tmp_path / "on-load" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(src)  # the adapter names the base as given, not a 4-bit copy
    said.clear()  # a later run reuses the kept copy
    train(str(src), str(data), tmp_path / "again", log=said.append, keep_quantized=tmp_path / "kept", **OPTS)
    assert [m for m in said if m.startswith("base: ")] == [f"base: {src} is 16-bit; using its 4-bit copy in {tmp_path / 'kept'} (--keep-quantized)"]
    c = adapter(tmp_path / "again")
    assert all(torch.equal(a[k], c[k]) for k in a)
    said.clear()  # without --keep-quantized: a temporary copy, removed when the run ends
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    train(str(src), str(data), tmp_path / "temp", log=said.append, **OPTS)
    assert any(m.endswith("(a temporary copy, removed at the end; --keep-quantized DIR keeps it)") for m in said)
    assert list((tmp_path / "tmp").iterdir()) == []
    t = adapter(tmp_path / "temp")
    assert all(torch.equal(a[k], t[k]) for k in a)


@pytest.mark.slow
def test_keep_quantized_with_a_4bit_base_is_refused(base16, tmp_path):
    from qconvert.convert.on_load import four_bit_base, is_16bit
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.errors import OptionError

    src, _ = base16
    q = tmp_path / "q"
    quantize_checkpoint(str(src), q)
    assert is_16bit(src, None) and not is_16bit(q, None)
    with pytest.raises(OptionError, match="is a 4-bit checkpoint already"):
        four_bit_base(q, None, tmp_path / "k", None, print)
    with pytest.raises(OptionError, match="2 processes would each quantize it"):
        four_bit_base(src, None, None, None, print, processes=2)


@pytest.fixture(scope="module")
def q4(base16, tmp_path_factory):
    from qconvert.convert.quantize import quantize_checkpoint

    q = tmp_path_factory.mktemp("q4") / "q"
    quantize_checkpoint(str(base16[0]), q)
    return q


@pytest.mark.slow
def test_train_takes_a_dataset_or_a_list_of_records_as_a_file(base16, q4, tmp_path):
    """SFTTrainer users pass the records: the same adapter as from the file, bit for bit."""
    import datasets

    from qconvert.errors import DataError
    from qconvert.training.loop import train

    _, data = base16
    train(str(q4), str(data), tmp_path / "file", **OPTS)
    train(str(q4), records(), tmp_path / "list", **OPTS)
    train(str(q4), datasets.Dataset.from_list(records()), tmp_path / "dataset", **OPTS)
    a = adapter(tmp_path / "file")
    for run in ("list", "dataset"):
        b = adapter(tmp_path / run)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), run
    import yaml

    assert yaml.safe_load((tmp_path / "list" / "config.yaml").read_text())["dataset_name"] is None  # no path to repeat it from
    said: list[str] = []  # not strict: the non-record is left out and counted, as a JSON file's non-object
    train(str(q4), [*records(), "not a record"], tmp_path / "lenient", log=said.append, **OPTS)
    assert all(torch.equal(a[k], adapter(tmp_path / "lenient")[k]) for k in a)
    assert "data: 7 records from data (list of 7 records) (prompt 6); 1 dropped, 0 truncated at --max-length 512" in said
    with pytest.raises(DataError, match=r"data \(list of 7 records\): record 7: expected a dict, got str"):
        train(str(q4), [*records(), "not a record"], tmp_path / "bad", strict_data=True, **OPTS)
    with pytest.raises(DataError, match="is not one split of records"):
        train(str(q4), datasets.DatasetDict(train=datasets.Dataset.from_list(records())), tmp_path / "dict", **OPTS)
