"""Hostile and careless input to `generate`, `eval` and `verify --plot` (issue 11): each is refused
with `qconvert: error: ...` (one line, or the CLI's detail and hint lines after it), exit code 1, no
traceback, and nothing is loaded that the refusal could have avoided. Grouped by what is attacked: options, model folder and config, data, adapter."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from helpers import QCONVERT, make_tiny_bert
from runtime_helpers import cli, make_word_llama, make_word_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("hostile-runtime")
    src = make_word_llama(d / "src")
    quantize_checkpoint(str(src), d / "q", compute_dtype="float32")
    bert = make_tiny_bert(d / "bert")
    make_word_tokenizer(bert)
    quantize_checkpoint(str(bert), d / "bert-q")
    # an adapter trained on a narrower model of the same family: every LoRA matrix has the wrong shape
    other = make_word_llama(d / "other", hidden=32)
    torch.manual_seed(0)
    get_peft_model(AutoModelForCausalLM.from_pretrained(other), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                          task_type="CAUSAL_LM")).save_pretrained(d / "other-adapter")
    get_peft_model(AutoModelForCausalLM.from_pretrained(src), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                        task_type="CAUSAL_LM")).save_pretrained(d / "adapter")
    data = write_jsonl(d / "data.jsonl", [{"prompt": "w1 w2", "completion": "w3 w4"}])
    return {"dir": d, "src": src, "q": d / "q", "bert": bert, "bert-q": d / "bert-q", "adapter": d / "adapter",
            "other": other, "other-adapter": d / "other-adapter", "data": data}


PREFIX = "qconvert: error: "


def error_text(err: str) -> str:
    """The error message of the CLI's stderr, checked for shape: a first line ``qconvert: error: ...``, then
    only indented detail lines and a ``hint:`` line (the hint may also end the first line, in parentheses)."""
    lines = err.splitlines()
    assert lines and lines[0].startswith(PREFIX) and "Traceback" not in err, err
    assert all(ln.startswith(("  ", "hint: ")) for ln in lines[1:]), err
    first = lines[0].removeprefix(PREFIX).split(" (hint: ")[0]
    return " ".join([first] + [ln.strip() for ln in lines[1:] if ln.startswith("  ")])


def refused(capsys, *args, match: str) -> str:
    """Run the CLI in-process (an unexpected exception fails the test as a traceback would); check the error."""
    rc, out, err = cli(capsys, *args)
    assert rc == 1, (rc, out, err)
    assert match in error_text(err), err
    assert len(err.splitlines()[0].split(" (hint: ")[0]) <= 200 + len(str(args[1])), err  # short, beyond the path it names
    return err


# ---- options -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, match", [
    (["--max-new-tokens", "-1"], "--max-new-tokens must be at least 1, got -1"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
    (["--temperature", "-0.5"], "--temperature must be 0 (greedy) or positive"),
    (["--temperature", "nan"], "--temperature must be 0 (greedy) or positive"),
    (["--top-p", "0.9"], "--top-p and --top-k apply only when sampling"),
    (["--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--temperature", "1", "--top-k", "0"], "--top-k must be at least 1"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be positive"),
    (["--system", "be brief"], "--system needs --chat"),
])
def test_generate_option_values(env, capsys, args, match):
    refused(capsys, "generate", env["q"], "--prompt", "w1", *args, match=match)


def test_option_values_are_refused_before_the_model_is_read(capsys, tmp_path):
    """--max-new-tokens -1 on a folder that is not a model: the option is what gets reported."""
    refused(capsys, "generate", tmp_path, "--prompt", "w1", "--max-new-tokens", "-1", match="--max-new-tokens must be at least 1")


def test_eval_option_values(env, capsys):
    refused(capsys, "eval", env["q"], "--data", env["data"], "--compare", match="--compare needs at least one --adapter")
    refused(capsys, "eval", env["q"], "--data", env["data"], "--batch-size", "0", "--backend", "reference", match="--batch-size 0: must be >= 1")
    refused(capsys, "eval", env["q"], "--data", env["data"], "--max-length", "1", "--backend", "reference", match="--max-length 1: must be >= 2")


@pytest.mark.parametrize("value", ["1", "0", "-3"])
def test_eval_refuses_a_max_length_with_trains_own_line(env, capsys, value):
    """eval's data options are train's (one declaration, one check): the same bad value gets the same
    first line from both commands (the option is checked before either reads a model)."""
    never = env["q"].parent / "never"
    want = refused(capsys, "train", env["q"], "--data", env["data"], "--output", never, "--max-length", value, match="--max-length")
    got = refused(capsys, "eval", env["q"], "--data", env["data"], "--max-length", value, match="--max-length")
    assert got.splitlines()[0] == want.splitlines()[0] and not never.exists(), (got, want)


@pytest.mark.parametrize("field, value", [("truncation", "cut"), ("fmt", "yaml"), ("max_length", 1), ("backend", "cuda-fast")])
def test_eval_options_refuse_what_trains_config_refuses_with_the_same_message(env, field, value):
    """From Python (no click in between): EvalOptions' data fields are checked by TrainConfig's checks."""
    from qconvert.errors import OptionError
    from qconvert.run.evaluate import EvalOptions, evaluate
    from qconvert.training.settings import TrainConfig

    with pytest.raises(OptionError) as train_err:
        TrainConfig(**{field: value}).check()
    with pytest.raises(OptionError) as eval_err:
        evaluate(env["q"], env["data"], **{field: value})
    assert str(eval_err.value) == str(train_err.value)
    assert EvalOptions(fmt="raw").check().fmt == "raw"  # eval's one extra choice


def test_verify_plot_options(env, capsys, tmp_path):
    refused(capsys, "verify", env["q"], "--plot", tmp_path / "e.png", match="--plot needs --against SOURCE")
    refused(capsys, "verify", env["q"], "--against", env["src"], "--plot", tmp_path / "e.txt", match="the picture is written as PNG")
    assert not list(tmp_path.iterdir())


# ---- the model folder and its config ---------------------------------------------------------------------
@pytest.mark.parametrize("which", ["bert", "bert-q"])
def test_an_encoder_is_refused_by_generate_and_eval(env, capsys, which):
    """A BERT (16-bit, or quantized by qconvert) has no language-model head: refused before any weight is read."""
    refused(capsys, "generate", env[which], "--prompt", "w1", match="BertModel is not a causal language model")
    refused(capsys, "eval", env[which], "--data", env["data"], match="BertModel is not a causal language model")


def broken_model(env, tmp_path, config_text: str | None):
    m = tmp_path / "m"
    shutil.copytree(env["q"], m)
    if config_text is None:
        (m / "config.json").unlink()
    else:
        (m / "config.json").write_text(config_text)
    return m


@pytest.mark.parametrize("config_text, match", [
    (None, "no config.json"),
    ('{"model_type": "llama",', "config.json: not valid JSON"),
    ("[1, 2]", "config.json: must hold a JSON object, not list"),
    ("[" * 100_000, "config.json: not valid JSON"),  # a RecursionError before one config.json reader
    ('{"pad": "' + "x" * (17 * 2**20) + '"}', "bytes, over the 16777216-byte limit for a config"),  # read whole before
    (json.dumps({"model_type": "evil", "architectures": ["EvilForCausalLM"], "auto_map": {"AutoModelForCausalLM": "evil.EvilForCausalLM"}}),
     "architecture 'EvilForCausalLM' is not in transformers"),
])
def test_missing_or_invalid_config(env, capsys, tmp_path, config_text, match):
    m = broken_model(env, tmp_path, config_text)
    refused(capsys, "generate", m, "--prompt", "w1", match=match)
    refused(capsys, "eval", m, "--data", env["data"], match=match)


def test_unusable_config_values(env, capsys, tmp_path):
    m = broken_model(env, tmp_path, json.dumps({"model_type": "no-such-model", "architectures": ["LlamaForCausalLM"]}))
    refused(capsys, "generate", m, "--prompt", "w1", match="config.json: transformers cannot build a config from it")
    # the same in a 4-bit checkpoint's config (its quantization_config intact)
    cfg = json.loads((env["q"] / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-model"}))
    refused(capsys, "eval", m, "--data", env["data"], match="config.json: transformers cannot build a config from it")


def test_no_tokenizer(env, capsys, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(env["q"], m, ignore=shutil.ignore_patterns("tokenizer*", "chat_template*", "special_tokens*"))
    refused(capsys, "generate", m, "--prompt", "w1", match="no usable tokenizer")


def test_no_such_model(capsys, tmp_path):
    refused(capsys, "generate", tmp_path / "nope", "--prompt", "w1", match="no such folder")


def test_chat_without_a_chat_template(env, capsys, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(env["q"], m)
    (m / "chat_template.jinja").unlink()
    make_word_tokenizer(m, chat_template=False)
    refused(capsys, "generate", m, "--prompt", "w1", "--chat", "--backend", "reference", match="--chat: the tokenizer has no chat template")


# ---- data ---------------------------------------------------------------------------------------------
def test_eval_data(env, capsys, tmp_path):
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"text": "caf\u00e9 w1 w2"}\n'.encode("latin-1"))
    err = refused(capsys, "eval", env["q"], "--data", latin1, "--backend", "reference", match="not UTF-8 text")
    assert "latin1.jsonl" in err
    refused(capsys, "eval", env["q"], "--data", tmp_path / "missing.jsonl", match="missing.jsonl: no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{oops\n')
    refused(capsys, "eval", env["q"], "--data", bad, "--backend", "reference", match="bad.jsonl:2: not valid JSON")
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "w1"}])
    refused(capsys, "eval", env["q"], "--data", odd, "--backend", "reference", match="is of no known shape")


# ---- adapters -----------------------------------------------------------------------------------------
def adapter_copy(env, tmp_path, name="a"):
    a = tmp_path / name
    shutil.copytree(env["adapter"], a)
    return a


def test_adapter_of_another_base(env, capsys):
    """Shapes checked before PEFT: PEFT's own failure is a RuntimeError listing every mismatched tensor."""
    for cmd, extra in (("generate", ["--prompt", "w1"]), ("eval", ["--data", env["data"]])):
        err = refused(capsys, cmd, env["q"], *extra, "--adapter", env["other-adapter"], "--backend", "reference",
                      match="model.layers.0.self_attn.q_proj maps 64->64 features in")
        assert "the adapter's 32->32" in err and f"trained on '{env['other']}'" in err


