"""FSDP checkpoints without pickle (qconvert.training.fsdp_checkpoint): read back bit for bit by any
number of processes, a damaged manifest or shard refused by name before anything is loaded, and a
checkpoint crafted in torch.distributed.checkpoint's format (a pickled ``.metadata``, a pickled byte
record in a ``.distcp`` file) runs nothing on ``train --fsdp --resume``."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import QCONVERT
from qconvert.errors import DataError
from qconvert.training import fsdp_checkpoint as fc
from test_fsdp import torchrun
from test_hostile_train import one_line_error
from test_train import memorize_set, metrics, qmodel, train  # noqa: F401  (qmodel: the fixture)

HERE = Path(__file__).parent


# ---------------------------------------------------------------- resharding, bit for bit, with nothing unpickled


@pytest.mark.slow
def test_two_process_checkpoint_reads_bit_for_bit_on_one_and_four_with_nothing_unpickled(tmp_path):
    """Written by two processes (33 rows split 17/16), read by one and by four (9/9/9/6: rows that
    span both files): every parameter and moment equal to the whole tensors at the save, the
    optimizer's settings the checkpoint's (not the new optimizer's), the same parameters two steps
    later; pickle's and torch's loaders never called, torch.distributed.checkpoint never imported."""
    torchrun(2, HERE / "fsdp_ckpt_worker.py", "save", tmp_path)
    for n in (1, 4):
        torchrun(n, HERE / "fsdp_ckpt_worker.py", "load", tmp_path)
        for rank in range(n):
            row = json.loads((tmp_path / f"load{n}" / f"rank{rank}.json").read_text())
            assert row["loaded"] == row["expected"] and len(row["expected"]) == 8, row
            assert row["lr_betas"] == [0.01, [0.8, 0.95]] and row["final"], row
            assert row["unpickling_calls"] == [] and not row["dcp_imported"], row


# ---------------------------------------------------------------- damaged manifests and shards: refused by name


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(16, 9, bias=False), torch.nn.Linear(9, 16))
    m[1].bias.requires_grad_(False)
    return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2, betas=(0.8, 0.95))


@pytest.fixture
def ckpt(tmp_path):
    """A checkpoint of one process after two steps, with its tensors listed as dim-0 shards (as a
    multi-process one lists them), and the model and optimizer it was taken from."""
    m, opt = _model_and_optimizer()
    for _ in range(2):
        m(torch.randn(3, 16)).square().sum().backward()
        opt.step()
    folder = tmp_path / "sharded"
    folder.mkdir()
    fc.save(m, opt, folder, 0, 1)
    man = json.loads((folder / fc.MANIFEST).read_text())
    for e in man["tensors"].values():
        if e["shape"]:
            del e["whole"]
            e["shards"] = [[0, 0, e["shape"][0]]]
    (folder / fc.MANIFEST).write_text(json.dumps(man))
    return folder, m, opt


def _load(folder: Path, seed: int = 1):
    m, opt = _model_and_optimizer(seed)
    opt.param_groups[0]["lr"] = 5e-3
    fc.load(m, opt, folder, 0, 1)
    return m, opt


def test_save_replaces_links_planted_at_its_names_never_writes_through(tmp_path):
    """Links planted in the checkpoint folder at the shard's and the manifest's names (pointing at a
    user's files) are replaced by the files the save writes, through the one writer; the files they
    point at are untouched, and the checkpoint reads back."""
    m, opt = _model_and_optimizer()
    m(torch.randn(3, 16)).square().sum().backward()
    opt.step()
    folder = tmp_path / "sharded"
    folder.mkdir()
    victims = {name: tmp_path / f"victim-{i}" for i, name in enumerate((fc.shard_name(0, 1), fc.MANIFEST))}
    for name, victim in victims.items():
        victim.write_bytes(b"precious")
        (folder / name).symlink_to(victim)
    fc.save(m, opt, folder, 0, 1)
    assert all(v.read_bytes() == b"precious" for v in victims.values())
    assert not any((folder / name).is_symlink() for name in victims)
    m2, _ = _load(folder)
    assert all(torch.equal(a, b) for (n, a), b in zip(m.named_parameters(), m2.parameters()) if n != "1.bias")


def test_checkpoint_reads_back_exactly_in_one_process(ckpt):
    folder, m, opt = ckpt
    m2, opt2 = _load(folder)
    for (n, a), b in zip(m.named_parameters(), m2.parameters()):
        assert torch.equal(a, b) != (n == "1.bias"), n  # the frozen bias is not in the checkpoint
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"] and s2["param_groups"][0]["lr"] == 1e-2
    for i in s1["state"]:
        assert all(torch.equal(s1["state"][i][k], s2["state"][i][k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def _edit(folder: Path, change) -> None:
    man = json.loads((folder / fc.MANIFEST).read_text())
    change(man)
    (folder / fc.MANIFEST).write_text(json.dumps(man))


MANIFEST_DAMAGE = {
    "wrong shape": (lambda m: m["tensors"]["model/0.weight"].update(shape=[9, 17]), "tensor model/0.weight: shape [9, 17] float32, this model's is [9, 16]"),
    "wrong dtype": (lambda m: m["tensors"]["model/0.weight"].update(dtype="bfloat16"), "tensor model/0.weight: shape [9, 16] bfloat16"),
    "unknown dtype": (lambda m: m["tensors"]["model/0.weight"].update(dtype="object"), "tensor model/0.weight: dtype 'object'"),
    "missing tensor": (lambda m: m["tensors"].pop("model/1.weight"), "tensor model/1.weight: this model has it, the checkpoint does not"),
    "extra tensor": (lambda m: m["tensors"].update({"model/2.weight": {"shape": [1], "dtype": "float32", "whole": True}}),
                     "tensor model/2.weight: the checkpoint has it, this model does not"),
    "gap in shards": (lambda m: m["tensors"]["model/0.weight"].update(shards=[[0, 0, 5]]), "tensor model/0.weight: its shards cover 5 of 9 rows"),
    "overlapping shards": (lambda m: m["tensors"]["model/0.weight"].update(shards=[[0, 0, 5], [0, 4, 5]]), "does not follow the previous one"),
    "rank beyond world": (lambda m: m["tensors"]["model/0.weight"].update(shards=[[3, 0, 9]]), "does not follow the previous one (rank < 1"),
    "setting of another type": (lambda m: m["optimizer"]["groups"][0]["settings"].update(lr="0.01"), "setting 'lr' is '0.01', a str"),
    "unknown setting": (lambda m: m["optimizer"]["groups"][0]["settings"].update(evil=1), "setting 'evil' unknown to this optimizer"),
    "other parameters": (lambda m: m["optimizer"]["groups"][0].update(params=["1.weight", "0.weight"]), "other parameters than this run's"),
    "step not a count": (lambda m: m["tensors"]["optim/0.weight/step"].update(shape=[1000]), "tensor optim/0.weight/step: not a step count"),
    "moment of another shape": (lambda m: m["tensors"]["optim/0.weight/exp_avg"].update(shape=[9, 1000]),
                                "tensor optim/0.weight/exp_avg: shape [9, 1000] float32 does not fit its parameter's [9, 16]"),
    "state value": (lambda m: m["optimizer"]["state"]["0.weight"].update(exp_avg={"value": 1.0}), "optimizer state 'exp_avg' of 0.weight is not a step count"),
    "unused tensor": (lambda m: m["tensors"].update({"optim/x": {"shape": [2**39, 2**39], "dtype": "float32", "whole": True}}),
                      "tensor optim/x: neither a trainable tensor of this model nor optimizer state"),
    "state naming nothing": (lambda m: m["optimizer"]["state"]["0.weight"].update(exp_avg={"tensor": "nope"}), "optimizer state 'exp_avg' of 0.weight names no tensor"),
    "state naming a list": (lambda m: m["optimizer"]["state"]["0.weight"].update(exp_avg={"tensor": []}), "optimizer state 'exp_avg' of 0.weight names no tensor"),
    "version": (lambda m: m.update(version=2), "format version 2; this qconvert reads 1"),
    "world": (lambda m: m.update(world=True), "world True is not a process count"),
}


@pytest.mark.parametrize("case", list(MANIFEST_DAMAGE))
def test_damaged_manifest_is_refused_by_name(ckpt, case):
    folder = ckpt[0]
    change, needle = MANIFEST_DAMAGE[case]
    _edit(folder, change)
    with pytest.raises(DataError, match="manifest.json: ") as e:
        _load(folder)
    assert needle in str(e.value) and "earlier checkpoint-N" in e.value.hint, str(e.value)


@pytest.mark.parametrize("text, needle", [("{", "not a manifest (JSONDecodeError"), ('{"lr": NaN}', "NaN is not a number a manifest holds"),
                                          ("[" * 100_000 + "]" * 100_000, "not a manifest (RecursionError"), ("\xff", "not a manifest"),
                                          ("[]", "not a qconvert-fsdp-checkpoint manifest"), ('{"world": 1' + "0" * 5000 + "}", "not a manifest (ValueError")])
def test_manifest_that_is_not_one_is_refused(ckpt, text, needle):
    folder = ckpt[0]
    (folder / fc.MANIFEST).write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match="manifest.json: ") as e:
        _load(folder)
    assert needle in str(e.value), str(e.value)


def test_manifest_size_is_checked_before_it_is_read(ckpt, monkeypatch):
    """A manifest over 32 MiB (a sparse file: nothing to read, were it read) is refused by its size,
    one of more separators and brackets (which bound its values) than the bound, here lowered to 100,
    before it is parsed."""
    folder = ckpt[0]
    monkeypatch.setattr(fc, "MAX_VALUES", 100)
    (folder / fc.MANIFEST).write_text("[" + "{}," * 100 + "{}]")
    with pytest.raises(DataError, match="202 JSON separators and brackets, more than a manifest holds"):
        _load(folder)
    with open(folder / fc.MANIFEST, "r+b") as f:
        f.truncate(fc.MAX_MANIFEST + 1)
    with pytest.raises(DataError, match="more than a manifest holds"):
        _load(folder)
    os.remove(folder / fc.MANIFEST)
    with pytest.raises(DataError, match="manifest.json: missing"):
        _load(folder)
    os.mkfifo(folder / fc.MANIFEST)  # opening it would wait for a writer forever
    with pytest.raises(DataError, match="manifest.json: not a regular file"):
        _load(folder)


def _write_shard(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path))


def test_damaged_shard_file_is_refused_by_name(ckpt):
    from safetensors.torch import load_file

    folder = ckpt[0]
    path = folder / fc.shard_name(0, 1)
    good = load_file(str(path))
    # a tensor of the same size but another shape: the header names it
    _write_shard(path, {**good, "model/0.weight": good["model/0.weight"].reshape(16, 9).contiguous()})
    with pytest.raises(DataError, match=r"shards-rank0-of-1.safetensors: tensor model/0.weight: \[16, 9\] F32, the manifest says \[9, 16\] F32"):
        _load(folder)
    # a tensor the manifest does not list
    _write_shard(path, {**{k: v for k, v in good.items() if k != "optim/1.weight/step"}, "optim/1.weight/stop": good["optim/1.weight/step"]})
    with pytest.raises(DataError, match="tensor optim/1.weight/st[oe]p: (missing|not in the manifest)"):
        _load(folder)
    # truncated, then one byte longer, then a header length far beyond the file: refused by size before any read
    _write_shard(path, good)
    raw = path.read_bytes()
    for damaged in (raw[:-4], raw + b"\0", (2**62).to_bytes(8, "little") + raw[8:]):
        path.write_bytes(damaged)
        with pytest.raises(DataError, match="shards-rank0-of-1.safetensors: .* bytes where the manifest's tensors take 3,464 bytes"):
            _load(folder)
    # a header that is not JSON, at the right size
    n = int.from_bytes(raw[:8], "little")
    path.write_bytes(raw[:8] + b"x" * n + raw[8 + n:])
    with pytest.raises(DataError, match="shards-rank0-of-1.safetensors: not a safetensors file"):
        _load(folder)
    path.unlink()
    with pytest.raises(DataError, match="shards-rank0-of-1.safetensors: missing"):
        _load(folder)


# ---------------------------------------------------------------- the former format: refused unopened


class _Evil:
    """Unpickling this creates a folder (a stand-in for running any code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_former_format_is_refused_without_being_opened(ckpt, tmp_path):
    folder = ckpt[0]
    os.remove(folder / fc.MANIFEST)
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(DataError, match="torch.distributed.checkpoint's format") as e:
        _load(folder)
    assert "--overwrite" in e.value.hint and not marker.exists()
    os.remove(folder / ".metadata")
    buf = io.BytesIO()
    torch.save({"x": _Evil(marker)}, buf)
    (folder / "__0_0.distcp").write_bytes(buf.getvalue())
    with pytest.raises(DataError, match="torch.distributed.checkpoint's format"):
        _load(folder)
    assert not marker.exists()


# ---------------------------------------------------------------- train --fsdp --resume


COMMON = ["--max-steps", 3, "--batch-size", 2, "--grad-accum", 1, "--lora-r", 4, "--lora-dropout", 0.0, "--optim", "adamw"]
#: COMMON for a resume on two processes: the same global batch (2), which a resume must keep (training/resume.py)
TWO = [1 if i and COMMON[i - 1] == "--batch-size" else v for i, v in enumerate(COMMON)]


def _old_format_run(qmodel, data, out: Path) -> Path:
    """A genuine checkpoint in the former format: `train --fsdp` (one process) saving as qconvert did."""
    args = [sys.executable, str(HERE / "fsdp_old_format_writer.py"), "train", str(qmodel), "--data", str(data), "--output", str(out),
            "--backend", "reference", "--fsdp", "--stop-after", "1", *map(str, COMMON)]
    r = subprocess.run(args, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    sharded = out / "checkpoint-1" / "sharded"
    assert (sharded / ".metadata").is_file() and list(sharded.glob("*.distcp")) and not (sharded / fc.MANIFEST).exists()
    return sharded


def _evil_byte_record(sharded: Path, marker: Path) -> str:
    """Point one byte record of a genuine .metadata at a torch.save'd pickle that creates ``marker``,
    appended to a .distcp file (the test reads and rewrites the metadata it made itself)."""
    import dataclasses

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    meta = pickle.loads((sharded / ".metadata").read_bytes())
    key = next(k for k, v in meta.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata))
    index = next(i for i in meta.storage_data if i.fqn == key)
    info = meta.storage_data[index]
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    distcp = sharded / info.relative_path
    at = distcp.stat().st_size
    with open(distcp, "ab") as f:
        f.write(buf.getvalue())
    meta.storage_data[index] = dataclasses.replace(info, offset=at, length=len(buf.getvalue()))
    (sharded / ".metadata").write_bytes(pickle.dumps(meta))
    return key


@pytest.mark.slow
@pytest.mark.parametrize("crafted", ["metadata", "byte record"])
def test_resume_of_a_crafted_former_checkpoint_runs_nothing(qmodel, tmp_path, crafted):
    """A genuine checkpoint of the former format, then (a) its .metadata replaced by a pickle that
    runs code, resumed by two processes, or (b) its .metadata pointing one byte record (an optimizer
    setting) at such a pickle in its .distcp file, resumed by one: the code never runs, and the run
    exits 1 with one `qconvert: error:` line (rank 0's), no `[rank0]:` traceback."""
    data = memorize_set(tmp_path)
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    sharded = _old_format_run(qmodel, data, out)
    if crafted == "metadata":
        (sharded / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
        r = subprocess.run([*QCONVERT, "train", str(qmodel), "--data", str(data), "--output", str(out), "--backend", "reference",
                            "--fsdp", "--nproc-per-node", "2", "--resume", *map(str, TWO)], capture_output=True, text=True)
    else:
        assert _evil_byte_record(sharded, marker).startswith("optim.param_groups.")
        r = train(qmodel, data, out, *COMMON, "--fsdp", "--resume", ok=False)
    assert not marker.exists(), r.stderr[-2000:]
    one_line_error(r, "torch.distributed.checkpoint's format", "hint: start the run again with --overwrite")
    assert "[rank" not in r.stderr and not (out / "adapter_config.json").exists()


@pytest.mark.slow
def test_resume_ignores_planted_former_files_and_refuses_a_damaged_manifest_in_one_line(qmodel, tmp_path):
    """A damaged manifest, resumed by two processes, is one line from rank 0 naming the tensor; the
    checkpoint mended, with a crafted .metadata and .distcp planted beside it, resumes (they are
    never opened)."""
    data = memorize_set(tmp_path)
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    train(qmodel, data, out, *COMMON, "--fsdp", "--stop-after", 1)
    sharded = out / "checkpoint-1" / "sharded"
    keep = (sharded / fc.MANIFEST).read_text()
    man = json.loads(keep)
    name = next(k for k in man["tensors"] if k.startswith("model/"))
    man["tensors"][name]["shape"][1] += 1
    (sharded / fc.MANIFEST).write_text(json.dumps(man))
    r = subprocess.run([*QCONVERT, "train", str(qmodel), "--data", str(data), "--output", str(out), "--backend", "reference", "--fsdp",
                        "--nproc-per-node", "2", "--resume", *map(str, TWO)], capture_output=True, text=True)
    one_line_error(r, "sharded/manifest.json", f"tensor {name}: shape [4, 65] float32, this model's is [4, 64] float32")
    assert "[rank" not in r.stderr
    (sharded / fc.MANIFEST).write_text(keep)
    (sharded / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    (sharded / "__0_0.distcp").write_bytes(buf.getvalue())
    r = train(qmodel, data, out, *COMMON, "--fsdp", "--resume")
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in r.stderr and not marker.exists()
    assert [m["step"] for m in metrics(out) if "loss" in m] == [1, 2, 3]
