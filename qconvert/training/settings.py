"""Every option of `qconvert train`, declared once: :class:`TrainConfig`.

Each field holds one option's default, and in its metadata (a :class:`Spec`) its command-line
spellings, its config-file key and accepted aliases, its range and its help. From that one
declaration come:

- the click options of ``qconvert train`` (qconvert.cli.train generates them);
- the config-file keys (qconvert.training.config.KEYS) and how a file's values are converted
  (qconvert.training.config.coerce);
- the range checks (:data:`RANGES`, :func:`check_options`) and the choice checks
  (:func:`check_choices`), both behind :meth:`TrainConfig.check`;
- the keyword options of :func:`qconvert.training.loop.train`.

Reading a config file (keys, aliases, value conversion: :func:`qconvert.training.config.load_run`)
is qconvert.training.config's, which reads these declarations.

Adding an option is one field here (plus its use in the training loop). A Python caller may build
a TrainConfig, read one from a file (:func:`qconvert.training.config.load_config`), or pass the same
names as keywords to ``train()``. Options that name the run rather than configure it (MODEL, --data,
--output, --push-to-hub, --keep-quantized) are :class:`RunOptions` fields (:data:`RUN_OPTIONS`).
This module imports neither click nor torch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..names import BACKEND_NAMES as BACKENDS
from ..errors import OptionError
from .data import FORMATS, TRUNCATION

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw")
SCHEDULERS = ("constant", "cosine", "linear")
KINDS = ("int", "float", "str", "bool", "choice", "list", "resume")


@dataclass(frozen=True)
class Spec:
    """How one option is spelled and checked. ``kind``: int, float, str, bool (a flag), choice
    (one of ``choices``), list (repeatable / comma-separated names), resume (a flag or a PATH).
    ``range``: (lowest, lowest included, highest, highest included), None for no bound."""

    name: str
    flags: tuple[str, ...]
    key: str
    aliases: tuple[str, ...] = ()
    kind: str = "str"
    choices: tuple[str, ...] | None = None
    range: tuple | None = None
    help: str | None = None
    metavar: str | None = None
    hidden: bool = False
    default: Any = None

    @property
    def flag(self) -> str:
        """The spelling messages use."""
        return self.flags[0]


def _opt(default, *flags: str, key: str | None = None, aliases: tuple[str, ...] = (), kind: str | None = None,
         choices: tuple[str, ...] | None = None, range: tuple | None = None, help: str | None = None,
         metavar: str | None = None, hidden: bool = False):
    """A TrainConfig field: its default, and its Spec in the metadata (name and key filled in below)."""
    if kind is None:
        kind = "choice" if choices else "bool" if isinstance(default, bool) else "str" if default is None else type(default).__name__
    assert kind in KINDS, kind
    spec = dict(flags=flags, key=key, aliases=aliases, kind=kind, choices=choices, range=range, help=help, metavar=metavar,
                hidden=hidden, default=default)
    return field(default=default, metadata={"spec": spec})


def _at_least(lo):
    return (lo, True, None, None)


def _above(lo):
    return (lo, False, None, None)


@dataclass
class TrainConfig:
    """The options of one training run (everything but the model, the data and the output folder).

    ``save_steps`` None: a checkpoint at the end of each epoch, but no more often than every 50
    steps nor every tenth of the run; 0: only on interrupt. ``save_total_limit``: keep the newest N
    checkpoints (None or 0: all). ``eval_steps`` None: evaluate at each save and at the end; 0: only
    at the end. ``target_modules`` is kept as a list of names (a comma-separated string is split).
    """

    data_split: str | None = _opt(None, "--data-split", key="dataset_train_split", aliases=("data_split", "split"),
                                  help="Split of a Hub dataset or folder [default: train].")
    data_config: str | None = _opt(None, "--data-config", key="dataset_config", aliases=("data_config", "dataset_config_name"),
                                   help="Configuration (subset) of a Hub dataset or folder.")
    overwrite: bool = _opt(False, "--overwrite", key="overwrite_output_dir", aliases=("overwrite",),
                           help="Replace the previous run in --output (its checkpoints and metrics are removed first).")
    fmt: str = _opt("auto", "--format", key="data_format", aliases=("format",), choices=FORMATS)
    eval_data: str | None = _opt(None, "--eval-data", key="eval_dataset", aliases=("eval_data", "eval_file", "validation_file"),
                                 help="Evaluation records (same formats and sources); a Hub dataset or folder gives its "
                                      "validation split, else its test split, never its train split.")
    eval_data_split: str | None = _opt(None, "--eval-data-split", key="dataset_test_split", aliases=("eval_data_split",),
                                       help="Split of --eval-data to evaluate on; without --eval-data, a split of --data "
                                            "(which must not be the one trained on) [default: validation, else test].")
    eval_split: float = _opt(0.0, "--eval-split", aliases=("val_set_size",), range=(0, True, 1, False),
                             help="Fraction of --data held out for evaluation (if no --eval-data).")
    max_length: int = _opt(512, "--max-length", "--max-seq-length", aliases=("max_seq_length", "sequence_len"), range=_at_least(2))
    truncation: str = _opt("truncate", "--truncation", choices=TRUNCATION,
                           help="Records over --max-length: cut (the tail and its EOS are lost, counted) or left out (counted).")
    strict_data: bool = _opt(False, "--strict-data", help="Stop at the first bad record instead of leaving it out and counting it.")
    packing: bool = _opt(False, "--packing", aliases=("sample_packing",), help="Concatenate examples into --max-length pieces.")
    train_on_inputs: bool = _opt(False, "--train-on-inputs",
                                 help="Put the loss on prompts too, not only on completions / assistant turns.")
    lora_r: int = _opt(64, "--lora-r", "--r", aliases=("r",), range=_at_least(1))
    lora_alpha: float = _opt(16.0, "--lora-alpha", range=_above(0))  # 16.0, as the CLI's float flag always gave
    lora_dropout: float = _opt(0.05, "--lora-dropout", range=(0, True, 1, False))
    target_modules: list[str] | None = _opt(None, "--target-modules", aliases=("lora_target_modules",), kind="list",  # noqa: RUF009
                                            help="Module names for LoRA (repeatable or comma-separated; default: the linear layers LoRA can wrap but the output head; the start summary lists them).")
    lora_experts: bool = _opt(False, "--lora-experts",
                              help="Also put LoRA on the routed experts (MoE; PEFT's target_parameters, rank r per expert; 4-bit experts stay 4-bit). "
                                   "PEFT applies no dropout there: the run's LoRA dropout becomes 0.")
    optim: str = _opt("paged_adamw_32bit", "--optim", aliases=("optimizer",), choices=OPTIMIZERS)
    lr: float = _opt(2e-4, "--lr", "--learning-rate", key="learning_rate", aliases=("lr",), range=_above(0))
    lr_scheduler: str = _opt("constant", "--lr-scheduler", "--lr-scheduler-type", key="lr_scheduler_type", aliases=("lr_scheduler",),
                             choices=SCHEDULERS)
    warmup_ratio: float = _opt(0.03, "--warmup-ratio", range=(0, True, 1, True))
    max_grad_norm: float = _opt(0.3, "--max-grad-norm", range=_above(0))
    batch_size: int = _opt(1, "--batch-size", "--per-device-train-batch-size", key="per_device_train_batch_size",
                           aliases=("batch_size", "micro_batch_size"), range=_at_least(1), help="Per process.")
    grad_accum: int = _opt(16, "--grad-accum", "--gradient-accumulation-steps", key="gradient_accumulation_steps",
                           aliases=("grad_accum",), range=_at_least(1))
    epochs: float = _opt(1.0, "--epochs", "--num-train-epochs", key="num_train_epochs", aliases=("num_epochs", "epochs"), range=_above(0))
    max_steps: int | None = _opt(None, "--max-steps", kind="int", range=_at_least(1), help="Overrides --epochs.")
    gradient_checkpointing: bool = _opt(True, "--no-gradient-checkpointing",
                                        help="Turn off gradient checkpointing (on by default: activations recomputed in the backward pass, less memory, slower).")
    seed: int = _opt(42, "--seed")
    save_steps: int | None = _opt(None, "--save-steps", kind="int", range=_at_least(0),
                                  help="Checkpoint every N steps into OUTPUT/checkpoint-N; 0: only on Ctrl-C/SIGTERM "
                                       "[default: at each epoch's end, but at least 50 steps and a tenth of the run apart].")
    save_total_limit: int | None = _opt(2, "--save-total-limit", range=_at_least(0), help="Keep only the newest N checkpoints (0: all).")
    logging_steps: int = _opt(1, "--logging-steps", range=_at_least(1),
                              help="Metrics row (and, off a terminal, a log line) every N steps.")
    eval_steps: int | None = _opt(None, "--eval-steps", kind="int", range=_at_least(0),
                                  help="Evaluate every N steps (0: only at the end) [default: at each checkpoint and at the end].")
    resume: str | None = _opt(None, "--resume", key="resume_from_checkpoint", aliases=("resume",), kind="resume", metavar="[PATH]",
                              help="Resume from the latest checkpoint of --output (--resume alone), or from PATH.")
    fsdp: bool = _opt(False, "--fsdp",
                      help="Shard the 4-bit base, adapter, gradients and optimizer state across the torchrun processes (FSDP2).")
    fsdp_offload: bool = _opt(False, "--fsdp-offload", aliases=("fsdp_offload_params", "offload_params"),
                              help="With --fsdp: keep the shards in host memory, copying one block at a time to the device.")
    nproc_per_node: int | None = _opt(None, "--nproc-per-node", kind="int", range=_at_least(1),
                                      help="Start N training processes on this machine, as torchrun does (data-parallel, or "
                                           "--fsdp); Ctrl-C or SIGTERM stops them all once the checkpoint is saved.")
    backend: str = _opt("auto", "--backend", choices=BACKENDS)
    base_model_id: str | None = _opt(None, "--base-model", key="base_model_name_or_path", metavar="HUB_ID",
                                     help="The Hub id the adapter names as its base (adapter_config.json, card) when MODEL is "
                                          "a local folder [default: MODEL]; --push-to-hub needs one.")
    revision: str | None = _opt(None, "--revision", key="model_revision", aliases=("revision",),
                                help="Branch, tag or commit when MODEL is a Hub id.")
    stop_after: int | None = _opt(None, "--stop-after", kind="int", range=_at_least(1), hidden=True,
                                  help="Save a checkpoint and stop after N steps of this run (as Ctrl-C does).")

    def __post_init__(self) -> None:
        self.target_modules = split_modules(self.target_modules)

    def check(self) -> None:
        """Raise OptionError for the first value out of its range or not among its choices."""
        values = self.as_options()
        check_options(values)
        check_choices(values)
        if self.base_model_id is not None:
            from ..io.hub import looks_like_repo_id

            if not looks_like_repo_id(self.base_model_id):
                raise OptionError(f"--base-model {self.base_model_id!r} is not a Hub repo id (namespace/name)",
                                  hint="name the base model as others will load it from the Hub")
        if self.fsdp_offload and not self.fsdp:
            raise OptionError("--fsdp-offload without --fsdp", hint="add --fsdp (offload moves FSDP's shards to host memory)")

    def as_options(self) -> dict[str, Any]:
        """{option: value}, the keyword options of ``train()``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def of(cls, config: TrainConfig | None = None, options: dict[str, Any] | None = None) -> TrainConfig:
        """``config`` (or the defaults) with ``options`` (train() keywords) over it; an unknown name
        is a TypeError, as for any keyword argument."""
        options = options or {}
        unknown = sorted(set(options) - set(SPECS) - set(RUN_OPTIONS)) or sorted(set(options) & set(RUN_OPTIONS))
        if unknown:
            raise TypeError(f"train() got an unexpected keyword argument {unknown[0]!r}")
        if config is None:
            return cls(**options).with_given(options)
        if not isinstance(config, TrainConfig):
            raise TypeError(f"train(): config must be a TrainConfig, not {type(config).__name__}")
        return dataclasses.replace(config, **options).with_given(config.given() | set(options))

    def with_given(self, names) -> TrainConfig:
        """Record which options were given (flags, a config file, keywords), for --resume (train/resume.py)."""
        self.__dict__["_given"] = frozenset(names)
        return self

    def given(self) -> frozenset[str]:
        """The options this config was given, as :meth:`of` and :func:`load_run` record them; for a
        TrainConfig built directly, those whose value is not the default."""
        recorded = self.__dict__.get("_given")
        if recorded is not None:
            return recorded
        return frozenset(f.name for f in dataclasses.fields(self) if getattr(self, f.name) != f.default)


