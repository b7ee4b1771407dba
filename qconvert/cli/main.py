"""The `qconvert` group: version, help, and how every failure becomes a ``qconvert: error:`` line
and an exit code (see :func:`main`).

The commands live in the sibling modules (:data:`COMMAND_MODULES`); each lists its commands in
``COMMANDS`` and :func:`_load_commands` adds them to the group. No library module imports from
this package.
"""

from __future__ import annotations

import importlib
import os
import sys

import click

from .. import __version__
from ..errors import QConvertError

DEBUG_ENV = "QCONVERT_DEBUG"
#: The modules of qconvert.cli that define commands, each with a ``COMMANDS`` list.
COMMAND_MODULES = ("convert", "train", "export", "hub", "runtime")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="qconvert")
def cli() -> None:
    """qconvert: QLoRA-style 4-bit (NF4) checkpoints: quantize, inspect, verify, load, train, merge, push."""


def register(command: click.Command) -> click.Command:
    """Add a command to the group (for a command defined outside qconvert.cli)."""
    cli.add_command(command)
    return command


def _load_commands() -> None:
    """Add every command of :data:`COMMAND_MODULES` to the group (cheap: the modules import only
    click and light library constants; each command imports its library code when it runs)."""
    for name in COMMAND_MODULES:
        for command in importlib.import_module(f"{__package__}.{name}").COMMANDS:
            cli.add_command(command)


#: Exit codes of every command (docs/refusals.md "Errors and exit codes"; spec/robustness.md).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _report(message: str, hint: str | None = None) -> None:
    from ..errors import cli_lines

    click.echo("\n".join(cli_lines(message, hint)), err=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; every failure becomes a ``qconvert: error:`` line and an exit code.

    0 success; 1 an error (qconvert's own, an operating-system error such as a full disk or a
    permission, or an unexpected one, which is a bug); 2 a usage error found while parsing the command line (unknown
    command, missing argument, a value of the wrong type; a value qconvert checks itself exits 1); 130 interrupted. The first line is at most 200 characters; detail
    follows on indented lines and the hint on a ``hint:`` line. QCONVERT_DEBUG=1 re-raises instead,
    showing the traceback.
    """
    from .. import quiet_bitsandbytes_notice

    quiet_bitsandbytes_notice()
    debug = bool(os.environ.get(DEBUG_ENV))
    try:
        _load_commands()
        args = list(sys.argv[1:] if argv is None else argv)
        cli.main(args=args, prog_name="qconvert", standalone_mode=False, obj={"argv": args})  # argv: for train --nproc-per-node
    except click.exceptions.Exit as e:
        return e.exit_code
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("qconvert: interrupted", err=True)
        return EXIT_INTERRUPTED
    except click.exceptions.NoArgsIsHelpError as e:  # `qconvert` alone: the whole help, not an error cut to 12 lines
        click.echo(e.ctx.get_help())
        return EXIT_USAGE
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
        import errno

        from ..errors import OPEN_FILES_HINT

        where = f"{e.filename}: " if e.filename else ""
        if e.errno in (errno.EMFILE, errno.ENFILE):
            hint = OPEN_FILES_HINT
        elif e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            hint = "free space on that file system (or raise the file-size limit, ulimit -f), or write the output elsewhere, then re-run"
        else:
            hint = "check the path, its permissions and the free disk space"
        _report(f"{where}{e.strerror or e}", hint)
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


def run() -> None:
    """The program's entry point (the ``qconvert`` script, ``python -m qconvert``): :func:`main`, then
    exit with its code. A process that took part in a torch.distributed process group (``train``
    under torchrun or ``--nproc-per-node``, or with ``--fsdp``) leaves with ``os._exit`` once its
    output is flushed, after the group was destroyed: interpreter finalization then destroys what
    still refers to the group (FSDP's device mesh) in no set order, and gloo's worker threads aborted
    the process there ("terminate called without an active exception", exit -6) about once in ten
    runs on a loaded machine, after the run had finished and written everything."""
    code = main()
    fsdp = sys.modules.get("qconvert.training.fsdp")
    if fsdp is not None and fsdp.GROUP_USED:
        fsdp.leave_process(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
