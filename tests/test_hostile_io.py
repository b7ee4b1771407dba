"""Hostile and careless input on the I/O side that the other test_hostile_* files do not cover: the
open-file limit, and adapter patterns that would make Python's regular expressions backtrack for
ever. Each case checks the error's text (what, where, how to fix) or the correct result."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hostile_util import make_llama_files, make_lora, run_limited, tree_digest

#: Tensors of the 12-layer make_llama_files model: one shard each, more shards than the open-file
#: limit (64) that the children below run under.
MANY_LAYERS = 12


def one_tensor_per_shard(folder: Path) -> Path:
    """Split ``model.safetensors`` into one shard per tensor, with transformers' names and index."""
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(sd)
    weight_map = {}
    for i, k in enumerate(names):
        weight_map[k] = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        save_file({k: sd[k]}, str(folder / weight_map[k]), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    return one_tensor_per_shard(make_llama_files(tmp_path_factory.mktemp("many") / "src", layers=MANY_LAYERS))


#: Runs argv[3:] through the CLI with RLIMIT_NOFILE at 64, after taking all but ``FREE`` (argv[1];
#: -1: none taken) of the descriptors (a process that already holds files, or a limit set very low);
#: prints the exit code. argv[2], a JSON list, is a run made first with every descriptor available,
#: so that the modules a command imports as it runs are imported already: this is about the
#: checkpoint's files, not about Python's imports.
UNDER_FILE_LIMIT = """
import json, os, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
from qconvert.cli.main import main
warm = json.loads(sys.argv[2])
if warm:
    assert main(warm) == 0
free = int(sys.argv[1])
held = []
if free >= 0:
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    for _ in range(free):
        os.close(held.pop())
print("exit", main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_more_shards_than_the_open_file_limit(many_shards, tmp_path):
    """111 shards under a limit of 64 open files: quantize, inspect, verify and merge read one shard
    at a time (safetensors keeps a mapping, not a descriptor), so all of them succeed."""
    src = many_shards
    assert len(list(src.glob("*.safetensors"))) == 111
    before = tree_digest(src)
    q, m = tmp_path / "q", tmp_path / "m"
    lora = make_lora(tmp_path / "lora", src)
    for args in (["quantize", src, q, "--max-shard-size", "1KB"], ["inspect", src], ["inspect", q],
                 ["verify", q, "--against", src], ["merge", q, lora, m, "--max-shard-size", "1KB", "--dtype", "float32"]):
        r, _ = run_limited(UNDER_FILE_LIMIT, "-1", "[]", *args, timeout_s=120)
        assert r.stdout.rstrip().endswith("exit 0"), (args, r.stderr[-2000:])
    assert len(list(q.glob("*.safetensors"))) == 111 and len(list(m.glob("*.safetensors"))) > 64
    assert tree_digest(src) == before
    merged = {}
    for f in m.glob("*.safetensors"):
        merged.update(load_file(str(f)))
    source = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(merged) == set(source)  # every tensor of the base, merged or copied


@pytest.fixture(scope="module")
def many_quantized(many_shards, tmp_path_factory) -> Path:
    from qconvert.convert.quantize import quantize_checkpoint

    out = tmp_path_factory.mktemp("many-q") / "q"
    quantize_checkpoint(str(many_shards), out, max_shard_size="1KB")
    return out


def test_shards_held_open_at_once_are_bounded(many_shards, monkeypatch):
    """Each open safetensors handle holds a memory map, and a process may hold 65,530 of them
    (vm.max_map_count): a Checkpoint kept a handle on every shard it had opened, so a checkpoint of
    more shards than that failed as "out of memory". At most MAX_OPEN_SHARDS stay open now (4
    here, for 111 shards); every tensor still reads back exactly, and each header is checked once."""
    from qconvert.io import checkpoint
    from qconvert.format import conformance

    checked = []
    real_check = conformance.check_header
    monkeypatch.setattr(checkpoint, "MAX_OPEN_SHARDS", 4)
    monkeypatch.setattr(conformance, "check_header", lambda p: checked.append(Path(p).name) or real_check(p))

    def mapped() -> list[str]:  # the files of this checkpoint that this process has mapped
        return sorted({line.split()[-1] for line in open("/proc/self/maps") if str(many_shards) + "/" in line})

    ck = checkpoint.Checkpoint(many_shards)  # opens each shard once to check it against the index
    assert len(ck._handles) == 4 and mapped() == sorted(str(many_shards / f) for f in ck._handles), mapped()
    for f in sorted(many_shards.glob("*.safetensors"), reverse=True):
        for k, v in load_file(str(f)).items():
            assert ck.info(k) == (v.dtype, tuple(v.shape)) and torch.equal(ck.get(k), v)
    assert len(ck._handles) == 4 and mapped() == sorted(str(many_shards / f) for f in ck._handles), mapped()
    assert sorted(checked) == sorted(p.name for p in many_shards.glob("*.safetensors"))  # once each


@pytest.mark.slow
@pytest.mark.parametrize("command", ["quantize", "inspect", "verify"])
def test_running_out_of_file_descriptors_is_not_called_corruption(many_shards, many_quantized, tmp_path, command):
    """With one or two descriptors left, opening a shard fails; safetensors says "No such file" or
    a RuntimeError, which qconvert reported as a truncated or corrupt file ("re-download it"). It is
    reported as the open-file limit, with the fix, and no output appears."""
    src = many_shards if command == "quantize" else many_quantized
    args = [command, src, tmp_path / "out"] if command == "quantize" else [command, src]
    warm = json.dumps([command, str(src), str(tmp_path.parent / f"{tmp_path.name}-warm"), "--overwrite"] if command == "quantize" else [command, str(src)])
    refused = named_shard = 0
    for free in (0, 1, 2):  # a command that holds fewer descriptors at once may succeed at 1 or 2
        r, _ = run_limited(UNDER_FILE_LIMIT, str(free), warm, *args, timeout_s=60)
        if r.stdout.rstrip().endswith("exit 0"):
            continue
        refused += 1
        assert r.stdout.rstrip().endswith("exit 1"), r.stderr[-2000:]
        lines = r.stderr.splitlines()
        # the first file of the checkpoint that the command opens (its index or a shard), or quantize's output lock
        shard = rf"{re.escape(str(src))}/(model\.safetensors\.index\.json|model-000\d\d-of-00111\.safetensors)"
        on_shard = re.fullmatch(rf"qconvert: error: {shard}: too many open files while opening it \(this process may hold 64 open files\)",
                                lines[0])
        assert on_shard or lines[0] == f"qconvert: error: {tmp_path / '.out.qconvert-lock'}: Too many open files", lines
        named_shard += bool(on_shard)
        assert lines[-1] == ("hint: the file is not necessarily damaged: raise the open-file limit (ulimit -n) or close other "
                             "programs, then re-run")
        assert not (tmp_path / "out").exists()  # a resumable .out.qconvert-partial/ at most
    assert refused and named_shard



def test_out_of_file_descriptors_is_told_apart_from_other_errors():
    """The probe behind the message: an OSError by its errno; anything else (safetensors' errors
    carry none) by whether the process can open two more descriptors right now."""
    import errno

    from qconvert.io.checkpoint import out_of_file_descriptors

    assert out_of_file_descriptors(OSError(errno.EMFILE, "Too many open files"))
    assert out_of_file_descriptors(OSError(errno.ENFILE, "Too many open files in system"))
    assert not out_of_file_descriptors(OSError(errno.ENOENT, "No such file"))
    assert not out_of_file_descriptors(RuntimeError("unable to open file"))
    assert not out_of_file_descriptors(FileNotFoundError("No such file or directory: x"))  # no errno: probed


def test_cli_names_the_open_file_limit_for_an_emfile_oserror(tmp_path, capsys, monkeypatch):
    """An EMFILE OSError from anywhere (an import, an output file) gets the ulimit hint, not
    "check the path, its permissions and the free disk space"."""
    import errno

    import importlib

    cli_main = importlib.import_module("qconvert.cli.main")

    def boom(*a, **k):
        raise OSError(errno.EMFILE, "Too many open files", str(tmp_path / "x"))

    monkeypatch.setattr(cli_main, "_load_commands", boom)
    assert cli_main.main(["inspect", str(tmp_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [f"qconvert: error: {tmp_path / 'x'}: Too many open files",
                   "hint: the file is not necessarily damaged: raise the open-file limit (ulimit -n) or close other programs, then re-run"]


# ------------------------------------------------------------------ adapter regular expressions
#: Patterns that Python's re never finishes (or takes seconds) on a ~30-character module name: a
#: repeated group that can match the same text in many ways, or many wildcards in a row.
BACKTRACKING = ["(.*)*X", "(.|.)*X", ".*.*.*.*.*.*.*.*.*.*.*X", r"(\w+\.?)+X"]


@pytest.fixture(scope="module")
def tiny_q(tmp_path_factory) -> Path:
    from helpers import make_tiny_llama

    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("regex")
    quantize_checkpoint(str(make_tiny_llama(d / "src", hidden=64, intermediate=128, dtype=torch.float32)), d / "q")
    return d / "q"


def peft_adapter(q: Path, out: Path, **lora) -> Path:
    """A LoRA adapter made by PEFT itself on ``q``'s float32 twin, with nonzero B."""
    from helpers import float32_reference
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    m = get_peft_model(float32_reference(q), LoraConfig(lora_dropout=0.0, **lora))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.1)
    m.save_pretrained(out)
    return out


