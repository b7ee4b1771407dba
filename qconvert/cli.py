"""The `qconvert` command line: a thin click layer over the library.

Each command parses its options and calls one library function. Errors the library raises on
purpose (:class:`qconvert.errors.QConvertError`) become a ``qconvert: error:`` line on stderr with a
hint and exit code 1 (see :func:`main` for every exit code); set QCONVERT_DEBUG=1 to see the full
traceback instead. Heavy modules are imported inside
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


#: Exit codes of every command (README "Errors and exit codes"; spec/robustness.md).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _report(message: str, hint: str | None = None) -> None:
    from .errors import cli_lines

    click.echo("\n".join(cli_lines(message, hint)), err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; every failure becomes a ``qconvert: error:`` line and an exit code.

    0 success; 1 an error (qconvert's own, an operating-system error such as a full disk or a
    permission, or an unexpected one, which is a bug); 2 a usage error (unknown command, missing
    argument, bad option value); 130 interrupted. The first line is at most 200 characters; detail
    follows on indented lines and the hint on a ``hint:`` line. QCONVERT_DEBUG=1 re-raises instead,
    showing the traceback.
    """
    import logging

    # bitsandbytes logs at import that an optional CPU kernel package is missing: noise for our users
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        _load_commands()
        cli.main(args=argv, prog_name="qconvert", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("qconvert: interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.UsageError as e:
        if debug:
            raise
        cmd = e.ctx.command_path if e.ctx is not None else "qconvert"
        _report(e.format_message(), f"see `{cmd} --help`")
        return EXIT_USAGE
    except click.ClickException as e:
        if debug:
            raise
        _report(e.format_message())
        return EXIT_ERROR
    except QConvertError as e:
        if debug:
            raise
        _report(str(e), e.hint)
        return EXIT_ERROR
    except OSError as e:  # the machine said no: a full disk, a permission, a path that is a file
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        _report(f"{where}{e.strerror or e}", "check the path, its permissions and the free disk space")
        return EXIT_ERROR
    except MemoryError:
        if debug:
            raise
        _report("out of memory", "close other programs or use a machine with more memory")
        return EXIT_ERROR
    except Exception as e:  # a bug: say so in one line; the traceback is one variable away
        if debug:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        _report(f"unexpected {type(e).__name__}: {first}".rstrip(": "),
                f"this is a bug in qconvert; run again with {DEBUG_ENV}=1 for the traceback and report it")
        return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
