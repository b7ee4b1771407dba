"""What a newcomer trips over when following README.md and docs/: a mistake, corrected, re-run as it
was; `--help` texts that state defaults; the README's sample output. Each test here failed on the code
or docs before its fix."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli_here
from test_hostile_train import one_line_error


def test_train_rerun_after_a_mistyped_model_is_not_refused_for_the_output(tmp_path):
    """A run refused before it wrote anything left its manifest in OUT; the corrected re-run into the
    same OUT was then refused as "already holds files (a previous run?)"."""
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"text": "hello world"}) + "\n")
    out = tmp_path / "run"
    for _ in range(2):  # the same mistake twice: the second run must report it again, not the output
        r = run_cli_here("train", tmp_path / "qwen-nf4-typo", "--data", data, "--output", out, ok=False)
        one_line_error(r, "qwen-nf4-typo", "no such folder")
    (out / "notes.txt").write_text("mine")  # a file of the user's: still refused, as before
    r = run_cli_here("train", tmp_path / "qwen-nf4-typo", "--data", data, "--output", out, ok=False)
    one_line_error(r, "already holds files")


def test_offline_hub_id_not_cached_says_offline_with_a_hint(tmp_path, monkeypatch):
    """README: HF_HUB_OFFLINE=1 reads only what is cached. An id not in the cache printed "file not
    found in the repository", huggingface_hub's advice to pass 'local_files_only=False', and no hint."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # an empty cache
    r = run_cli_here("quantize", "acme/not-cached", tmp_path / "out", ok=False)
    block = one_line_error(r, "acme/not-cached: not in the Hugging Face cache", "HF_HUB_OFFLINE=1", "hint: unset HF_HUB_OFFLINE")
    assert "local_files_only" not in block and not (tmp_path / "out").exists()


def test_resume_of_a_run_that_ended_without_a_checkpoint_points_to_overwrite(tmp_path):
    """A short run ends without a checkpoint-N (they are 50 steps apart by default). `--resume` then
    said "run without --resume to start", and running without it is refused as "already holds files
    ... --resume to continue it": each hint pointed to the other."""
    from qconvert.errors import DataError
    from qconvert.training.checkpoint import find_resume
    from qconvert.training.outdir import write_manifest

    out = tmp_path / "run"
    out.mkdir()
    write_manifest(out, [])
    (out / "adapter_config.json").write_text("{}")
    with pytest.raises(DataError, match="ended without one") as e:
        find_resume(out, True)
    assert "--overwrite" in e.value.hint and "without --resume" not in e.value.hint
    with pytest.raises(DataError) as e:  # an empty or new folder: nothing ran there yet
        find_resume(tmp_path / "new", True)
    assert e.value.hint == "run without --resume to start"


def test_merge_help_states_the_check_bound_merge_applies():
    """`merge --help` said the check's default bound is 0.01: that is bfloat16's; float32 and float16
    merges are held to tighter ones (docs/merge-push.md, qconvert.export.check.TOLERANCE)."""
    import re

    from qconvert.export.check import TOLERANCE

    text = re.sub(r"(?<=\w-) (?=\w)", "", " ".join(run_cli_here("merge", "--help").stdout.split()))  # click wraps after a hyphen
    stated = re.search(r"--check-tolerance FLOAT Largest mean KL the check passes \(default by --dtype: (.*?)\)\.", text)
    assert stated, text
    for dtype in ("float32", "float16", "bfloat16"):
        assert f"{TOLERANCE[dtype]:g} {dtype}" in stated.group(1)
    assert f"{TOLERANCE['quantize']:g} with --quantize or --base-original" in stated.group(1)
    assert TOLERANCE["quantize"] == TOLERANCE["base_original"]


@pytest.mark.slow
def test_load_model_with_an_adapter_and_merge_print_no_transformers_deprecation(tmp_path):
    """README's Python call `qconvert.load_model(dir, adapter=...)`, and so `qconvert merge`'s check, printed
    transformers' FutureWarning about `is_gradient_checkpointing` (PEFT reads it): noise a user cannot act on."""
    import warnings

    import torch

    import qconvert
    from helpers import make_tiny_llama, write_lora_adapter
    from qconvert.convert.quantize import quantize_checkpoint

    q = tmp_path / "q"
    quantize_checkpoint(str(make_tiny_llama(tmp_path / "src", hidden=32, intermediate=64, vocab=64)), q)
    adapter = write_lora_adapter(q, tmp_path / "adapter")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        model = qconvert.load_model(str(q), adapter=str(adapter), dtype=torch.float32)
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], [str(w.message) for w in seen]
    r = run_cli_here("merge", q, adapter, tmp_path / "merged")
    assert "check PASS" in r.stdout and "FutureWarning" not in r.stderr, r.stderr