def edit_config(folder: Path, **kv) -> Path:
    p = folder / "adapter_config.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **kv}))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("pattern", BACKTRACKING)
@pytest.mark.parametrize("field", ["rank_pattern", "target_modules"])
def test_backtracking_adapter_pattern_is_refused_in_bounded_time(tiny_q, tmp_path, monkeypatch, field, pattern):
    """merge, export-adapter and push match rank/alpha patterns against the adapter's modules, and
    load_model lets PEFT match target_modules against every module of the model: a pattern that
    backtracks for ever is stopped at the deadline and named, and nothing is written."""
    import time

    from qconvert.model import adapters
    from qconvert.errors import FormatError
    from qconvert.export.merge import merge_adapter

    monkeypatch.setattr(adapters, "PATTERN_SECONDS", 1.0)  # the mechanism, without waiting 5 s per case
    a = peft_adapter(tiny_q, tmp_path / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    edit_config(a, **{field: {pattern: 2} if field == "rank_pattern" else pattern})
    what = "rank_pattern key" if field == "rank_pattern" else "target_modules"
    t0 = time.perf_counter()
    import qconvert

    with pytest.raises(FormatError) as e:
        if field == "rank_pattern":
            merge_adapter(str(tiny_q), str(a), tmp_path / "out")
        else:
            qconvert.load_model(tiny_q, backend="reference", device="cpu", adapter=a)
    assert time.perf_counter() - t0 < 15
    n = 4 if field == "rank_pattern" else None  # the adapter's modules (2 layers); load_model: the model's too
    first = str(e.value).splitlines()[0]
    assert re.fullmatch(rf"{re.escape(str(a / 'adapter_config.json'))}: {what} {re.escape(repr(pattern))} does not finish matching "
                        rf"the {n if n else '[0-9,]+'} module names within 1 s", first), first
    assert e.value.hint == 'name the modules in a list ("target_modules": ["q_proj", "v_proj"]) instead of a regular expression'
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.qconvert-partial").exists()
    if field == "target_modules":  # generate / eval --adapter check adapters on their own path
        from qconvert.run.inference import check_adapter

        model = qconvert.load_model(tiny_q, backend="reference", device="cpu")
        with pytest.raises(FormatError, match=r"target_modules .* does not finish matching the [0-9,]+ module names within 1 s"):
            check_adapter(a, model, "the model")


def test_adapter_pattern_length_and_type_are_checked(tmp_path):
    from qconvert.model.adapters import read_adapter_config
    from qconvert.errors import FormatError

    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8}
    for extra, message in (
        ({"target_modules": "q_proj|" * 200}, r"target_modules 'q_proj\|q_proj.*'\.\.\. is 1,400 characters, over the 1000 qconvert accepts"),
        ({"exclude_modules": 7}, r"exclude_modules must be a string or a list of strings, got int"),
        ({"modules_to_save": ["lm_head", ["x"]]}, r"modules_to_save must be a list of strings, got list"),
        ({"modules_to_save": "lm_head"}, r"modules_to_save must be a list of strings, got str"),  # PEFT would match each letter
        ({"layers_pattern": "layers("}, r"layers_pattern 'layers\(' is not a valid regular expression"),
        ({"alpha_pattern": {"(q|k)_proj)": 2}}, r"alpha_pattern key '\(q\|k\)_proj\)' is not a valid regular expression"),
    ):
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "adapter_config.json").write_text(json.dumps({**base, **extra}))
        with pytest.raises(FormatError, match=message):
            read_adapter_config(d)


