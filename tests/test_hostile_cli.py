"""The CLI's refusal shape for a battery of bad inputs: the first stderr line is
``qconvert: error: ...`` of at most 200 characters, no traceback, exit code 1 for an error and 2 for
a usage error (README "Errors and exit codes"; spec/robustness.md). Run in-process through
``qconvert.cli.main`` (cheap), plus two cases in a real subprocess."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from helpers import QCONVERT, make_tiny_llama, whole_error
from qconvert.cli.main import main

FIRST_LINE = re.compile(r"^qconvert: error: .{1,183}$")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A good 4-bit checkpoint, damaged copies of it, and damaged adapters."""
    from safetensors.torch import load_file, save_file
    from test_hostile_adapter import truncate, write_adapter

    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.format.layout import pack_quant_state, unpack_quant_state

    d = tmp_path_factory.mktemp("hostile-cli")
    q = d / "q"
    quantize_checkpoint(str(make_tiny_llama(d / "src", dtype=torch.float32)), q)
    f = {"q": q, "plain": d / "src"}

    def copy(name, config=None, raw=None):
        c = d / name
        shutil.copytree(q, c)
        if config:
            cfg = json.loads((c / "config.json").read_text())
            config(cfg)
            (c / "config.json").write_text(json.dumps(cfg))
        if raw is not None:
            (c / "config.json").unlink()
            if raw:
                (c / "config.json").write_text(raw)
        f[name] = c
        return c

    copy("no-config", raw="")
    copy("bad-json", raw="{oops")
    copy("remote", config=lambda c: c.update(model_type="evil", architectures=["EvilForCausalLM"], auto_map={"AutoModel": "m.Evil"}))
    copy("fewer-layers", config=lambda c: c.update(num_hidden_layers=1))
    t = copy("transposed")
    sd = load_file(str(t / "model.safetensors"))
    key = "model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4"
    qs = unpack_quant_state(sd[key])
    qs["shape"] = qs["shape"][::-1]
    sd[key] = pack_quant_state(qs)
    save_file(sd, str(t / "model.safetensors"), metadata={"format": "pt"})
    f["adapter-bad-json"] = write_adapter(d / "adapter-bad-json", raw_config="{oops")
    f["adapter-r0"] = write_adapter(d / "adapter-r0", config=lambda c: c.update(r=0))
    f["adapter-shapes"] = write_adapter(d / "adapter-shapes", tensors=lambda sd: sd.update(
        {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}))
    f["adapter-truncated"] = write_adapter(d / "adapter-truncated")
    truncate(f["adapter-truncated"])
    f["adapter-local-base"] = write_adapter(d / "adapter-local-base", config=lambda c: c.update(base_model_name_or_path="/home/me/base"))
    (f["adapter-local-base"] / "README.md").write_text("---\nbase_model_relation: adapter\n---\n")
    m = d / "merged-bad-config"
    m.mkdir()
    (m / "config.json").write_text("{oops")
    f["merged-bad-config"] = m
    f["out"] = d / "out"
    return f


#: (case id, argv built from the files, exit code, a fragment the first line must hold)
BATTERY = [
    ("inspect-missing", lambda f: ["inspect", "/no/such/folder"], 1, "no such file or folder"),
    ("usage-missing-argument", lambda f: ["inspect"], 2, "Missing argument 'PATH'"),
    ("usage-unknown-command", lambda f: ["no-such-command"], 2, "No such command"),
    ("usage-bad-int", lambda f: ["quantize", f["plain"], f["out"], "--blocksize", "abc"], 2, "'abc' is not a valid integer"),
    ("usage-bad-choice", lambda f: ["merge", f["q"], f["adapter-r0"], f["out"], "--dtype", "float8"], 2, "'float8' is not one of"),
    ("usage-unknown-option", lambda f: ["verify", f["q"], "--frobnicate"], 2, "No such option '--frobnicate'"),
    ("generate-config-missing", lambda f: ["generate", f["no-config"], "--prompt", "hi"], 1, "no config.json"),
    ("generate-config-invalid", lambda f: ["generate", f["bad-json"], "--prompt", "hi"], 1, "config.json: not valid JSON"),
    ("generate-config-remote-code", lambda f: ["generate", f["remote"], "--prompt", "hi"], 1, "architecture 'EvilForCausalLM' is not in transformers"),
    ("generate-fewer-layers", lambda f: ["generate", f["fewer-layers"], "--prompt", "hi"], 1, "has no place in the LlamaForCausalLM"),
    ("verify-transposed", lambda f: ["verify", f["transposed"]], 1, "quant-state shape [64, 32]"),
    ("verify-no-4bit-weight", lambda f: ["verify", f["plain"]], 1, "holds no 4-bit weight"),
    ("merge-adapter-invalid-json", lambda f: ["merge", f["q"], f["adapter-bad-json"], f["out"]], 1, "adapter_config.json: not valid JSON"),
    ("merge-adapter-r0", lambda f: ["merge", f["q"], f["adapter-r0"], f["out"]], 1, "r must be a positive integer, got 0"),
    ("merge-adapter-wrong-shape", lambda f: ["merge", f["q"], f["adapter-shapes"], f["out"]], 1, "q_proj: lora_B @ lora_A is [64, 32]"),
    ("merge-adapter-truncated", lambda f: ["merge", f["q"], f["adapter-truncated"], f["out"]], 1, "not a readable safetensors file"),
    ("export-adapter-r0", lambda f: ["export-adapter", f["adapter-r0"], f["out"]], 1, "r must be a positive integer"),
    ("export-adapter-truncated", lambda f: ["export-adapter", f["adapter-truncated"], f["out"]], 1, "not a readable safetensors file"),
    ("push-config-invalid", lambda f: ["push", f["merged-bad-config"], "alice/x"], 1, "config.json: not valid JSON"),
    ("push-adapter-local-base", lambda f: ["push", f["adapter-local-base"], "alice/x"], 1, "base_model_name_or_path is a local path"),
    ("long-message-is-cut", lambda f: ["inspect", "/" + "very-long-folder-name/" * 14], 1, "/very-long-folder-name/"),
]