def test_inspect_and_quantize_give_one_whole_model_bits_per_param(tiny_models, tmp_path):
    """The README's demo prints quantize's "18.828 bits/param over the whole model" and, four lines
    later, inspect's "whole model 18.807 bits/param": quantize counted the files' bytes, inspect only
    the tensors' (not the headers). Both now count the files, as the card does."""
    from qconvert.convert.inspect import format_report, inspect_checkpoint
    from qconvert.convert.quantize import quantize_checkpoint

    summary = quantize_checkpoint(str(tiny_models.llama()), tmp_path / "q")
    report = inspect_checkpoint(tmp_path / "q")
    assert report["total_params"] == summary["params"] and report["file_bytes"] == summary["output_bytes"]
    assert report["bits_per_param_model"] == summary["bits_per_param_model"] == 8 * summary["output_bytes"] / summary["params"]
    assert f"whole model {summary['bits_per_param_model']:.3f} bits/param" in format_report(report)


@pytest.mark.slow
def test_readme_shows_what_the_demo_prints(tmp_path):
    """The README's sample of `bash tools/demo.sh` is what its three commands print, line for line
    (the output folder and the source path as the README writes them, the seconds aside). It had
    drifted: a bits/param figure the summary no longer prints, and the inspect lines missing."""
    import re
    from pathlib import Path

    from helpers import minilm_dir

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    sample = readme.split("and prints its quantization error against the original weights and its size:", 1)[1]
    sample = sample.split("```\n", 2)[1].splitlines()
    demo = (Path(__file__).resolve().parent.parent / "tools" / "demo.sh").read_text(encoding="utf-8")
    assert 'quantize "$SRC" "$OUT" --overwrite' in demo and 'verify "$OUT" --against "$SRC"' in demo and 'inspect "$OUT" | tail -n 3' in demo
    src, out = minilm_dir(), tmp_path / "all-MiniLM-L6-v2-nf4"
    q = run_cli_here("quantize", src, out, "--overwrite")
    v = run_cli_here("verify", out, "--against", src)
    i = run_cli_here("inspect", out)
    printed = [*q.stderr.splitlines(), *q.stdout.splitlines(), *v.stderr.splitlines(), *v.stdout.splitlines(), *i.stdout.splitlines()[-3:]]

    def as_readme(line: str) -> str:
        line = line.replace(str(out), "out/all-MiniLM-L6-v2-nf4").replace(str(src.parent.parent), "...")
        return re.sub(r", [0-9.]+ s$", ", T s", line)

    assert [as_readme(ln) for ln in printed] == [re.sub(r", [0-9.]+ s$", ", T s", ln) for ln in sample]