@pytest.mark.slow
def test_regular_expression_patterns_keep_peft_semantics(tiny_q, tmp_path):
    """Patterns that finish are not refused, and qconvert reads them as PEFT does: a string
    target_modules with re.fullmatch, rank/alpha pattern keys as get_pattern_key (an alternation
    matches either name: qconvert's merge used to read 'q_proj|v_proj' as '(.*\\.)?q_proj' or the bare
    name 'v_proj', and gave v_proj the default rank). load_model attaches the adapter PEFT made, and
    merge's scaling of each module equals PEFT's."""
    import qconvert
    from qconvert.export.lora_merge import LoraAdapter

    a = peft_adapter(tiny_q, tmp_path / "a", r=4, lora_alpha=8, target_modules=r".*\.(q_proj|v_proj|down_proj)",
                     rank_pattern={"q_proj|v_proj": 2}, alpha_pattern={r"layers\.1\..*": 3, "down_proj": 5})
    cfg = json.loads((a / "adapter_config.json").read_text())
    assert cfg["target_modules"] == r".*\.(q_proj|v_proj|down_proj)"  # saved as the string
    model = qconvert.load_model(tiny_q, backend="reference", device="cpu", adapter=a)
    peft_scaling = {name.removeprefix("base_model.model."): mod.scaling["default"]
                    for name, mod in model.named_modules() if isinstance(getattr(mod, "scaling", None), dict) and "default" in mod.scaling}
    lora = LoraAdapter(a)
    assert sorted(lora.modules) == sorted(peft_scaling) and len(peft_scaling) == 6
    assert {k: lora.scaling(k) for k in peft_scaling} == peft_scaling
    assert peft_scaling["model.layers.0.self_attn.v_proj"] == 8 / 2 and peft_scaling["model.layers.1.self_attn.v_proj"] == 3 / 2
    assert peft_scaling["model.layers.0.mlp.down_proj"] == 5 / 4


