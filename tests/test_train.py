"""`qconvert train`: a tiny model learns, resume is exact, data-parallel matches one process, every
data format masks the right tokens, and bad input is refused with nothing finished-looking left."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import QCONVERT, make_tiny_llama
from tolerances import LOSS_ACROSS_RUNS_REL

WORDS = [f"w{i}" for i in range(120)]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


def make_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", "user", "assistant", "system", ":"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    t.chat_template = CHAT_TEMPLATE
    t.save_pretrained(folder)


@pytest.fixture(scope="module")
def qmodel(tmp_path_factory):
    from qconvert.convert.quantize import quantize_checkpoint

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("train")
    src = make_tiny_llama(d / "src", hidden=64, intermediate=128, vocab=128, dtype=torch.float32)
    # A random init (std 0.02) behind RMSNorm caps every logit near 1.3, so no adapter could push the
    # loss far below log(vocab); a trained model's head is much larger. Scale the frozen head like one.
    sd = load_file(str(src / "model.safetensors"))
    sd["lm_head.weight"] = sd["lm_head.weight"] * 25
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    make_tokenizer(src)
    quantize_checkpoint(str(src), d / "q", compute_dtype="float32")
    return d / "q"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def memorize_set(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(WORDS[i] for i in torch.randint(0, 120, (12,), generator=g).tolist())} for _ in range(8)]
    return write_jsonl(tmp_path / "mem.jsonl", rows)


def train(model, data, out, *extra, env=None, ok=True):
    args = [*QCONVERT, "train", str(model), "--data", str(data), "--output", str(out), "--backend", "reference", *map(str, extra)]
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_model_learns_and_adapter_loads_in_peft_on_bitsandbytes(qmodel, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import qconvert

    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    r = train(qmodel, data, out, "--max-steps", 40, "--batch-size", 4, "--grad-accum", 2, "--lr", "1e-2", "--lora-r", 16, "--lora-alpha", 32,
              "--lora-dropout", 0.0, "--max-grad-norm", 1.0)
    assert "paged_adamw_32bit needs a CUDA device; using torch AdamW" in r.stderr
    rows = [m for m in metrics(out) if "loss" in m]
    assert len(rows) == 40 and rows[-1]["loss"] < 0.5 * rows[0]["loss"], (rows[0], rows[-1])
    assert all(m["tokens_per_s"] > 0 and m["lr"] > 0 for m in rows)
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["r"] == 16 and acfg["base_model_name_or_path"] == str(qmodel)
    card = (out / "README.md").read_text()
    assert 'base_model_relation: "adapter"' in card and 'library_name: "peft"' in card
    # the adapter, on the same checkpoint loaded by plain transformers + bitsandbytes, lowers the loss
    from qconvert.training.data import build_examples, collate, load_records
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qmodel)
    batch = collate(build_examples(load_records(data), tok), tok.pad_token_id)
    base = AutoModelForCausalLM.from_pretrained(qmodel)
    base.train()  # bitsandbytes' torch path (its CPU inference path computes in bf16)
    with torch.no_grad():
        before = base(**batch).loss.item()
        peft = PeftModel.from_pretrained(base, out)
        peft.train()
        after_bnb = peft(**batch).loss.item()
        ours = qconvert.load_model(qmodel, backend="reference", device="cpu", adapter=out)
        after_ours = ours(**batch).loss.item()
    assert after_bnb < 0.5 * before
    assert abs(after_bnb - after_ours) < LOSS_ACROSS_RUNS_REL * max(1.0, after_bnb)


@pytest.mark.slow
def test_interrupted_and_resumed_run_ends_with_the_same_adapter(qmodel, tmp_path):
    from safetensors.torch import load_file

    data = memorize_set(tmp_path)
    common = ["--max-steps", 6, "--batch-size", 2, "--grad-accum", 2, "--lora-r", 4, "--lora-dropout", 0.1, "--lr", "1e-3",
              "--lr-scheduler", "cosine", "--warmup-ratio", 0.2, "--seed", 3]
    train(qmodel, data, tmp_path / "straight", *common)
    train(qmodel, data, tmp_path / "split", *common, "--stop-after", 3)
    assert (tmp_path / "split" / "checkpoint-3" / "trainer_state.safetensors").exists()
    assert not (tmp_path / "split" / "adapter_config.json").exists()  # nothing that looks finished
    train(qmodel, data, tmp_path / "split", *common, "--resume")
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sm, pm = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert [m["loss"] for m in sm] == [m["loss"] for m in pm]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_process(qmodel, tmp_path):
    data = memorize_set(tmp_path)
    common = ["--max-steps", 4, "--grad-accum", 1, "--lora-r", 4, "--lora-dropout", 0.0, "--lr", "1e-3", "--optim", "adamw"]
    train(qmodel, data, tmp_path / "one", *common, "--batch-size", 4)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # torchrun as a module of this interpreter (the bin/torchrun script's shebang may name another venv)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", f"--master-port={free_port()}", "-m", "qconvert", "train", str(qmodel),
                        "--data", str(data), "--output", str(tmp_path / "two"), "--backend", "reference", *map(str, common), "--batch-size", "2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) < LOSS_ACROSS_RUNS_REL * abs(a["loss"]), (a, b)


def test_every_format_masks_the_right_tokens(qmodel):
    from transformers import AutoTokenizer

    from qconvert.training.data import build_examples

    tok = AutoTokenizer.from_pretrained(qmodel)
    w = lambda *ids: " ".join(WORDS[i] for i in ids)  # noqa: E731
    eos = tok.eos_token_id
    recs = [
        (1, {"text": w(1, 2, 3)}),
        (2, {"prompt": w(4, 5), "completion": w(6, 7)}),
        (3, {"instruction": w(8), "input": w(9), "output": w(10)}),
        (4, {"messages": [{"role": "user", "content": w(11)}, {"role": "assistant", "content": w(12, 13)},
                          {"role": "user", "content": w(14)}, {"role": "assistant", "content": w(15)}]}),
    ]
    ex = build_examples(recs, tok)
    t = lambda *ids: tok.convert_tokens_to_ids([WORDS[i] for i in ids])  # noqa: E731
    assert ex[0].labels == ex[0].input_ids and ex[0].input_ids[-1] == eos
    assert ex[1].input_ids == t(4, 5) + t(6, 7) + [eos] and ex[1].labels == [-100, -100] + t(6, 7) + [eos]
    learned = [x for x in ex[2].labels if x != -100]
    assert learned == t(10) + [eos] and ex[2].input_ids[-2:] == t(10) + [eos]
    chat_learned = [x for x in ex[3].labels if x != -100]
    assert t(12, 13)[0] in chat_learned and t(15)[0] in chat_learned and t(11)[0] not in chat_learned and t(14)[0] not in chat_learned
    assert set(t(12, 13) + t(15)) <= set(chat_learned)
    on_inputs = build_examples(recs[1:2], tok, train_on_inputs=True)
    assert on_inputs[0].labels == on_inputs[0].input_ids


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "the file is empty"),
        ('{"text": "w1"}\n{"text": oops}\n', "mem.jsonl:2: not valid JSON"),
        ('{"text": "w1"}\n{"question": "w2"}\n', "mem.jsonl:2: record with keys ['question'] is of no known shape"),
        ('{"prompt": "' + " ".join(WORDS[:30]) + '", "completion": "w1"}\n', "--max-length 16 is shorter than the prompt"),
    ],
)
@pytest.mark.slow
def test_bad_data_refused(qmodel, tmp_path, content, message):
    data = tmp_path / "mem.jsonl"
    data.write_text(content)
    r = train(qmodel, data, tmp_path / "out", "--max-length", 16, "--strict-data", ok=False)
    first, *rest = r.stderr.splitlines()  # one error: its first line, then only detail and hint lines
    assert r.returncode == 1 and message in first and all(ln.startswith(("  ", "hint: ")) for ln in rest), r.stderr
    assert not (tmp_path / "out" / "adapter_config.json").exists()


@pytest.mark.slow
@pytest.mark.slow
def test_a_16bit_model_is_quantized_on_the_way_in(tmp_path):
    """A 16-bit MODEL was refused ("not a 4-bit checkpoint"); it is now quantized as `qconvert quantize`
    writes it, said in one line, and the run writes its adapter (tests/test_train_16bit.py holds the
    adapter bit-identical to quantize-then-train)."""
    src = make_tiny_llama(tmp_path / "plain")
    make_tokenizer(src)
    r = train(src, memorize_set(tmp_path), tmp_path / "out", "--max-steps", "1")
    assert "is 16-bit; quantizing it to 4-bit NF4 on the way in" in r.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(qmodel, tmp_path):
    import signal
    import time

    data = memorize_set(tmp_path)
    out = tmp_path / "run"
    args = [*QCONVERT, "train", str(qmodel), "--data", str(data), "--output", str(out), "--backend", "reference", "--max-steps", "400",
            "--batch-size", "1", "--grad-accum", "1", "--lora-r", "4", "--eval-split", "0.25"]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    ckpts = sorted(out.glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "adapter_model.safetensors").exists() and "resume with --resume" in err
    assert not (out / "adapter_config.json").exists()
    done = int(ckpts[0].name.split("-")[1])
    r = subprocess.run([*args[:-8], "--max-steps", str(done + 2), "--batch-size", "1", "--grad-accum", "1", "--lora-r", "4",
                        "--eval-split", "0.25", "--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = metrics(out)
    assert [m["step"] for m in rows if "loss" in m][-2:] == [done + 1, done + 2]
    assert any("eval_loss" in m for m in rows) and (out / "adapter_config.json").exists()


def test_packing_keeps_labels_with_their_tokens():
    from qconvert.training.data import Example, pack

    ex = [Example([1, 2, 3], [-100, 2, 3]), Example([4, 5, 6, 7, 8], [-100, -100, 6, 7, 8]), Example([9], [9])]
    packed = pack(ex, 4)
    assert [p.input_ids for p in packed] == [[1, 2, 3, 4], [5, 6, 7, 8], [9]]
    assert [p.labels for p in packed] == [[-100, 2, 3, -100], [-100, 6, 7, 8], [9]]


@pytest.mark.slow
def test_two_runs_with_one_seed_write_the_same_adapter_bytes_plain_and_fsdp(qmodel, tmp_path):
    """PEFT keeps target_modules as a set, whose order follows the process's string hashing: the
    adapter_config.json written (final and checkpoints, with and without --fsdp) lists them sorted."""
    from peft import PeftModel
    from safetensors.torch import load_file

    import qconvert

    data = memorize_set(tmp_path)
    common = ["--max-steps", 2, "--save-steps", 1, "--batch-size", 2, "--grad-accum", 1, "--lora-r", 2, "--optim", "adamw", "--seed", 7]
    files = ["adapter_config.json", "adapter_model.safetensors", "checkpoint-1/adapter_config.json",
             "checkpoint-1/adapter_model.safetensors"]
    for mode in ([], ["--fsdp"]):
        runs = []
        for hash_seed in ("1", "2"):  # two processes that order a set of strings differently
            out = tmp_path / f"run{''.join(mode)}{hash_seed}"
            train(qmodel, data, out, *common, *mode, env=dict(os.environ, PYTHONHASHSEED=hash_seed))
            runs.append(out)
        for f in files:
            assert (runs[0] / f).read_bytes() == (runs[1] / f).read_bytes(), (mode, f)
        cfg = json.loads((runs[0] / "adapter_config.json").read_text())
        want = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # every linear layer but the head
        assert cfg["target_modules"] == sorted(want), cfg["target_modules"]
    # PEFT reads the list as it reads its own set, and loads the weights onto the 4-bit base
    peft = PeftModel.from_pretrained(qconvert.load_model(qmodel, backend="reference", device="cpu"), runs[0])
    assert peft.peft_config["default"].target_modules == set(cfg["target_modules"])
    saved = load_file(str(runs[0] / "adapter_model.safetensors"))
    state = {k.replace(".default", ""): v for k, v in peft.state_dict().items() if "lora_" in k}
    assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved)