#: A newcomer's mistakes on each command, before any model loads: (arguments, after tmp_path is put in for
#: "T"; a fragment of the error). Each printed `qconvert: error:` without the `hint:` line that README.md and
#: docs/refusals.md promise.
MISTAKES = {
    "merge: a mistyped BASE": (["merge", "T/qwen-nf4n", "T/run", "T/merged"], "no such folder"),
    "compare: a mistyped A": (["compare", "T/qwen-nf44", "T/adapter"], "no such folder"),
    "export-gguf: a mistyped MODEL": (["export-gguf", "T/qwen-nf44", "T/q.gguf"], "no such folder"),
    "eval: a mistyped --data": (["eval", "T/adapter", "--data", "T/trian.jsonl"], "no such file"),
    "generate: --max-new-tokens 0": (["generate", "T/adapter", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    "generate: --temperature -1": (["generate", "T/adapter", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    "generate: --top-p 2": (["generate", "T/adapter", "--prompt", "hi", "--temperature", "1", "--top-p", "2"], "--top-p"),
    "generate: --top-k 0": (["generate", "T/adapter", "--prompt", "hi", "--temperature", "1", "--top-k", "0"], "--top-k"),
    "generate: --repetition-penalty 0": (["generate", "T/adapter", "--prompt", "hi", "--repetition-penalty", "0"], "--repetition-penalty"),
    "generate: --system without --chat": (["generate", "T/adapter", "--prompt", "hi", "--system", "be brief"], "--system needs --chat"),
    "compare: a mistyped --prompts file": (["compare", "Q", "Q", "--prompts", "T/prompts.txt"], "cannot read it"),
    "push: a mistyped FOLDER": (["push", "T/qwen-nf44", "you/x"], "no such folder"),
    "push: REPO_ID without a namespace": (["push", "P", "qwen-lora"], "not a repo id of the form namespace/name"),
    "train: a mistyped --config": (["train", "--config", "T/run.yml"], "no such file"),
    "push: a folder qconvert did not write": (["push", "T/empty", "you/x"], "neither a model (config.json) nor an adapter"),
    "quantize: --revision with a local folder": (["quantize", "Q", "T/out", "--revision", "main"], "--revision applies to Hub repo ids"),
    "train: --resume PATH that is no checkpoint": (["train", "Q", "--data", "T/d.jsonl", "--output", "T/run", "--resume", "T/empty"],
                                                   "not a training checkpoint"),
    "eval: a .json file with a trailing comma": (["eval", "Q", "--data", "T/bad.json"], "not valid JSON"),
    "merge: BASE and ADAPTER swapped": (["merge", "T/adapter", "Q", "T/out"], "adapter: a LoRA adapter (adapter_config.json), not a model"),
    "generate: the adapter as MODEL": (["generate", "T/adapter", "--prompt", "hi"], "adapter: a LoRA adapter (adapter_config.json), not a model"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_each_newcomer_mistake_gets_a_hint(case, tiny_models, tmp_path):
    """Q: a 4-bit Llama with a tokenizer; P: an adapter folder as export-adapter writes it (push takes it)."""
    from helpers import write_lora_adapter
    from runtime_helpers import make_word_tokenizer

    args, needle = MISTAKES[case]
    q = tiny_models.copy(tiny_models.llama_4bit(), tmp_path / "q")
    make_word_tokenizer(q)
    adapter = write_lora_adapter(q, tmp_path / "adapter")
    if "P" in args:
        run_cli_here("export-adapter", adapter, tmp_path / "exported", "--base-model", "acme/base")
    (tmp_path / "empty").mkdir()
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "w1 w2"}) + "\n")
    (tmp_path / "bad.json").write_text('[{"text": "w1 w2"},]')
    named = {"Q": str(q), "P": str(tmp_path / "exported")}
    r = run_cli_here(*[named.get(a, a.replace("T/", f"{tmp_path}/")) for a in args], ok=False)
    block = one_line_error(r, needle)
    assert block.splitlines()[-1].startswith("hint: "), block


@pytest.mark.slow
def test_python_api_does_not_pass_on_bitsandbytes_pip_install_kernels_advice():
    """docs/python-api.md's `qconvert.load_model(..., adapter=...)` imports PEFT, which imports
    bitsandbytes, which logged "Failed to load CPU gemm_4bit_forward ... Please make sure you already
    `pip install kernels`" to the user's terminal (the CLI hid it; the Python API did not). A user who
    sets that logger's level keeps it."""
    import subprocess
    import sys

    code = "import qconvert; qconvert.load_model; import bitsandbytes"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and "pip install kernels" not in r.stderr, r.stderr
    own = "import logging; logging.getLogger('bitsandbytes.backends.cpu.ops').setLevel(logging.WARNING); " + code
    r = subprocess.run([sys.executable, "-c", own], capture_output=True, text=True)
    assert r.returncode == 0 and ("pip install kernels" in r.stderr) == _bnb_lacks_kernels(), r.stderr


def _bnb_lacks_kernels() -> bool:
    import importlib.util

    return importlib.util.find_spec("kernels") is None


def test_every_adapter_the_docs_examples_pass_is_one_they_write():
    """The commands in README.md's and docs/'s bash blocks pass adapters that an earlier example
    writes (`train --output DIR`, `export-adapter SRC DIR`). docs/gguf.md passed `./run/adapter`:
    `qconvert train` writes the adapter into --output itself, so that folder never exists."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    lines = []
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S):
            lines += [shlex.split(ln.split("  #")[0]) for ln in block.splitlines() if ln.startswith("qconvert ")]

    def norm(path: str) -> str:
        return path.removeprefix("./").rstrip("/")

    written = {norm(w[w.index("--output") + 1]) for w in lines if w[1] == "train" and "--output" in w}
    written |= {norm(w[3]) for w in lines if w[1] == "export-adapter"}
    passed = {norm(w[i + 1]) for w in lines for i, a in enumerate(w) if a in ("--adapter", "--adapter-a", "--adapter-b")}
    passed |= {norm(w[3]) for w in lines if w[1] == "merge"}
    assert written and passed and passed <= written, sorted(passed - written)


def test_qconvert_alone_prints_the_whole_help():
    """`qconvert` with no command printed "qconvert: error: Usage: ..." and the help cut to 12 lines
    ("... (5 more lines)"): the first thing a newcomer types."""
    r = run_cli_here(ok=False)
    full = run_cli_here("--help")
    assert r.returncode == 2 and "qconvert: error" not in r.stdout + r.stderr
    assert r.stdout == full.stdout and "  verify " in r.stdout


def test_train_with_no_usable_record_hints_at_the_shapes_it_reads(tiny_models, tmp_path):
    """Every record of an unknown shape (a CSV without a text column): train said only "check the
    records' shape", where eval, on the same file, names the shapes it reads."""
    from runtime_helpers import make_word_tokenizer

    q = tiny_models.copy(tiny_models.llama_4bit(), tmp_path / "q")
    make_word_tokenizer(q)
    data = tmp_path / "d.csv"
    data.write_text("question,answer\nw1,w2\n")
    r = run_cli_here("train", q, "--data", data, "--output", tmp_path / "run", ok=False)
    block = one_line_error(r, "no usable example", "is of no known shape")
    assert block.splitlines()[-1] == 'hint: use {"text"}, {"instruction","input","output"}, {"prompt","completion"}, {"messages"} or {"conversations"}'
    bad_json = tmp_path / "d.jsonl"
    bad_json.write_text('{"text": "w1"},\n')  # a trailing comma, as in a JSON array
    r = run_cli_here("train", q, "--data", bad_json, "--output", tmp_path / "run", ok=False)
    assert one_line_error(r, "not valid JSON").splitlines()[-1] == "hint: each line must be one JSON object"


def test_qconvert_help_lists_each_command_with_a_whole_sentence(monkeypatch):
    """`qconvert --help` (README: "lists every command") cut every command's description mid-phrase on
    an 80-column terminal ("Show every tensor of a checkpoint folder or...")."""
    monkeypatch.setenv("COLUMNS", "80")
    text = run_cli_here("--help").stdout
    commands = [ln for ln in text.split("Commands:\n", 1)[1].splitlines() if ln.strip()]
    assert len(commands) == 11 and all(len(ln) <= 80 for ln in commands), commands
    assert not [ln for ln in commands if ln.endswith("...") or not ln.endswith((".", "?"))], commands


def test_python_api_generate_snippet_runs_and_prints_what_the_command_prints(tiny_models, tmp_path, capsys):
    """docs/python-api.md names `generate_text` as `qconvert generate`'s function, but it takes a model
    and a tokenizer, which no example showed how to get. Its snippet, run as written on a tiny model,
    prints the completion `qconvert generate` prints."""
    import re
    from pathlib import Path

    from runtime_helpers import make_word_tokenizer

    q = tiny_models.copy(tiny_models.llama_4bit(), tmp_path / "q")
    make_word_tokenizer(q)
    page = (Path(__file__).resolve().parent.parent / "docs" / "python-api.md").read_text(encoding="utf-8")
    [snippet] = [b for b in re.findall(r"```python\n(.*?)```", page, flags=re.S) if "generate_text(" in b]
    capsys.readouterr()
    exec("import qconvert\n" + snippet.replace('"out/llama-nf4"', repr(str(q))), {})
    completion = capsys.readouterr().out
    cli = run_cli_here("generate", q, "--prompt", "Hello", "--max-new-tokens", 32)
    assert completion == cli.stdout and len(completion.split()) == 32


@pytest.fixture
def hub_client(monkeypatch, tmp_path):
    """huggingface_hub pointed at a loopback Hub that speaks LFS only, as README's "Against a local or
    private Hub server" sets it up, less HF_HUB_DISABLE_XET (its constants are read at import: set here)."""
    from huggingface_hub import constants

    from hub_server import LoopbackHub

    with LoopbackHub({"tok": "you"}) as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
        monkeypatch.setenv("HF_TOKEN", "tok")
        monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        yield hub, constants


def test_push_offline_says_so_rather_than_that_a_rerun_resumes(hub_client, tiny_models, monkeypatch):
    """HF_HUB_OFFLINE=1 (README: "if your shell sets it: push needs the network") gave "network failure
    during the upload (OfflineModeIsEnabled)" and the hint that re-running resumes, which it never does."""
    hub, constants = hub_client
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    r = run_cli_here("push", tiny_models.llama_4bit(), "you/tiny-nf4", ok=False)
    block = one_line_error(r, "you/tiny-nf4: offline mode is on (HF_HUB_OFFLINE=1), and push needs the network")
    assert block.splitlines()[-1] == "hint: unset HF_HUB_OFFLINE (or set it to 0), then re-run"
    assert hub.state.repos == {}


def test_push_through_xet_to_a_server_without_it_names_hf_hub_disable_xet(hub_client, tiny_models):
    """With hf_xet installed, every upload to an LFS-only server fails; the hint said only that re-running
    resumes the upload, which README explains is untrue until HF_HUB_DISABLE_XET=1."""
    import importlib.util

    hub, constants = hub_client
    if importlib.util.find_spec("hf_xet") is None:
        pytest.skip("hf_xet is not installed: uploads go through LFS")
    r = run_cli_here("push", tiny_models.llama_4bit(), "you/tiny-nf4", ok=False)
    block = one_line_error(r, "you/tiny-nf4: network failure during the upload")
    assert block.splitlines()[-1].endswith(f"a server without xet storage at {hub.endpoint} needs HF_HUB_DISABLE_XET=1 first"), block
    constants.HF_HUB_DISABLE_XET = True  # as README says: then the same command goes through
    run_cli_here("push", tiny_models.llama_4bit(), "you/tiny-nf4")
    assert "model.safetensors" in hub.state.repos["you/tiny-nf4"]["branches"]["main"]


def test_a_push_to_hub_repo_id_without_namespace_is_refused_before_the_work(tiny_models, tmp_path):
    """`--push-to-hub qwen-nf4` (no namespace) was refused by push only after quantize or merge had run
    to the end: hours on a large model, for a typo the command line already showed."""
    from helpers import write_lora_adapter

    src, q = tiny_models.llama(), tiny_models.llama_4bit()
    adapter = write_lora_adapter(q, tmp_path / "adapter")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    runs = {"quantize": ["quantize", src, tmp_path / "out"], "merge": ["merge", q, adapter, tmp_path / "out"],
            "train": ["train", q, "--data", data, "--output", tmp_path / "out", "--base-model", "acme/base"]}
    for name, args in runs.items():
        r = run_cli_here(*args, "--push-to-hub", "qwen-nf4", ok=False)
        block = one_line_error(r, "--push-to-hub 'qwen-nf4' is not a repo id of the form namespace/name")
        assert block.splitlines()[-1].startswith("hint: e.g. you/qwen-nf4"), (name, block)
        assert r.stdout == "" and not (tmp_path / "out").exists(), name


def test_skip_modules_pattern_that_skips_nothing_is_refused(tiny_models, tmp_path):
    """`--skip-modules down_prj` (a typo) matched nothing, and every down_proj was quantized without a word:
    the silent wrong result of a typo'd option value. A pattern that names a module is still taken, also
    one the model has without a checkpoint key (a tied lm_head)."""
    src = tiny_models.llama()
    r = run_cli_here("quantize", src, tmp_path / "out", "--skip-modules", "down_prj", ok=False)
    block = one_line_error(r, "--skip-modules 'down_prj' matches no module of this LlamaForCausalLM: it would skip nothing")
    assert block.splitlines()[-1].endswith("down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj") and not (tmp_path / "out").exists()
    one_line_error(run_cli_here("quantize", src, tmp_path / "out", "--skip-modules", "mlp", ok=False), "'mlp' matches no module")
    for pattern, quantized in (("down_proj", 12), ("model.layers.0", 7), ("lm_head", 14)):
        r = run_cli_here("quantize", src, tmp_path / "out", "--skip-modules", pattern, "--dry-run", "--json")
        assert json.loads(r.stdout)["quantized"] == quantized, pattern
    r = run_cli_here("quantize", tiny_models.llama(tie=True), tmp_path / "out", "--skip-modules", "lm_head", "--dry-run", "--json")
    assert json.loads(r.stdout)["quantized"] == 14
    # the same on the transformers (meta-model) path, which plans the architectures the table does not know
    from qconvert.convert.options import QuantizeOptions
    from qconvert.convert.plan import make_plan
    from qconvert.errors import OptionError
    from qconvert.io.checkpoint import Checkpoint

    with pytest.raises(OptionError, match="'down_prj' matches no module"):
        make_plan(Checkpoint(src), QuantizeOptions(skip_modules=["down_prj"]), use_transformers=True)
    tied = Checkpoint(tiny_models.llama(tie=True))
    assert sum(i.quantize for i in make_plan(tied, QuantizeOptions(skip_modules=["lm_head"]), use_transformers=True).items) == 14


def test_merge_into_the_16bit_model_train_started_from_says_how_to_get_its_4bit_base(tiny_models, tmp_path):
    """`qconvert train MODEL16` quantizes MODEL16 on the way in, into a temporary folder; `qconvert merge
    MODEL16 RUN OUT` then said only "BASE must be the 4-bit checkpoint the adapter was trained on", which
    the user never saw. The hint's command makes that checkpoint, and the merge then passes its check."""
    from helpers import write_lora_adapter

    src = tiny_models.llama()
    adapter = write_lora_adapter(tiny_models.llama_4bit(), tmp_path / "adapter")
    r = run_cli_here("merge", src, adapter, tmp_path / "merged", ok=False)
    hint = one_line_error(r, "not a 4-bit checkpoint").splitlines()[-1]
    assert f"run `qconvert quantize {src} DIR`" in hint and "merge into DIR" in hint
    run_cli_here("quantize", src, tmp_path / "DIR")
    assert "check PASS" in run_cli_here("merge", tmp_path / "DIR", adapter, tmp_path / "merged").stdout


@pytest.mark.parametrize("name, content, hint", [
    ("header-only.csv", "text\n", "then one record per line"),
    ("empty.csv", "", "then one record per line"),
    ("blank.txt", "\n\n", "one text per line"),
])
def test_a_data_file_without_records_says_so(name, content, hint, tiny_models, tmp_path):
    """A CSV with its header line only, or an empty CSV or text file: eval and train said "cannot read the
    data (split 'train', config None)" with datasets' message as the hint ("Instruction "train" corresponds
    to no data!"), or a hint about JSON lines for a .txt file."""
    from runtime_helpers import make_word_tokenizer

    q = tiny_models.copy(tiny_models.llama_4bit(), tmp_path / "q")
    make_word_tokenizer(q)
    data = tmp_path / name
    data.write_text(content)
    r = run_cli_here("eval", q, "--data", data, ok=False)
    block = one_line_error(r, f"{name}: holds no records")
    assert block.splitlines()[-1].startswith("hint: add records") and block.splitlines()[-1].endswith(hint), block


def test_target_modules_lm_head_is_refused_as_the_head_not_as_a_missing_layer(tiny_models, tmp_path):
    """`--target-modules lm_head` said "no linear layer of this model has that name": the model has one,
    which train leaves out on purpose; a newcomer reading that would look for a typo."""
    from runtime_helpers import make_word_tokenizer

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello"}) + "\n")
    q = tiny_models.copy(tiny_models.llama_4bit(), tmp_path / "q")
    make_word_tokenizer(q)
    r = run_cli_here("train", q, "--data", data, "--output", tmp_path / "run", "--target-modules", "lm_head", ok=False)
    block = one_line_error(r, "--target-modules 'lm_head': is the output head, which train does not adapt")
    assert block.splitlines()[-1] == "hint: available: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"
    r = run_cli_here("train", q, "--data", data, "--output", tmp_path / "run", "--target-modules", "qproj", ok=False)
    one_line_error(r, "--target-modules 'qproj': no linear layer of this model has that name")


def test_train_help_says_resume_takes_an_optional_path_and_what_no_gradient_checkpointing_does():
    """`train --help` showed `--resume TEXT`, as if a value were required; `--resume` alone resumes the
    latest checkpoint (docs/train.md), and a newcomer would not guess it."""
    text = run_cli_here("train", "--help").stdout
    assert "--resume [PATH]" in text and "--resume TEXT" not in text
    assert "(--resume alone)" in " ".join(text.split())
    # and --no-gradient-checkpointing said "Recompute activations ... the flag turns it off": what the flag does, first
    assert "--no-gradient-checkpointing Turn off gradient checkpointing (on by default" in " ".join(text.split())
