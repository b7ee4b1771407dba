"""Options that several commands share, each declared once here.

Each function returns a click decorator; ``help`` (and for a few, the default) may be given where
the option means something slightly different for one command (``push --revision`` names the branch
pushed to). Every command that has one of these options takes it from here.
"""

from __future__ import annotations

import click

from ..names import BACKEND_NAMES, FLOAT_DTYPE_NAMES

#: dtypes a model can be written in or compute in, as choices (``auto`` is added where a command can infer it)
DTYPE_NAMES = tuple(sorted(FLOAT_DTYPE_NAMES))
_DTYPE_AUTO_HELP = "Compute dtype (auto: a 4-bit checkpoint's bnb_4bit_compute_dtype, a 16-bit checkpoint's stored dtype)."


def revision(help: str = "Branch, tag or commit of a Hub repo."):
    return click.option("--revision", help=help)


def json_output(help: str = "Print one JSON object instead of text."):
    return click.option("--json", "as_json", is_flag=True, help=help)


def overwrite(help: str = "Replace OUTPUT_DIR if it exists (only once the new output is complete)."):
    return click.option("--overwrite", is_flag=True, help=help)


def backend(help: str = "Kernels for a 4-bit MODEL."):
    return click.option("--backend", type=click.Choice(BACKEND_NAMES), default="auto", show_default=True, help=help)


def push_to_hub(help: str = "Publish the result (see `qconvert push`)."):
    return click.option("--push-to-hub", "push_to", metavar="REPO_ID", help=help, callback=_push_target)


def _push_target(ctx, param, value: str | None) -> str | None:
    """REPO_ID checked before the command's work, not after it (qconvert.io.hub.check_push_target)."""
    if value is not None:
        from ..io.hub import check_push_target

        check_push_target(value)
    return value


def max_shard_size(help: str = "Output shard size, decimal units (5GB = 5e9 bytes)."):
    return click.option("--max-shard-size", default="2GB", show_default=True, help=help)


def dtype(*, auto: bool, default: str | None = None, help: str | None = None):
    """--dtype: with ``auto``, "auto" is a choice and the default (the model's own dtype)."""
    choices = (("auto",) if auto else ()) + DTYPE_NAMES
    return click.option("--dtype", type=click.Choice(choices), default=default or choices[0], show_default=True,
                        help=help or (_DTYPE_AUTO_HELP if auto else None))


def compute_dtype(help: str = "Recorded in quantization_config: the dtype layers compute in after dequantizing."):
    return click.option("--compute-dtype", type=click.Choice(DTYPE_NAMES), default="bfloat16", show_default=True, help=help)


def load_in_4bit():
    """--load-in-4bit and --keep-quantized DIR of generate and eval: a 16-bit MODEL quantized on the
    way in, as train does (convert/on_load.py); without them it runs unquantized."""
    def wrap(f):
        f = click.option("--keep-quantized", metavar="DIR",
                         help="With --load-in-4bit (implied): keep the 4-bit copy in DIR (reused by later runs).")(f)
        return click.option("--load-in-4bit", is_flag=True,
                            help="A 16-bit MODEL is quantized to 4-bit NF4 on the way in, as `qconvert quantize` writes it "
                                 "and train trains on it [default: a 16-bit MODEL runs unquantized].")(f)
    return wrap


#: train's data options that `eval` takes as well (its data goes through train's pipeline): the
#: TrainConfig fields, declared once in qconvert.training.settings (flags, default, choices, help)
TRAIN_DATA_OPTIONS = ("data_split", "data_config", "fmt", "max_length", "truncation", "train_on_inputs")


def train_data_options(extra_choices: dict[str, tuple[str, ...]] | None = None, **helps: str):
    """--data (required) and :data:`TRAIN_DATA_OPTIONS`, spelled, defaulted and checked as `train`
    declares them; ``helps`` rewords an option's help for a command that uses it otherwise (eval
    scores the tokens train learns from); ``extra_choices`` adds choices only that command has
    (eval's ``--format raw``)."""
    from dataclasses import replace

    from ..training.settings import RUN_OPTIONS, SPECS
    from .train import click_option

    def decorate(f):
        for name in reversed(TRAIN_DATA_OPTIONS):
            spec = replace(SPECS[name], help=helps.get(name, SPECS[name].help))
            if name in (extra_choices or {}):
                spec = replace(spec, choices=(*spec.choices, *extra_choices[name]))
            f = click_option(spec)(f)
        data = RUN_OPTIONS["data"]
        return click.option(*data.flags, data.name, type=str, default=None, required=True, help=helps.get("data", data.help))(f)

    return decorate
