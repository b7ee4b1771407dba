"""The CLI package's structure: library code never imports click or qconvert.cli; shared options and
vocabularies are declared once; `qconvert train`'s options come from one TrainConfig declaration, and
flags, a config file and Python keywords build the same TrainConfig for the same run."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import pytest

import qconvert
from qconvert.errors import OptionError
from qconvert.training.config import load_config, load_run
from qconvert.training.settings import RUN_OPTIONS, SPECS, RunOptions, TrainConfig

PACKAGE = Path(qconvert.__file__).parent


def _imports(path: Path) -> set[str]:
    """Absolute names of every module a source file imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    pkg = parts if path.name == "__init__.py" else parts[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_no_library_module_imports_click_or_the_cli():
    cli_dir = PACKAGE / "cli"
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if cli_dir in path.parents or path.name == "__main__.py":
            continue
        bad = sorted(m for m in _imports(path) if m in ("click", "qconvert.cli") or m.startswith(("click.", "qconvert.cli.")))
        if bad:
            offenders.append(f"{path.relative_to(PACKAGE)}: {', '.join(bad)}")
    assert not offenders, offenders
    assert not list(PACKAGE.glob("**/cli.py")) and not (PACKAGE / "runtime_cli.py").exists()


def _commands():
    from qconvert.cli.main import _load_commands, cli

    _load_commands()
    return cli.commands


def test_shared_options_are_the_same_everywhere():
    from qconvert.names import BACKEND_NAMES as NAMES

    commands = _commands()
    assert set(commands) == {"inspect", "quantize", "verify", "train", "merge", "export-adapter", "export-gguf", "compare", "push", "generate", "eval"}
    seen = {}
    for name, cmd in commands.items():
        for p in cmd.params:
            if "--backend" in getattr(p, "opts", ()):
                assert tuple(p.type.choices) == NAMES and p.default == "auto", name
                seen.setdefault("--backend", []).append(name)
            if "--json" in getattr(p, "opts", ()):
                assert p.name == "as_json" and p.is_flag, name
                seen.setdefault("--json", []).append(name)
            if "--push-to-hub" in getattr(p, "opts", ()):
                assert p.name == "push_to" and p.metavar == "REPO_ID", name
            if "--max-shard-size" in getattr(p, "opts", ()):
                assert p.default == "2GB", name
    assert sorted(seen["--backend"]) == ["eval", "generate", "train"]
    assert sorted(seen["--json"]) == ["compare", "eval", "export-gguf", "generate", "inspect", "merge", "push", "quantize", "verify"]


def test_every_train_option_has_a_flag_a_config_key_and_the_same_default():
    from qconvert.cli.train import train
    from qconvert.training.config import KEYS, LOOKUP

    params = {p.name: p for p in train.params}
    assert set(SPECS) | set(RUN_OPTIONS) | {"config_file", "config_name"} == set(params)
    for f in dataclasses.fields(TrainConfig):
        spec = SPECS[f.name]
        p = params[f.name]
        assert spec.flags and list(p.opts) + list(p.secondary_opts) == list(spec.flags), f.name
        assert KEYS[f.name] == (spec.key, spec.aliases) and LOOKUP[spec.key] == f.name, f.name
        if spec.kind == "list":
            assert p.multiple
        elif spec.kind != "resume":
            assert p.default == f.default, f.name
    for name in ("data", "output", "push_to"):
        assert list(params[name].opts) == list(RUN_OPTIONS[name].flags)


def _from_flags(*args: str):
    from qconvert.cli.train import given_options, train

    ctx = train.make_context("train", list(args))
    params = dict(ctx.params)
    model, config_file = params.pop("model"), params.pop("config_file")
    return load_run(config_file, given_options(ctx, model, params))


def test_flags_config_file_and_keywords_build_the_same_config(tmp_path):
    flags = ["base", "--data", "d.jsonl", "--output", "out", "--learning-rate", "1e-3", "--r", "4", "--num-train-epochs", "3",
             "--target-modules", "q_proj,v_proj", "--no-gradient-checkpointing", "--resume", "--backend", "reference",
             "--format", "text", "--max-seq-length", "128", "--save-steps", "0", "--eval-split", "0.1", "--overwrite"]
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model_name_or_path: base\ndataset_name: d.jsonl\noutput_dir: out\nlearning_rate: 1e-3\nr: 4\nnum_train_epochs: 3\n"
                   "lora_target_modules: [q_proj, v_proj]\ngradient_checkpointing: false\nresume_from_checkpoint: true\n"
                   "backend: reference\ndata_format: text\nmax_seq_length: 128\nsave_steps: 0\nval_set_size: 0.1\n"
                   "overwrite_output_dir: true\nseed: null\n")
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"model": "base", "data": "d.jsonl", "output": "out", "lr": "0.001", "lora_r": 4.0, "epochs": 3,
                              "target_modules": "q_proj,v_proj", "gradient_checkpointing": "no", "resume": "latest",
                              "backend": "reference", "format": "text", "max_length": "128", "save_steps": 0, "eval_split": 0.1,
                              "overwrite": True}))
    kwargs = dict(lr=1e-3, lora_r=4, epochs=3, target_modules=["q_proj", "v_proj"], gradient_checkpointing=False, resume="latest",
                  backend="reference", fmt="text", max_length=128, save_steps=0, eval_split=0.1, overwrite=True)
    run = RunOptions(model="base", data="d.jsonl", output="out")
    python = TrainConfig(**kwargs)
    assert python == TrainConfig.of(None, kwargs) == load_config(cfg) == load_config(js)
    assert _from_flags(*flags) == (run, python)
    assert _from_flags("--config", str(cfg)) == (run, python)
    assert _from_flags("--config", str(js)) == (run, python)
    assert python.target_modules == ["q_proj", "v_proj"] and python.seed == 42  # null in a file: the default
    # flags over the file, the file over the defaults
    run2, over = _from_flags("--config", str(cfg), "--lr", "2e-3", "--output", "elsewhere", "--push-to-hub", "me/x")
    assert over == dataclasses.replace(python, lr=2e-3) and run2 == dataclasses.replace(run, output="elsewhere", push_to="me/x")
    assert load_config(cfg, lr=2e-3) == over
    # untouched: every default
    assert _from_flags() == (RunOptions(), TrainConfig())