@pytest.mark.parametrize("case,argv,code,fragment", BATTERY, ids=[b[0] for b in BATTERY])
def test_bad_input_gets_one_short_first_line(files, capsys, monkeypatch, case, argv, code, fragment):
    monkeypatch.delenv("QCONVERT_DEBUG", raising=False)
    monkeypatch.setenv("QCONVERT_BACKEND", "reference")
    assert main([str(a) for a in argv(files)]) == code
    out, err = capsys.readouterr()
    first, *rest = err.splitlines()
    assert FIRST_LINE.match(first), first
    assert fragment in whole_error(first, rest) and "Traceback" not in err
    assert not files["out"].exists()
    if case == "long-message-is-cut":  # cut with " ...", and the whole message still follows
        assert first.endswith(" ...") and "no such file or folder" in err and rest[-1].startswith("hint: ")


def test_unexpected_errors_are_one_line_and_say_how_to_see_the_traceback(files, capsys, monkeypatch):
    import qconvert.convert.inspect

    def boom(path):
        raise TypeError("unsupported operand type(s) for +: 'int' and 'str'\nsecond line")

    monkeypatch.delenv("QCONVERT_DEBUG", raising=False)
    monkeypatch.setattr(qconvert.convert.inspect, "inspect_checkpoint", boom)
    assert main(["inspect", str(files["q"])]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["qconvert: error: unexpected TypeError: unsupported operand type(s) for +: 'int' and 'str'",
                   "hint: this is a bug in qconvert; run again with QCONVERT_DEBUG=1 for the traceback and report it"]
    monkeypatch.setattr(qconvert.convert.inspect, "inspect_checkpoint", lambda p: (_ for _ in ()).throw(PermissionError(13, "Permission denied", p)))
    assert main(["inspect", str(files["q"])]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"qconvert: error: {files['q']}: Permission denied" and err[1].startswith("hint: ")
    monkeypatch.setenv("QCONVERT_DEBUG", "1")  # the traceback switch re-raises
    with pytest.raises(PermissionError):
        main(["inspect", str(files["q"])])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["generate-config-invalid", "merge-adapter-r0"])
def test_in_a_real_process(files, case):
    """The same shape from the installed entry point, in a subprocess (exit code included)."""
    _, argv, code, fragment = next(b for b in BATTERY if b[0] == case)
    env = {k: v for k, v in os.environ.items() if k != "QCONVERT_DEBUG"}
    r = subprocess.run([*QCONVERT, *map(str, argv(files))], capture_output=True, text=True, env=env)
    first = r.stderr.splitlines()[0]
    assert r.returncode == code and FIRST_LINE.match(first) and fragment in first and "Traceback" not in r.stderr


def test_terminal_escapes_in_a_message_are_not_sent_to_the_terminal(capsys, monkeypatch):
    """A hostile name (here a path; in the wild a tensor name or a file in an index) with an escape
    sequence that would clear the screen or retitle the terminal is printed escaped."""
    monkeypatch.delenv("QCONVERT_DEBUG", raising=False)
    assert main(["inspect", "/no/such/\x1b[2J\x1b]0;owned\x07"]) == 1
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err
    assert err.splitlines()[0] == "qconvert: error: /no/such/\\x1b[2J\\x1b]0;owned\\x07: no such file or folder"
