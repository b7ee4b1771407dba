"""Config files written for other tools run unchanged (issue 24 item 3): a FinLoRA file of named
runs, a TRL QLoRA YAML and an axolotl QLoRA YAML, each as those projects' docs write them, pointed at
the tiny model and data of the train tests. Keys that change nothing here are named in one line;
every unknown key is refused in one message before anything loads."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from helpers import QCONVERT
from test_hostile_train import one_line_error
from test_train import WORDS, metrics, qmodel, write_jsonl  # noqa: F401  (qmodel is a fixture)

LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]  # the tiny llama's, the default targets


def run(*args, cwd=None):
    return subprocess.run([*QCONVERT, "train", *map(str, args), "--backend", "reference"], capture_output=True, text=True, cwd=cwd)


def adapter_config(out):
    return json.loads((out / "adapter_config.json").read_text())


@pytest.mark.slow
def test_finlora_named_runs_file_picks_one_by_name(qmodel, tmp_path):
    data = write_jsonl(tmp_path / "sentiment_train.jsonl", [{"prompt": WORDS[i], "completion": WORDS[i + 1]} for i in range(4)])
    entry = {"base_model": str(qmodel), "dataset_path": str(data), "lora_r": 4, "quant_bits": 4, "learning_rate": 0.0001,
             "num_epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 2, "peft_use_dora": False}
    cfg = tmp_path / "finetune_configs.json"
    cfg.write_text(json.dumps({"sentiment_llama_3_1_8b_8bits_r8": dict(entry, lora_r=8, quant_bits=8),
                               "sentiment_llama_3_1_8b_4bits_r4": entry}, indent=2))
    r = run("--config", f"{cfg}:sentiment_llama_3_1_8b_4bits_r4", "--output", tmp_path / "a")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "no effect here, accepted: quant_bits, peft_use_dora" in r.stderr
    saved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())
    assert (saved["lora_r"], saved["learning_rate"], saved["per_device_train_batch_size"], saved["gradient_accumulation_steps"]) == (4, 1e-4, 2, 2)
    assert saved["dataset_name"] == str(data) and saved["model_name_or_path"] == str(qmodel.resolve())
    assert adapter_config(tmp_path / "a")["r"] == 4 and [m["step"] for m in metrics(tmp_path / "a")] == [1]
    # the same run by --config-name; the 8-bit entry is refused by its key and value; no name: the names
    r = run("--config", cfg, "--config-name", "sentiment_llama_3_1_8b_4bits_r4", "--output", tmp_path / "b")
    assert r.returncode == 0, r.stderr[-3000:]
    assert [m["loss"] for m in metrics(tmp_path / "b")] == [m["loss"] for m in metrics(tmp_path / "a")]
    r = run("--config", f"{cfg}:sentiment_llama_3_1_8b_8bits_r8", "--output", tmp_path / "c")
    one_line_error(r, "quant_bits: 8 is not supported")
    r = run("--config", cfg, "--output", tmp_path / "c")
    one_line_error(r, "holds 2 named runs", "sentiment_llama_3_1_8b_4bits_r4")
    r = run("--config", f"{cfg}:nope", "--output", tmp_path / "c")
    one_line_error(r, "no run named 'nope'")
    assert not (tmp_path / "c").exists()


TRL_QLORA = """\
# TRL's sft.py QLoRA recipe (docs: "Train on a quantized model with PEFT"), adapted to a tiny model
model_name_or_path: {model}
torch_dtype: bfloat16
load_in_4bit: true
use_bnb_nested_quant: true
use_peft: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.05
lora_target_modules: all-linear
lora_task_type: CAUSAL_LM
dataset_name: {data}
max_seq_length: 64
packing: false
learning_rate: 2.0e-4
num_train_epochs: 1
per_device_train_batch_size: 2
per_device_eval_batch_size: 2
gradient_accumulation_steps: 2
gradient_checkpointing: true
optim: adamw_torch
lr_scheduler_type: cosine
warmup_ratio: 0.1
logging_steps: 1
eval_strategy: "no"
save_strategy: epoch
bf16: true
report_to: none
push_to_hub: false
output_dir: {out}
seed: 42
"""


@pytest.mark.slow
def test_trl_qlora_yaml_runs_unchanged(qmodel, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": WORDS[i]},
                                                               {"role": "assistant", "content": WORDS[i + 1]}]} for i in range(4)])
    cfg = tmp_path / "sft_qlora.yaml"
    cfg.write_text(TRL_QLORA.format(model=qmodel, data=data, out=tmp_path / "out"))
    r = run("--config", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    noted = [l for l in r.stderr.splitlines() if "no effect here" in l]
    assert len(noted) == 1 and noted[0].endswith("accepted: torch_dtype, load_in_4bit, use_bnb_nested_quant, use_peft, lora_task_type, "
                                                  "per_device_eval_batch_size, eval_strategy, save_strategy, bf16, report_to"), noted
    out = tmp_path / "out"
    assert sorted(adapter_config(out)["target_modules"]) == LINEAR and adapter_config(out)["r"] == 4
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["optim"], saved["max_length"], saved["lr_scheduler_type"]) == ("adamw", 64, "cosine")
    assert "optimizer adamw, lr 0.0002 cosine" in r.stderr and [m["step"] for m in metrics(out)] == [1]


AXOLOTL_QLORA = """\
# axolotl examples/llama-2/qlora.yml, adapted to a tiny model and a local alpaca file
base_model: {model}
model_type: LlamaForCausalLM
tokenizer_type: LlamaTokenizer
load_in_8bit: false
load_in_4bit: true
strict: false
datasets:
  - path: {data}
    type: alpaca