def _spec(f: dataclasses.Field) -> Spec:
    s = f.metadata["spec"]
    return Spec(name=f.name, **dict(s, key=s["key"] or f.name))


#: option -> Spec, for every TrainConfig field, in declaration order
SPECS: dict[str, Spec] = {f.name: _spec(f) for f in dataclasses.fields(TrainConfig)}


@dataclass(frozen=True)
class RunOptions:
    """What names a run rather than configures it: MODEL (an argument, or the config file's
    model_name_or_path), --data, --output, --push-to-hub and --keep-quantized; None where unset.
    They have flags and config keys as TrainConfig's fields do, but are train()'s arguments."""

    model: str | None = _opt(None, key="model_name_or_path", aliases=("model", "base_model"),
                             help="The base model (4-bit, or 16-bit: quantized on the way in).")
    data: str | None = _opt(None, "--data", key="dataset_name", aliases=("data", "dataset", "data_path", "dataset_path", "train_file"),
                            help="JSONL/JSON/parquet/CSV/TSV/arrow/txt file, dataset folder, or Hub dataset id (org/name).")
    output: str | None = _opt(None, "--output", "--output-dir", key="output_dir", aliases=("output",),
                              help="Folder for the adapter, checkpoints, metrics.jsonl, loss.png and config.yaml.")
    push_to: str | None = _opt(None, "--push-to-hub", key="hub_model_id", aliases=("push_to_hub",), metavar="REPO_ID",
                               help="Publish the adapter when training finishes (see `qconvert push`).")
    keep_quantized: str | None = _opt(None, "--keep-quantized", metavar="DIR",
                                      help="A 16-bit MODEL is quantized on the way in: keep that 4-bit copy in DIR (reused by later runs).")