def test_a_file_value_a_flag_overrides_is_not_read(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("learning_rate: fast\n")
    with pytest.raises(OptionError, match="learning_rate: 'fast' is not a valid float"):
        _from_flags("--config", str(cfg))
    assert _from_flags("--config", str(cfg), "--lr", "1e-3")[1].lr == 1e-3


@pytest.mark.parametrize("options, needle", [
    (dict(lora_r=0), "--lora-r 0: must be >= 1"),
    (dict(lr=-1.0), "--lr -1.0: must be > 0"),
    (dict(max_steps=2.5), "--max-steps 2.5: expected an integer"),
    (dict(optim="sgd"), "unknown --optim 'sgd'"),
    (dict(lr_scheduler="step"), "unknown --lr-scheduler 'step'"),
    (dict(fmt="csv"), "unknown --format 'csv'"),
    (dict(truncation="cut"), "unknown --truncation 'cut'"),
    (dict(backend="cuda-magic"), "unknown backend 'cuda-magic'"),
])
def test_bad_values_are_option_errors_from_python_and_files(tmp_path, options, needle):
    from qconvert.training.config import KEYS

    with pytest.raises(OptionError, match=needle):
        TrainConfig(**options).check()
    (name, value), = options.items()
    f = tmp_path / "run.json"
    f.write_text(json.dumps({KEYS[name][0]: value}))
    with pytest.raises(OptionError):
        load_config(f).check()


def test_an_unknown_backend_is_an_option_error():
    import torch

    from qconvert.ops.choice import resolve

    with pytest.raises(OptionError, match="unknown backend 'nope'"):
        resolve("nope", torch.device("cpu"))


def test_train_checks_options_before_touching_anything(tmp_path):
    from qconvert.training.loop import train

    with pytest.raises(OptionError, match="--lora-r 0"):
        train("no-model", "no-data", tmp_path / "out", lora_r=0)
    with pytest.raises(OptionError, match="--lr 0"):
        train("no-model", "no-data", tmp_path / "out", TrainConfig(lora_r=4), lr=0)
    with pytest.raises(TypeError, match="learning_rate"):
        train("no-model", "no-data", tmp_path / "out", learning_rate=1e-3)
    assert not (tmp_path / "out").exists()


def test_bad_option_values_are_option_errors_from_every_library_entry(tmp_path):
    """One class for a bad option value, whichever function takes it (issue 22: no compatibility
    subclasses)."""
    import torch

    from qconvert.export.merge import merge_adapter
    from qconvert.model.loader import load_model
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.quant.reference import quantize_4bit_ref

    x = torch.randn(64)
    for kw, said in (({"quant_type": "nf5"}, "unknown quant type"), ({"blocksize": 100}, "block size 100")):
        with pytest.raises(OptionError, match=said):
            quantize_4bit_ref(x, **kw)
    for kw, said in (({"quant_type": "int4"}, "unknown quant type"), ({"blocksize": 48}, "block size 48"),
                     ({"compute_dtype": "float64"}, "compute dtype 'float64'")):
        with pytest.raises(OptionError, match=said):
            quantize_checkpoint(str(tmp_path / "nowhere"), tmp_path / "out", **kw)
    with pytest.raises(OptionError, match="unknown dtype 'float64'"):
        load_model(str(tmp_path / "nowhere"), compute_dtype="float64")
    with pytest.raises(OptionError, match="unknown --dtype 'int8'"):
        merge_adapter(str(tmp_path / "nowhere"), str(tmp_path / "adapter"), tmp_path / "merged", dtype="int8")