dataset_prepared_path:
val_set_size: 0
output_dir: {out}
adapter: qlora
lora_model_dir:
sequence_len: 64
sample_packing: false
pad_to_sequence_len: true
lora_r: 4
lora_alpha: 8
lora_dropout: 0.05
lora_target_modules:
lora_target_linear: true
lora_fan_in_fan_out:
wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:
gradient_accumulation_steps: 1
micro_batch_size: 4
num_epochs: 1
optimizer: adamw_torch
lr_scheduler: cosine
learning_rate: 0.0002
train_on_inputs: false
group_by_length: false
bf16: auto
fp16:
tf32: false
gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: false
warmup_ratio: 0.1
evals_per_epoch: 4
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
"""


@pytest.mark.slow
def test_axolotl_qlora_yaml_runs_unchanged(qmodel, tmp_path):
    from transformers import AutoTokenizer

    from qconvert.training.data import build_examples, load_records

    data = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": WORDS[i], "input": "", "output": WORDS[i + 1]} for i in range(4)])
    cfg = tmp_path / "qlora.yml"
    cfg.write_text(AXOLOTL_QLORA.format(model=qmodel, data=data, out=tmp_path / "out"))
    r = run("--config", cfg)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["data_format"], saved["dataset_name"], saved["optim"], saved["max_length"]) == ("alpaca", str(data), "adamw", 64)
    assert sorted(adapter_config(out)["target_modules"]) == LINEAR
    # the alpaca rendering: the start summary's token counts are those of the alpaca examples
    ex = build_examples(load_records(data), AutoTokenizer.from_pretrained(qmodel), "alpaca", 64)
    assert f"{sum(len(e.input_ids) for e in ex)} tokens" in r.stderr and [m["step"] for m in metrics(out)] == [1]


def test_every_unknown_key_in_one_message_before_anything_loads(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model_name_or_path: {tmp_path / 'no-model'}\noutput_dir: {tmp_path / 'o'}\n"
                   "use_peft: true\nlearning_rat: 1e-4\nwarmup_steps: 10\nquant_bits: 8\n"
                   "datasets:\n  - path: x.jsonl\n    type: oasst\n    shards: 2\nreport_to: none\n")
    r = subprocess.run([*QCONVERT, "train", "--config", str(cfg)], capture_output=True, text=True)
    block = one_line_error(r, "5 problems, keys learning_rat, warmup_steps, quant_bits, datasets[0].type, datasets[0].shards", "unknown key 'learning_rat' (did you mean 'learning_rate'?)", "unknown key 'warmup_steps'",
                           "quant_bits: 8 is not supported", "datasets[0].type: 'oasst' is not a format train reads",
                           "unknown key 'datasets[0].shards'", "hint: ")
    assert "use_peft" not in block and "report_to" not in block
    assert not (tmp_path / "o").exists()