#: option -> Spec, for every RunOptions field
RUN_OPTIONS: dict[str, Spec] = {f.name: _spec(f) for f in dataclasses.fields(RunOptions)}
#: per-invocation choices a run leaves out of OUTPUT/config.yaml
NOT_SAVED = ("resume", "overwrite", "push_to", "stop_after", "nproc_per_node")


def all_specs() -> dict[str, Spec]:
    """Run options first, then every TrainConfig field."""
    return {**RUN_OPTIONS, **SPECS}


def check_choices(values: dict[str, Any]) -> None:
    """OptionError for a value that is not one of its option's choices (None passes)."""
    for name, spec in SPECS.items():
        v = values.get(name)
        if spec.kind != "choice" or v is None or v in spec.choices:
            continue
        if name == "backend":  # the message and class qconvert.ops.choice.resolve gives for the same name
            raise OptionError(f"unknown backend {v!r}", hint=f"use one of {', '.join(BACKENDS)}")
        raise OptionError(f"unknown {spec.flag} {v!r}", hint=f"use one of {', '.join(spec.choices)}")


#: option -> (lowest, lowest included, highest, highest included), for the options that have a range
RANGES: dict[str, tuple] = {name: spec.range for name, spec in SPECS.items() if spec.range is not None}


def _range_text(lo, lo_in, hi, hi_in) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>=' if lo_in else '>'} {lo}")
    if hi is not None:
        parts.append(f"{'<=' if hi_in else '<'} {hi}")
    return " and ".join(parts)


