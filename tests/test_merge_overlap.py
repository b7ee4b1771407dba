"""`qconvert merge` overlaps reading, merging and writing (export/overlap.py): the output files are
byte for byte the one-step-after-another path's, the next tensor is read while one is merged, at
most two items are in flight beside the one being merged, and errors keep their sequential order."""

from __future__ import annotations

import threading
import time
import warnings

import pytest
import torch
from helpers import make_tiny_llama, write_lora_adapter

from qconvert.export import merge as merge_mod
from qconvert.export.overlap import run_overlapped, run_sequential

@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A 4-bit tiny Llama in several shards, its 16-bit original, and an adapter."""
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("overlap")
    src = make_tiny_llama(d / "src", hidden=64, intermediate=100, layers=3, dtype=torch.bfloat16, max_shard_size="40KB")
    quantize_checkpoint(str(src), d / "q", max_shard_size="30KB")
    assert len(list((d / "q").glob("model-*.safetensors"))) >= 3
    return d, write_lora_adapter(d / "q", d / "adapter")


def merged_files(d, name, overlap, monkeypatch, planned=True, **kw):
    monkeypatch.setattr(merge_mod, "OVERLAP", overlap)
    if not planned:  # the writer as it was: every shard's data spilled and copied behind its header
        monkeypatch.setattr(merge_mod, "_plan", lambda job, keys: None)
    out = d / name
    merge_mod.merge_adapter(str(d / "q"), str(d / "adapter"), out, max_shard_size="40KB", **kw)
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("kw", [{"dtype": "bfloat16"}, {"dtype": "float32"}, {"quantize": True}, {"base_original": "src"}],
                         ids=["bf16", "f32", "requantized", "base-original"])
def test_overlapped_merge_writes_the_sequential_bytes(sharded, kw, monkeypatch):
    """Overlapped, with headers planned at their exact size: the bytes of one step after another with
    every shard's data spilled and copied behind its header (the writer before either change)."""
    d, _ = sharded
    tag = "-".join(map(str, kw.values()))
    if "base_original" in kw:
        kw = {"base_original": str(d / "src")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "--base-original")  # its warning is test_merge's claim
        seq = merged_files(d, f"seq-{tag}", False, monkeypatch, planned=False, **kw)
        ovl = merged_files(d, f"ovl-{tag}", True, monkeypatch, **kw)
    assert len([n for n in seq if n.startswith("model-")]) >= 2  # several output shards
    assert list(ovl) == list(seq)
    for name in seq:  # README.md names the output folder, which differs; every other file is equal byte for byte
        if name == "README.md":
            assert ovl[name].replace(f"ovl-{tag}".encode(), b"") == seq[name].replace(f"seq-{tag}".encode(), b"")
        else:
            assert ovl[name] == seq[name], name


def test_overlapped_merge_merges_by_value(sharded, monkeypatch):
    """The overlapped output is the merge itself: a merged weight equals dequant(W4) + scaling * B @ A."""
    from qconvert.export.lora_merge import LoraAdapter
    from qconvert.io.checkpoint import Checkpoint
    from qconvert.quant.reference import dequantize_4bit_ref

    d, adapter = sharded
    merged_files(d, "ovl-value", True, monkeypatch, dtype="float32")
    k = "model.layers.2.mlp.down_proj.weight"
    want = dequantize_4bit_ref(Checkpoint(d / "q").quantized(k), torch.float32) + LoraAdapter(adapter).delta(k.removesuffix(".weight"))
    assert torch.equal(Checkpoint(d / "ovl-value").get(k), want)


def test_merge_reads_the_next_tensor_while_merging_one(sharded, monkeypatch):
    """While the first tensor is being merged, the second is already being read (in another thread):
    the merge of the first waits for that read, so one step after another would wait in vain."""
    d, _ = sharded
    read, output = merge_mod.read_inputs, merge_mod.output_tensors
    keys, second_read, readers = [], threading.Event(), set()

    def reading(job, k):
        keys.append(k)
        readers.add(threading.current_thread().name)
        if len(keys) == 2:
            second_read.set()
        return read(job, k)

    def merging(job, k, inputs=None):
        if k == keys[0]:
            assert second_read.wait(20), "the next tensor was not read while this one was merged"
        yield from output(job, k, inputs)

    monkeypatch.setattr(merge_mod, "read_inputs", reading)
    monkeypatch.setattr(merge_mod, "output_tensors", merging)
    merged_files(d, "ovl-events", True, monkeypatch)
    assert threading.current_thread().name not in readers


