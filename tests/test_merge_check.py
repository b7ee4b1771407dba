"""`qconvert merge` checks its output against the model that was trained (the 4-bit base plus the adapter,
unmerged, as load_model runs it): a good merge passes and is published; a broken merge (the LoRA
scaling doubled inside the merge) is caught and kept only at OUT.unverified, never at OUT."""

from __future__ import annotations

import json

import pytest
from helpers import make_sharp_llama_with_adapter, run_cli, run_cli_here


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """q: a tiny 4-bit Llama with sharp logits (lm_head x 25, as a trained model's) and a tokenizer;
    adapter: a LoRA with a non-zero update on three module kinds."""
    return make_sharp_llama_with_adapter(tmp_path_factory.mktemp("merge_check"))


@pytest.mark.slow
def test_a_good_merge_passes_and_a_wrongly_scaled_one_is_caught(setup, monkeypatch):
    from qconvert.export.lora_merge import LoraAdapter
    from qconvert.export.merge import merge_adapter

    d = setup
    good = merge_adapter(str(d / "q"), str(d / "adapter"), d / "good", check=True)
    assert good["check"]["passed"] and good["check"]["kl"] < 1e-3 and good["check"]["top1_agreement"] > 0.99
    assert good["output"] == str(d / "good") and (d / "good" / "model.safetensors").is_file()
    assert not (d / "good.unverified").exists() and not (d / "good" / "CHECK_FAILED.json").exists()

    scaling = LoraAdapter.scaling
    monkeypatch.setattr(LoraAdapter, "scaling", lambda self, m: 2 * scaling(self, m))  # the merge's bug, not the reference's
    bad = merge_adapter(str(d / "q"), str(d / "adapter"), d / "bad", check=True)
    assert not bad["check"]["passed"] and bad["check"]["kl"] > 1e-2, bad["check"]
    assert not (d / "bad").exists() and bad["output"] == str(d / "bad.unverified")
    kept = json.loads((d / "bad.unverified" / "CHECK_FAILED.json").read_text())
    assert kept["passed"] is False and kept["output"] == str(d / "bad") and kept["kl"] == bad["check"]["kl"]


@pytest.mark.slow
def test_the_default_bound_follows_the_output_dtype(setup, monkeypatch):
    """A LoRA scaling 10% off (KL about 7e-3 on this model, under the former single bound 1e-2) is
    caught in a float32 merge, whose faithful KL is about 1e-12; in bfloat16, whose own rounding gives
    about 4e-5 here and up to 7e-4 on other tiny models, the bound stays 1e-2 and lets it through."""
    from qconvert.export.lora_merge import LoraAdapter
    from qconvert.export.merge import merge_adapter

    d = setup
    scaling = LoraAdapter.scaling
    monkeypatch.setattr(LoraAdapter, "scaling", lambda self, m: 1.1 * scaling(self, m))
    f32 = merge_adapter(str(d / "q"), str(d / "adapter"), d / "off-f32", dtype="float32", check=True)["check"]
    assert f32["tolerance"] == 1e-4 and not f32["passed"] and 1e-3 < f32["kl"] < 1e-2, f32
    bf16 = merge_adapter(str(d / "q"), str(d / "adapter"), d / "off-bf16", check=True)["check"]
    assert bf16["tolerance"] == 1e-2 and bf16["passed"], bf16


@pytest.mark.slow
def test_cli_exit_status_and_where_a_failed_merge_goes(setup):
    d = setup
    r = run_cli("merge", d / "q", d / "adapter", d / "strict", "--check-tolerance", "1e-30", ok=False)  # bf16 rounding is above 1e-30
    assert r.returncode == 1 and "check FAIL: the merge does not compute what BASE + ADAPTER computes" in r.stdout
    assert r.stderr.splitlines()[-2].startswith("qconvert: error: the merge failed its check")
    assert not (d / "strict").exists() and (d / "strict.unverified" / "CHECK_FAILED.json").is_file()