def check_options(values: dict[str, Any], command: str = "train") -> None:
    """Raise OptionError for the first value out of its range (None means "not set" and passes);
    ``command``: the one whose --help the hint names (eval checks train's data options here too)."""
    for name, (lo, lo_in, hi, hi_in) in RANGES.items():
        v = values.get(name)
        if v is None:
            continue
        flag, integer, where = SPECS[name].flag, SPECS[name].kind == "int", _range_text(lo, lo_in, hi, hi_in)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
            what = "an integer" if integer else "a number"
            raise OptionError(f"{flag} {v!r}: expected {what}", hint=f"give {flag} {what} {where}")
        bad = not math.isfinite(v)
        bad |= lo is not None and (v < lo or (v == lo and not lo_in))
        bad |= hi is not None and (v > hi or (v == hi and not hi_in))
        if bad:
            raise OptionError(f"{flag} {v}: must be {where}", hint=f"give {flag} a value {where} (qconvert {command} --help lists every option)")


def split_modules(names) -> list[str] | None:
    """--target-modules as PEFT users write it: repeated, or comma/space separated (q_proj,v_proj);
    ``all-linear`` is the default (None)."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    out = [n for item in names for n in str(item).replace(",", " ").split() if n]
    if out == ["all-linear"]:  # PEFT's and TRL's name for the default: every linear layer but the head
        return None
    return out or None
