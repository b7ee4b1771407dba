"""`qconvert compare`: a merge that computes what was trained passes; deliberately broken merges (one
tensor swapped, the wrong scaling, the wrong base) fail with exit 1. Hugging Face folders only (the
GGUF side is in test_gguf.py, which needs llama.cpp)."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import make_sharp_llama_with_adapter, run_cli_here as run_cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """q: a tiny 4-bit Llama; src: its 16-bit original; adapter: a LoRA with a non-zero update;
    merged: `qconvert merge` of the two (float32)."""
    d = make_sharp_llama_with_adapter(tmp_path_factory.mktemp("compare"))
    run_cli("merge", d / "q", d / "adapter", d / "merged", "--dtype", "float32")
    return d


def _compare(a, b, **kw):
    from qconvert.export.compare import compare

    return compare(str(a), str(b), new_tokens=4, **{k: str(v) for k, v in kw.items()})


@pytest.mark.slow
def test_the_right_merge_passes_and_broken_ones_fail(setup):
    d = setup
    ok = _compare(d / "q", d / "merged", adapter_a=d / "adapter")
    assert ok["passed"] and ok["kl"] < 1e-6 and ok["top1_agreement"] == 1.0
    assert all(p["greedy_same"] for p in ok["prompts"]) and len(ok["prompts"]) == 5

    swapped = d / "swapped"  # one tensor swapped with its twin of the other layer
    shutil.copytree(d / "merged", swapped)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(swapped / "model.safetensors"))
    a, b = "model.layers.0.self_attn.v_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    sd[a], sd[b] = sd[b], sd[a]
    save_file(sd, str(swapped / "model.safetensors"), metadata={"format": "pt"})
    assert not _compare(d / "q", swapped, adapter_a=d / "adapter")["passed"]

    scaled = d / "adapter-alpha-x2"  # the wrong scaling: lora_alpha doubled
    shutil.copytree(d / "adapter", scaled)
    cfg = json.loads((scaled / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 2
    (scaled / "adapter_config.json").write_text(json.dumps(cfg))
    assert not _compare(d / "q", d / "q", adapter_a=d / "adapter", adapter_b=scaled)["passed"]

    wrong_base = _compare(d / "q", d / "src", adapter_a=d / "adapter", adapter_b=d / "adapter")  # 16-bit original, not the 4-bit base
    assert not wrong_base["passed"]


@pytest.mark.slow
def test_cli_exit_status_json_and_tolerance(setup, tmp_path):
    d = setup
    prompts = tmp_path / "p.txt"
    prompts.write_text("the lazy dog\n\nover the fox\n")
    r = run_cli("compare", d / "q", d / "src", "--prompts", prompts, "--json", ok=False)
    assert r.returncode == 1, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert [p["prompt"] for p in out["prompts"]] == ["the lazy dog", "over the fox"] and not out["passed"]
    r = run_cli("compare", d / "q", d / "src", "--prompts", prompts, "--tolerance", str(out["kl"] * 1.01))
    assert "PASS: mean KL(A||B)" in r.stdout


def test_an_empty_prompts_file_is_refused(tmp_path):
    from qconvert.errors import OptionError
    from qconvert.export.compare import read_prompts

    (tmp_path / "p.txt").write_text("\n  \n")
    with pytest.raises(OptionError, match="no prompt"):
        read_prompts(str(tmp_path / "p.txt"))
    assert read_prompts(None)[0] == "The capital of France is"


@pytest.mark.parametrize("qc", [{"quant_method": "mxfp4"}, {"quant_method": "fp8", "fmt": "e4m3"}, {"quant_method": "gptq", "bits": 4},
                                {"quant_method": "bitsandbytes", "load_in_8bit": True}], ids=lambda q: q["quant_method"] + str(len(q)))
def test_a_checkpoint_quantized_otherwise_is_refused_by_its_method_in_one_line(setup, tmp_path, qc):
    """An FP8 / MXFP4 release (or GPTQ, 8-bit bitsandbytes) holds no model values as stored: compare and
    export-gguf name its quant_method and say to quantize it first, before reading a tensor."""
    src = tmp_path / "release"
    shutil.copytree(setup / "src", src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    for argv in (["compare", src, setup / "src"], ["export-gguf", src, tmp_path / "m.gguf", "--no-check"]):
        r = run_cli(*argv, ok=False)
        lines = r.stderr.splitlines()
        assert r.returncode == 1 and lines[0].startswith("qconvert: error: ") and repr(qc["quant_method"]) in r.stderr, r.stderr
        assert lines[-1].startswith("hint: convert it first: `qconvert quantize") and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "m.gguf").exists()
