"""The `qconvert` command line: a thin click layer over the library.

Each command parses its options and calls one library function. Errors the library raises on
purpose (:class:`qconvert.errors.QConvertError`) become one line on stderr with a hint and exit
code 1; set QCONVERT_DEBUG=1 to see the full traceback instead. Heavy modules are imported inside
the commands so that ``qconvert --help`` starts fast.
"""

from __future__ import annotations

import json
import os
import sys

import click

from . import __version__
from .errors import QConvertError

DEBUG_ENV = "QCONVERT_DEBUG"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="qconvert")
def cli() -> None:
    """qconvert: QLoRA-style 4-bit (NF4) checkpoints: quantize, inspect, verify, load, train, merge, push."""


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
def inspect(path: str, as_json: bool) -> None:
    """Show every tensor of a checkpoint folder or .safetensors file: shape, dtype, quant type, block size,
    double quant, stored bytes; and bits per parameter over the quantized tensors."""
    from .inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(path)
    if as_json:
        click.echo(json.dumps(report, indent=1))
    else:
        click.echo(format_report(report))


def register(command: click.Command) -> click.Command:
    """Add a command defined in another module (keeps this file thin)."""
    cli.add_command(command)
    return command


def _load_commands() -> None:
    """Import the modules that define further commands; each calls ``register``."""
    import importlib

    for mod in ("qconvert.convert.cli", "qconvert.runtime_cli", "qconvert.train.cli", "qconvert.export.cli", "qconvert.hub.cli"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning qconvert's errors into one line on stderr."""
    import logging

    # bitsandbytes logs at import that an optional CPU kernel package is missing: noise for our users
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    _load_commands()
    try:
        cli.main(args=argv, prog_name="qconvert", standalone_mode=False)
    except QConvertError as e:
        if os.environ.get(DEBUG_ENV):
            raise
        msg = "qconvert: error: " + " ".join(str(e).split("\n"))
        if e.hint:
            msg += f" (hint: {e.hint})"
        click.echo(msg, err=True)
        return 1
    except click.exceptions.Abort:
        click.echo("qconvert: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("qconvert: interrupted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