def _instrumented(n: int, fail_write: int | None = None, fail_compute: int | None = None):
    """read/compute/write over ``n`` items that count the items alive (read, not yet written) and log
    the writes; reads and writes take turns being slow so both queues fill up."""
    state = {"alive": 0, "peak": 0, "written": []}
    lock = threading.Lock()

    def read(i):
        with lock:
            state["alive"] += 1
            state["peak"] = max(state["peak"], state["alive"])
        time.sleep(0.004 if i % 3 == 0 else 0)
        return i * 10

    def compute(i, data):
        if i == fail_compute:
            raise RuntimeError(f"compute {i}")
        return [(i, data), (i, data + 1)]

    def write(out):
        time.sleep(0.004 if out[0] % 2 else 0)
        if out[0] == fail_write:
            raise OSError(f"write {out[0]}")
        state["written"].append(out)
        if out[1] % 10 == 1:  # the item's last output
            with lock:
                state["alive"] -= 1

    return state, read, compute, write


def test_overlap_keeps_order_and_at_most_two_items_beside_the_current():
    seq, *fns = _instrumented(30)
    run_sequential(range(30), *fns)
    ovl, *fns = _instrumented(30)
    run_overlapped(range(30), *fns)
    assert ovl["written"] == seq["written"] == [(i, i * 10 + j) for i in range(30) for j in (0, 1)]
    assert seq["peak"] == 1 and ovl["peak"] <= 3


def test_overlap_reports_an_earlier_write_error_first_and_leaves_no_thread():
    before = threading.active_count()
    state, *fns = _instrumented(10, fail_write=3, fail_compute=4)
    with pytest.raises(OSError, match="write 3"):  # the sequential path fails there too, before computing item 4
        run_overlapped(range(10), *fns)
    assert threading.active_count() == before
    assert state["written"][-1][0] == 2 and not any(i > 3 for i, _ in state["written"])
    with pytest.raises(RuntimeError, match="compute 4"):
        run_overlapped(range(10), *_instrumented(10, fail_compute=4)[1:])
    assert threading.active_count() == before


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_merge_finite_check_is_isfinite_all(dtype):
    """merge's fast finite check (min and max) says what ``torch.isfinite(t).all()`` says, for NaN and
    +-Inf at every position of a vector's body and tail, and for an empty tensor."""
    from qconvert.export.lora_merge import all_finite

    assert all_finite(torch.empty(0, 3, dtype=dtype))
    assert all_finite(torch.randn(67, 5).to(dtype))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for pos in range(67):
            t = torch.randn(67).to(dtype)
            t[pos] = bad
            assert not all_finite(t) and not torch.isfinite(t).all()
    assert not all_finite(torch.tensor([float("inf"), float("-inf")], dtype=dtype))


@pytest.mark.parametrize("plan", ["exact", "one-dtype-off", "one-name-off"])
def test_planned_shards_write_the_data_once_and_the_same_bytes(tmp_path, plan):
    """SizeShards given the tensors to come reserves each header at its exact size and writes the data
    once (no spill file); a plan that turns out wrong costs the copy, never a different byte."""
    from qconvert.io.shards import ShardWriter, SizeShards

    g = torch.Generator().manual_seed(0)
    tensors = [(f"t.{i}", torch.randn(7 + i, 5, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)) for i in range(9)]
    tensors.append(("ids", torch.arange(6)))
    want = [(n, t.dtype, tuple(t.shape)) for n, t in tensors]
    if plan == "one-dtype-off":
        want[4] = (want[4][0], torch.float16, want[4][2])
    if plan == "one-name-off":
        want[2] = ("t.2-renamed", want[2][1], want[2][2])
    spills = []
    original_add = ShardWriter.add

    def add(self, name, t):  # ShardWriter.add: note whether the data goes to a spill file
        spills.append(self.out_path == self.spill_path)
        return original_add(self, name, t)

    files = {}
    for mode in ("plain", "planned"):
        folder = tmp_path / mode
        folder.mkdir()
        shards = SizeShards(folder, 400, plan=want if mode == "planned" else None)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ShardWriter, "add", add)
            spills.clear()
            for n, t in tensors:
                shards.add(n, t)
            shards.finish()
        files[mode] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
        if mode == "plain":
            assert all(spills)
        elif plan == "exact":
            assert not any(spills)
    assert len(files["plain"]) >= 3 and files["planned"] == files["plain"]