@pytest.mark.slow
def test_cli_verdict_line_and_no_check(setup):
    from click.testing import CliRunner

    from qconvert.cli.main import _load_commands, cli

    _load_commands()
    d = setup
    r = CliRunner().invoke(cli, ["merge", str(d / "q"), str(d / "adapter"), str(d / "cli"), "--dtype", "float32"])
    assert r.exit_code == 0 and "check PASS: mean KL" in r.output and (d / "cli" / "config.json").is_file()
    r = CliRunner().invoke(cli, ["merge", str(d / "q"), str(d / "adapter"), str(d / "unchecked"), "--no-check", "--check-tolerance", "1e-30"])
    assert r.exit_code == 0 and "check " not in r.output.replace(str(d), "") and (d / "unchecked" / "config.json").is_file()


def test_fixed_id_probes_for_a_base_without_tokenizer():
    from qconvert.export.check import _id_probes

    a, b = _id_probes(50), _id_probes(50)
    assert a == b and len(a) == 4 and all(0 <= i < 50 for _, ids in a for i in ids) and len({tuple(ids) for _, ids in a}) == 4


@pytest.mark.slow
def test_a_check_that_would_not_fit_in_memory_is_refused_before_any_work(setup, monkeypatch):
    """The check holds the merged model in float32 beside the 4-bit one (export/check.py): where that
    is over the memory available, merge and export-gguf refuse at once in one line naming --no-check,
    and write nothing (before, the merge ran whole and then the check ran out of memory)."""
    from qconvert.export import check

    d = setup
    need = check.float32_bytes(d / "q")
    assert need > 4 * 320 * 64  # at least the float32 embedding of this model
    monkeypatch.setattr(check, "available_memory", lambda: need // 2)
    r = run_cli_here("merge", d / "q", d / "adapter", d / "no-room", ok=False)
    assert r.returncode == 1 and r.stderr.startswith("qconvert: error: merge's check needs about") and "--no-check" in r.stderr
    assert not (d / "no-room").exists() and not (d / "no-room.unverified").exists()
    r = run_cli_here("export-gguf", d / "q", d / "no-room.gguf", ok=False)
    assert r.returncode == 1 and r.stderr.startswith("qconvert: error: export-gguf's check needs about")
    assert not (d / "no-room.gguf").exists()
    r = run_cli_here("merge", d / "q", d / "adapter", d / "no-room", "--no-check")  # the way on it names
    assert r.returncode == 0 and (d / "no-room" / "config.json").is_file()
    monkeypatch.setattr(check, "available_memory", lambda: 4 * need)  # room: the check runs and passes
    r = run_cli_here("merge", d / "q", d / "adapter", d / "room", "--dtype", "float32")
    assert r.returncode == 0 and "check PASS" in r.stdout


@pytest.mark.slow
def test_the_check_holds_one_model_at_a_time_and_gives_the_figures_of_both_side_by_side(setup, monkeypatch):
    """The unmerged side runs every probe and is freed before the merged side loads (the check's peak
    is one model's, not both); the figures equal those of the two models run side by side."""
    import gc
    import weakref

    import torch

    import qconvert.export.check as check
    import qconvert.export.compare as compare
    from qconvert.export.merge import merge_adapter

    d = setup
    merge_adapter(str(d / "q"), str(d / "adapter"), d / "m", check=False)
    alive, seen = [], []

    def recorded(build):
        def wrapped(self):
            gc.collect()
            seen.append(sum(r() is not None for r in alive))  # models alive when this one loads
            model = build(self)
            alive.append(weakref.ref(model))
            return model
        return wrapped

    monkeypatch.setattr(check._Unmerged, "_build", recorded(check._Unmerged._build))
    monkeypatch.setattr(compare._HF, "_build", recorded(compare._HF._build))
    got = check.check_merge(d / "q", str(d / "adapter"), d / "m", "bfloat16")  # merge_adapter's default dtype
    assert seen == [0, 0] and got["passed"], (seen, got)

    monkeypatch.undo()
    ref, out = check._Unmerged(d / "q", str(d / "adapter")), compare._HF(str(d / "m"), None)
    kls = []
    with torch.no_grad():
        for text in compare.DEFAULT_PROMPTS:
            ids = torch.tensor([ref.tokenizer(text)["input_ids"]])
            la, lb = (m.model(input_ids=ids, use_cache=False).logits[0].double().numpy() for m in (ref, out))
            kls.append(compare._figures(la, lb)["kl"])
    assert got["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-9)