# ------------------------------------------------------------------ checkpoint files
def test_tensor_that_the_index_does_not_list_is_refused(tmp_path):
    """A shard named by the index holds a tensor the index leaves out: it was never read, so neither
    quantize's accounting (every tensor quantized, copied or dropped for a reason) nor verify saw it.
    An index that lists one tensor of a whole model.safetensors hid the other eleven the same way.
    (A copy in a file the index does not name is still ignored: test_hostile_folder's decoy.)"""
    from qconvert.errors import FormatError
    from qconvert.io.checkpoint import Checkpoint

    src = make_llama_files(tmp_path / "src")
    sd = load_file(str(src / "model.safetensors"))
    sd["model.backdoor"] = torch.zeros(4)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    listed = {k: "model.safetensors" for k in sd if k != "model.backdoor"}
    index.write_text(json.dumps({"metadata": {}, "weight_map": listed}))
    with pytest.raises(FormatError) as e:
        Checkpoint(src)
    assert str(e.value) == (f"{src / 'model.safetensors'}: holds 1 tensor(s) that model.safetensors.index.json does not list, "
                            "e.g. 'model.backdoor'")
    assert "re-download the checkpoint" in e.value.hint
    index.write_text(json.dumps({"metadata": {}, "weight_map": {"model.norm.weight": "model.safetensors"}}))
    with pytest.raises(FormatError, match=r"holds 12 tensor\(s\) that model\.safetensors\.index\.json does not list, e\.g\. 'lm_head\.weight'"):
        Checkpoint(src)
    index.write_text(json.dumps({"metadata": {}, "weight_map": {**listed, "model.backdoor": "model.safetensors"}}))
    assert sorted(Checkpoint(src).keys()) == sorted(sd)