def test_adapter_files(env, capsys, tmp_path):
    def check(folder, match):
        refused(capsys, "generate", env["q"], "--prompt", "w1", "--adapter", folder, "--backend", "reference", match=match)

    check(tmp_path / "none", "no such adapter folder, and not a Hub repo id")  # neither a folder nor an org/name id
    a = adapter_copy(env, tmp_path, "badjson")
    (a / "adapter_config.json").write_text("{not json")
    check(a, "adapter_config.json: not valid JSON")
    a = adapter_copy(env, tmp_path, "r0")
    cfg = json.loads((a / "adapter_config.json").read_text())
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "r": 0}))
    check(a, "r must be a positive integer, got 0")
    (a / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "PREFIX_TUNING"}))
    check(a, "not a LoRA adapter")
    a = adapter_copy(env, tmp_path, "pickle")
    (a / "adapter_model.safetensors").rename(a / "adapter_model.bin")
    check(a, "no adapter_model.safetensors")
    a = adapter_copy(env, tmp_path, "truncated")
    blob = (a / "adapter_model.safetensors").read_bytes()
    (a / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    check(a, "adapter_model.safetensors: not a readable safetensors file")
    a = adapter_copy(env, tmp_path, "onlyA")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(a / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if "lora_B" not in k}, str(a / "adapter_model.safetensors"))
    check(a, "lora_A has no matching lora_B")
    a = adapter_copy(env, tmp_path, "elsewhere")
    save_file({k.replace("self_attn", "cross_attn"): v for k, v in sd.items()}, str(a / "adapter_model.safetensors"))
    check(a, "adapts model.layers.0.cross_attn.q_proj, which")


@pytest.mark.slow
def test_a_refusal_from_the_console_script(env):
    """The same path through a real process: exit code 1, the error on stderr, no traceback."""
    r = subprocess.run([*QCONVERT, "generate", str(env["bert"]), "--prompt", "w1"], capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert "BertModel is not a causal language model" in error_text(r.stderr)


def test_embedding_adapter_of_another_base(env, capsys, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    get_peft_model(AutoModelForCausalLM.from_pretrained(env["other"]), LoraConfig(r=4, target_modules=["embed_tokens"],
                                                                                task_type="CAUSAL_LM")).save_pretrained(tmp_path / "emb")
    refused(capsys, "eval", env["src"], "--data", env["data"], "--adapter", tmp_path / "emb",
            match="model.embed_tokens maps 128->64 features in")
