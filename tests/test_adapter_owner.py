"""One adapter reader (issue 22): a hostile adapter is refused with the same first line by every path
that reads one: generate/eval/--adapter (runtime.attach_adapter), load_model(adapter=), merge,
export-adapter, export-gguf (merged and --lora-only) and push. Before, runtime.py had a reader of its
own (no size limit on adapter_config.json, no dtype or rank check against the config), so these
cases were attached by generate/eval while merge refused them; and no path refused a link out of
the adapter folder (export-adapter copied the linked file into its output)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from helpers import make_tiny_llama
from qconvert.errors import FormatError
from test_hostile_adapter import PREFIX, Q_A, write_adapter

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("adapter-owner")
    quantize_checkpoint(str(make_tiny_llama(d / "src", dtype=torch.float32)), d / "q", compute_dtype="float32")
    return d / "q"


def _oversized_config(folder: Path) -> None:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(cfg) + " " * (17 << 20))  # valid JSON, 17 MiB


def _weights_a_link(folder: Path) -> None:
    outside = folder.parent / "elsewhere.safetensors"
    os.replace(folder / "adapter_model.safetensors", outside)
    os.symlink(outside, folder / "adapter_model.safetensors")


def _config_a_link(folder: Path) -> None:
    outside = folder.parent / "elsewhere.json"
    os.replace(folder / "adapter_config.json", outside)
    os.symlink(outside, folder / "adapter_config.json")


#: (case, write_adapter arguments, damage, the first line every path gives)
CASES = [
    ("config-17-MiB", {}, _oversized_config, r"adapter_config\.json: \d+ bytes, over the 16777216-byte limit"),
    ("rank-differs-from-config", dict(tensors=lambda sd: sd.update({Q_A: torch.zeros(3, 64)})), None,
     r"q_proj: lora_A is \[3, 64\] and lora_B \[64, 4\], rank 4 needs \[4, in\] and \[out, 4\]"),
    ("integer-lora-A", dict(tensors=lambda sd: sd.update({Q_A: torch.zeros(4, 64, dtype=torch.int32)})), None,
     r"q_proj: lora_A/lora_B must be floating point, got I32/F32"),
    ("weights-a-link-out", {}, _weights_a_link, r"adapter_model\.safetensors: a link to a file outside the adapter folder"),
    ("config-a-link-out", {}, _config_a_link, r"adapter_config\.json: a link to a file outside the adapter folder"),
]


def _paths(base: Path, adapter: Path, out: Path):
    """(name, call) for every workflow that reads an adapter folder."""
    import qconvert
    from qconvert.export.adapter import export_adapter
    from qconvert.export.gguf import export_gguf
    from qconvert.export.merge import merge_adapter
    from qconvert.hub.push import validate_folder
    from qconvert.run.inference import LoadedModel, attach_adapter

    def runtime():  # what generate --adapter and eval --adapter call, on the loaded model
        m = qconvert.load_model(base, backend="reference", device="cpu")
        attach_adapter(LoadedModel(m, None, base, str(base), "4-bit", "float32", []), adapter)

    return [
        ("generate/eval --adapter", runtime),
        ("load_model(adapter=)", lambda: qconvert.load_model(base, backend="reference", device="cpu", adapter=adapter)),
        ("merge", lambda: merge_adapter(str(base), str(adapter), out / "merged")),
        ("export-adapter", lambda: export_adapter(adapter, out / "exported")),
        ("export-gguf", lambda: export_gguf(str(base), out / "m.gguf", adapter=str(adapter))),
        ("export-gguf --lora-only", lambda: export_gguf(str(base), out / "l.gguf", adapter=str(adapter), lora_only=True)),
        ("push", lambda: validate_folder(adapter)),
    ]


@pytest.mark.slow
@pytest.mark.parametrize("case,kw,damage,message", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_adapter_is_refused_identically_on_every_path(base, tmp_path, case, kw, damage, message):
    a = write_adapter(tmp_path / "a", **kw)
    if damage:
        damage(a)
    (tmp_path / "out").mkdir()
    got = {}
    for name, call in _paths(base, a, tmp_path / "out"):
        try:
            call()
            got[name] = "accepted"
        except FormatError as e:
            got[name] = str(e).splitlines()[0]
    assert len(set(got.values())) == 1, got  # one reader: one first line
    assert all(__import__("re").search(message, v) for v in got.values()), got
    assert list((tmp_path / "out").iterdir()) == []  # nothing written by any path


def test_a_link_inside_the_adapter_folder_is_read(tmp_path):
    """The control for the link cases: a link that stays inside the folder is an ordinary file."""
    from qconvert.model.adapters import read_adapter_config, read_lora_weights

    a = write_adapter(tmp_path / "a")
    os.replace(a / "adapter_model.safetensors", a / "real.safetensors")
    os.symlink("real.safetensors", a / "adapter_model.safetensors")
    modules = read_lora_weights(a, read_adapter_config(a))
    assert sorted(modules) == [m.removeprefix(PREFIX) for m in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")]


MERGE_BOTH = """
import sys
from pathlib import Path
from qconvert.export.adapter import export_adapter
from qconvert.export.gguf import export_gguf
from qconvert.export.merge import merge_adapter
q, local, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
for name, adapter in (("hub", "acme/tiny-lora"), ("local", local)):
    merge_adapter(q, adapter, out / f"merged-{name}", dtype="float32")
    export_gguf(q, out / f"{name}.gguf", adapter=adapter, lora_only=True)
    export_adapter(adapter, out / f"exported-{name}")
"""


@pytest.mark.slow
def test_merge_and_exports_take_an_adapter_hub_id_as_generate_and_eval_do(base, tmp_path):
    """Hub/local resolution has one owner too (qconvert.io.source.resolve_adapter_path): merge,
    export-gguf and export-adapter fetch an adapter's two files by Hub id, as generate, eval and load_model do, and write
    the bytes the local folder gives. Before, they took local folders only ("no adapter_config.json")."""
    import subprocess
    import sys

    import olah_server

    if not olah_server.available():
        pytest.skip("olah not installed (tools/setup_olah.sh)")
    a = write_adapter(tmp_path / "tiny-lora")  # the GGUF adapter is named after the folder (or repo) name
    hub = olah_server.OlahHub(tmp_path / "olah")
    hub.add_repo("acme/tiny-lora", a)
    hub.start()
    try:
        env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1")
        r = subprocess.run([sys.executable, "-c", MERGE_BOTH, str(base), str(a), str(tmp_path)], capture_output=True, text=True, env=env)
    finally:
        hub.stop()
    assert r.returncode == 0, r.stderr[-3000:]
    merged = [(tmp_path / f"merged-{n}" / "model.safetensors").read_bytes() for n in ("hub", "local")]
    assert merged[0] == merged[1]
    assert (tmp_path / "hub.gguf").read_bytes() == (tmp_path / "local.gguf").read_bytes()
    exported = [(tmp_path / f"exported-{n}" / "adapter_model.safetensors").read_bytes() for n in ("hub", "local")]
    assert exported[0] == exported[1] == (a / "adapter_model.safetensors").read_bytes()