def test_safetensors_header_errors_say_how_to_fix(tmp_path):
    """The container errors qconvert raises itself (before safetensors) carry a hint line too."""
    import struct

    from qconvert.errors import FormatError
    from qconvert.io.checkpoint import Checkpoint

    for name, raw in (("short", b"\x01\x02"), ("len-2^63", struct.pack("<Q", 2**63) + b"{}      "),
                      ("not-json", struct.pack("<Q", 8) + b"{oops!  "), ("a-list", struct.pack("<Q", 8) + b"[1, 2]  "),
                      ("deep", struct.pack("<Q", 100_000) + b"[" * 100_000)):
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(raw)
        with pytest.raises(FormatError) as e:
            Checkpoint(p)
        assert str(e.value).startswith(f"{p}: ") and e.value.hint == "the file is truncated or corrupt, or not a safetensors file; re-download it"


@pytest.mark.slow
def test_non_finite_values_in_a_copied_tensor_are_copied_and_verify_says_so(tmp_path):
    """quantize refuses NaN or Inf in a weight it quantizes (test_convert_errors); a tensor it copies
    unquantized is copied byte for byte, NaN and Inf included, as transformers would load it
    (README). verify --against then called the copy not identical: torch.equal(NaN, NaN) is False."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.convert.verify import verify_checkpoint
    from qconvert.errors import QuantizationError

    src = make_llama_files(tmp_path / "src")
    sd = load_file(str(src / "model.safetensors"))
    sd["model.norm.weight"][:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    quantize_checkpoint(str(src), tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["model.norm.weight"].view(torch.int16).tolist() == sd["model.norm.weight"].view(torch.int16).tolist()
    assert verify_checkpoint(tmp_path / "out", against=str(src))["error"]["unquantized_identical"] is True
    sd["model.layers.0.mlp.up_proj.weight"][1, 2] = float("nan")
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(QuantizationError, match=r"model\.layers\.0\.mlp\.up_proj\.weight: holds NaN or Inf \(first at index \[1, 2\]\)"):
        quantize_checkpoint(str(src), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


#: Runs the CLI (argv[2:]) with files limited to argv[1] bytes, the limit a full disk sets in effect:
#: a write past it fails with EFBIG (SIGXFSZ ignored, as a shell's ``ulimit -f`` child would not).
UNDER_FILE_SIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from qconvert.cli.main import main
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
print("exit", main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("command", ["quantize", "merge"])
def test_a_full_disk_is_named_and_leaves_nothing_that_looks_complete(tmp_path, command):
    """A write that fails (disk full, quota, file-size limit) said only "qconvert: error: File too
    large" (the write's OSError carries no file name), and merge's clean-up raised a second error
    while closing the half-written shard, which hid the first. Now the first line names the file
    being written, the hint says what to free, OUT does not appear, and no half shard is left."""
    src = make_llama_files(tmp_path / "src", layers=2, hidden=256, intermediate=512, vocab=512)  # 3 MB of bf16
    if command == "quantize":
        args = ["quantize", src, tmp_path / "out"]
    else:
        from qconvert.convert.quantize import quantize_checkpoint

        quantize_checkpoint(str(src), tmp_path / "q")
        args = ["merge", tmp_path / "q", make_lora(tmp_path / "lora", src, hidden=256), tmp_path / "out"]
    before = tree_digest(src)
    r, _ = run_limited(UNDER_FILE_SIZE, "100000", *args, timeout_s=120)
    assert r.stdout.rstrip().endswith("exit 1"), r.stderr[-2000:]
    lines = r.stderr.splitlines()
    stage = tmp_path / ".out.qconvert-partial"
    shard = "model.safetensors.tmp" if command == "quantize" else "part-00001.safetensors.tmp"  # merge: its header planned, no spill file
    assert lines == [f"qconvert: error: {stage / shard}: File too large",
                     "hint: free space on that file system (or raise the file-size limit, ulimit -f), or write the output elsewhere, then re-run"]
    assert not (tmp_path / "out").exists()
    left = sorted(p.name for p in stage.iterdir()) if stage.exists() else []
    assert left in ([], ["journal.json"]), left  # quantize keeps its resume journal, never a half shard
    assert tree_digest(src) == before


def test_names_from_a_checkpoint_cannot_drive_the_terminal(tmp_path, capsys):
    """A tensor or file name holding a terminal escape sequence (here one that sets the window title)
    reached the terminal raw through inspect's table and quantize's notices; only error lines were
    escaped. Every line the CLI prints about a checkpoint now shows control characters as \\xNN."""
    from hostile_util import write_safetensors

    from qconvert.cli.main import main

    title = "\x1b]0;pwned\x07"
    p = write_safetensors(tmp_path / "esc.safetensors", {f"{title}w.weight": ("F32", [2], b"\x00" * 8)})
    assert main(["inspect", str(p)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert out.splitlines()[2].split()[0] == "\\x1b]0;pwned\\x07w.weight"
    src = make_llama_files(tmp_path / "src")
    (src / f"{title}notes.txt").write_text("x")
    assert main(["quantize", str(src), str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "\x1b" not in err and "not copied (not a tokenizer, template, config or licence file): \\x1b]0;pwned\\x07notes.txt" in err
    assert main(["inspect", str(tmp_path / "out"), "--json"]) == 0
    assert "\x1b" not in capsys.readouterr().out  # JSON escapes them itself


# ------------------------------------------------------------------ Hub sources
def _two_shards(folder: Path, hidden: dict | None = None) -> Path:
    """make_llama_files split in two shards with an index; ``hidden`` tensors go into the second
    shard without an index entry."""
    sd = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(sd)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for f, keys in parts.items():
        extra = hidden or {} if f.startswith("model-00002") else {}
        save_file({**{k: sd[k] for k in keys}, **extra}, str(folder / f), metadata={"format": "pt"})
    weight_map = {k: f for f, keys in parts.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def olah_hub(tmp_path_factory):
    import olah_server

    if not olah_server.available():
        pytest.skip("olah not installed (tools/setup_olah.sh)")
    d = tmp_path_factory.mktemp("olah")
    decoy = _two_shards(make_llama_files(d / "decoy"))
    # a consolidated copy under other names beside the indexed shards, as Mistral's repos ship one
    save_file({"tok_embeddings.weight": torch.zeros(32, 16, dtype=torch.bfloat16)}, str(decoy / "consolidated.safetensors"))
    hidden = _two_shards(make_llama_files(d / "hidden"), hidden={"model.backdoor": torch.zeros(4)})
    h = olah_server.OlahHub(d / "hub")
    h.add_repo("acme/decoy", decoy)
    h.add_repo("acme/hidden", hidden)
    h.local = {"acme/decoy": decoy, "acme/hidden": hidden}
    h.start()
    yield h
    h.stop()


def _hub_run(hub, home: Path, *args, offline: bool = False, code: str | None = None):
    import os
    import subprocess

    from helpers import QCONVERT

    env = dict(os.environ, HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_XET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", code, *args] if code else [*QCONVERT, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


@pytest.mark.slow
def test_hub_source_reads_what_its_index_lists_online_and_offline(olah_hub, tmp_path):
    """Offline, a Hub source was read from every top-level .safetensors file of the cached snapshot,
    not from its index: a repo that also ships consolidated.safetensors (Mistral's do) mixed both
    name sets and stopped with "has no place in the model". Online and offline now read what the
    index lists, and give the bytes a local quantize of the same folder gives."""
    home = tmp_path / "hf-home"
    r = _hub_run(olah_hub, home, "acme/decoy", code="import sys; from huggingface_hub import snapshot_download; snapshot_download(sys.argv[1])")
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(home.rglob("consolidated.safetensors"))  # the whole repo is in the cache
    outs = {}
    for mode in ("online", "offline"):
        r = _hub_run(olah_hub, home, "quantize", "acme/decoy", tmp_path / mode, offline=mode == "offline")
        assert r.returncode == 0, (mode, r.stderr[-2000:])
        outs[mode] = load_file(str(tmp_path / mode / "model.safetensors"))
    from qconvert.convert.quantize import quantize_checkpoint

    local = tmp_path / "local"
    quantize_checkpoint(str(olah_hub.local["acme/decoy"]), local)
    want = load_file(str(local / "model.safetensors"))
    for mode, got in outs.items():
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), mode


@pytest.mark.slow
def test_hub_source_with_a_tensor_its_index_hides_is_refused(olah_hub, tmp_path):
    """The Hub reader built its tensor list from the index and dropped whatever else a listed
    shard held, unsaid; like a local folder, it now refuses the checkpoint and names the tensor."""
    r = _hub_run(olah_hub, tmp_path / "hf-home", "quantize", "acme/hidden", tmp_path / "out")
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0] == ("qconvert: error: acme/hidden/model-00002-of-00002.safetensors: holds 1 tensor(s) that "
                        "model.safetensors.index.json does not list, e.g. 'model.backdoor'"), lines
    assert lines[-1].startswith("hint: the index and the shards disagree") and not (tmp_path / "out").exists()


def test_two_runs_writing_one_output_are_refused(tmp_path):
    """The same quantize started twice (or with other options) shared OUT's staging folder: one run
    deleted or renamed the other's shards, and the run that finished reported success over an
    output of mixed shards (seen here: a model.safetensors.tmp beside the index in OUT). A run now
    holds a lock on OUT from its check to its publish; a second one is refused at once and writes
    nothing, and the lock file goes with the run."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.errors import OutputExistsError
    from qconvert.export.merge import merge_adapter
    from qconvert.io.staging import output_lock

    src = make_llama_files(tmp_path / "src")
    out = tmp_path / "out"
    with output_lock(out):  # another run, between its check and its publish
        with pytest.raises(OutputExistsError) as e:
            quantize_checkpoint(str(src), out)
        assert str(e.value) == f"{out}: another qconvert run is writing it (the lock .out.qconvert-lock beside it is held)"
        assert e.value.hint == "wait for that run to finish, or write to another folder"
        assert sorted(p.name for p in tmp_path.iterdir()) == [".out.qconvert-lock", "src"]
    quantize_checkpoint(str(src), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    lora = make_lora(tmp_path / "lora", src)
    with output_lock(tmp_path / "m"), pytest.raises(OutputExistsError, match=r"m: another qconvert run is writing it"):
        merge_adapter(str(out), str(lora), tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora", "out", "src"]


@pytest.mark.slow
def test_verify_plot_does_not_replace_an_existing_file(tmp_path, capsys):
    """`verify --plot notes.png` replaced whatever file had that name. It is refused before the
    checkpoint is read, unless --overwrite."""
    from qconvert.cli.main import main
    from qconvert.convert.quantize import quantize_checkpoint

    src = make_llama_files(tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "q")
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"my own picture")
    assert main(["verify", str(tmp_path / "q"), "--against", str(src), "--plot", str(mine)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"qconvert: error: --plot {mine}: already exists",
                                                    "hint: pass --overwrite to replace it, or choose another file name"]
    assert mine.read_bytes() == b"my own picture"
    assert main(["verify", str(tmp_path / "q"), "--against", str(src), "--plot", str(mine), "--overwrite"]) == 0
    assert mine.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
