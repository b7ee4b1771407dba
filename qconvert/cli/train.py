"""CLI command `qconvert train`: its options are generated from qconvert.training.settings (one
declaration per option: flags, default, config key, range, help); an optional --config file lies
under the flags; then one call to :func:`qconvert.training.loop.train` with a TrainConfig."""

from __future__ import annotations

import os

import click

from ..training.settings import RUN_OPTIONS, SPECS, Spec


def click_option(spec: Spec):
    """The click option of one train option, as its Spec declares it. A flag's default is the
    TrainConfig default; a value not given on the command line is left to --config and the
    defaults (see :func:`qconvert.training.config.load_run`)."""
    kw = dict(help=spec.help, hidden=spec.hidden, metavar=spec.metavar)
    if spec.kind == "bool":
        # a flag that is on by default is spelled --no-NAME and turns it off
        kw.update(is_flag=True, flag_value=not spec.default, default=spec.default)
    elif spec.kind == "resume":
        kw.update(is_flag=False, flag_value="latest", default=None)
    elif spec.kind == "list":
        kw.update(multiple=True)
    else:
        kw.update(type=click.Choice(spec.choices) if spec.kind == "choice" else {"int": int, "float": float, "str": str}[spec.kind],
                  default=spec.default, show_default=spec.default is not None)
    return click.option(*spec.flags, spec.name, **kw)


def train_options(f):
    """Every flag of `qconvert train`: --data and --output, each TrainConfig field, --push-to-hub."""
    specs = [RUN_OPTIONS["data"], RUN_OPTIONS["output"], *SPECS.values(), RUN_OPTIONS["push_to"], RUN_OPTIONS["keep_quantized"]]
    for spec in reversed(specs):
        f = click_option(spec)(f)
    return f


@click.command(short_help="QLoRA: train a LoRA adapter on the frozen 4-bit model.")
@click.argument("model", required=False)
@click.option("--config", "config_file", metavar="FILE", help="YAML or JSON file of options, keyed as transformers/PEFT name them; flags override it.")
@click.option("--config-name", metavar="NAME", help="The run NAME of a --config file of named runs (FinLoRA's); or --config FILE:NAME.")
@train_options
@click.pass_context
def train(ctx, model, config_file, config_name, **flags):
    """QLoRA: train a LoRA adapter on the frozen 4-bit MODEL (folder or Hub id; a 16-bit one is quantized
    on the way in). Ctrl-C or SIGTERM saves a checkpoint; --resume continues it.

    Several processes: qconvert train --nproc-per-node N ..., or torchrun --nproc-per-node N qconvert train ...
    (NCCL on GPU, gloo on CPU); data-parallel by default, --fsdp shards the 4-bit base, adapter and
    optimizer state (FSDP2). Stopped by Ctrl-C or SIGTERM, every process saves its part of the
    checkpoint; --nproc-per-node then exits 130 or 143 as one process does (torchrun exits 1 with its
    own traceback, and kills processes still saving after 30 s)."""
    from ..training.config import load_run

    if config_name and not config_file:
        raise click.UsageError("--config-name without --config", ctx=ctx)
    run_options, config = load_run(config_file, given_options(ctx, model, flags), name=config_name, log=lambda m: click.echo(m, err=True))
    for value, how in ((run_options.model, "MODEL"), (run_options.data, "--data"), (run_options.output, "--output")):
        if not value:  # a usage error (exit 2), as click's own missing argument is
            raise click.UsageError(f"missing {how}: give it on the command line or in the --config file", ctx=ctx)
    if run_options.push_to:
        check_push_base(run_options.model, config.base_model_id, run_options.push_to)
    if (config.nproc_per_node or 1) > 1 and "WORLD_SIZE" not in os.environ:  # the launcher; its processes are the workers
        from ..training.launch import launch

        config.check()  # a bad value is one line here, not one per process
        raise SystemExit(launch(config.nproc_per_node, worker_args(ctx)))
    from ..training.loop import train as run

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # one process: torch's threads from the CPUs it has
        from .._cpus import cap_torch_threads

        cap_torch_threads()
    output = run_options.output
    r = run(run_options.model, run_options.data, output, config, log=lambda m: click.echo(m, err=True), config_file=config_file,
            keep_quantized=run_options.keep_quantized)
    if r.get("interrupted"):
        raise SystemExit(128 + r["signal"] if r.get("signal") else 0)
    push_to = run_options.push_to
    if push_to and int(os.environ.get("RANK", "0")) == 0:
        from ..hub.push import push_folder

        from ..errors import printable

        p = push_folder(output, push_to, log=lambda m: click.echo(printable(m), err=True))
        click.echo(printable(f"pushed adapter to {push_to}: {p['commit_url']}"))


def check_push_base(model: str, base_model: str | None, push_to: str) -> None:
    """Before training: an adapter pushed for others must name its base by a Hub id, which a local
    MODEL folder does not give (push would refuse it after the whole run)."""
    from ..errors import OptionError
    from ..io.hub import check_push_target, looks_like_repo_id

    check_push_target(push_to)
    if base_model is None and not looks_like_repo_id(str(model)):
        raise OptionError(f"--push-to-hub {push_to}: MODEL {model} is a local folder, and the pushed adapter must name its base by Hub id",
                          hint="name the base model's Hub id with --base-model NAMESPACE/NAME")


def worker_args(ctx: click.Context) -> list[str]:
    """The command line each process of --nproc-per-node runs: this one (they see WORLD_SIZE and train)."""
    import sys

    root = ctx.find_root()
    return list((root.obj or {}).get("argv") or sys.argv[1:])


def given_options(ctx: click.Context, model: str | None, flags: dict) -> dict:
    """The options given on the command line (a flag left at its default is not one: --config or
    the TrainConfig default decides it)."""
    from click.core import ParameterSource

    given = {name: value for name, value in flags.items() if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
    if model is not None:
        given["model"] = model
    return given


COMMANDS = [train]
