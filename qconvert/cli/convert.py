"""CLI commands `qconvert quantize`, `qconvert verify` and `qconvert inspect` (library: qconvert.convert,
qconvert.convert.inspect)."""

from __future__ import annotations

import json

import click

from ..names import QUANT_TYPES
from . import options


def echo(text: str, err: bool = False) -> None:
    """click.echo of a line that may hold names from the checkpoint (tensor and file names), with
    control characters escaped: a name may carry a terminal escape sequence."""
    from ..errors import printable

    click.echo(printable(text), err=err)


def _human(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _report_drops_and_casts(s: dict) -> None:
    """The source's own quantization (FP8, MXFP4), then every source tensor that is not written, or
    written in another dtype, grouped by reason."""
    if sc := s.get("source_scheme"):
        block = f"blocks of {sc['weight_block_size'][0]}x{sc['weight_block_size'][1]}" if sc.get("weight_block_size") else (
            "blocks of 32" if sc["quant_method"] == "mxfp4" else "one scale per tensor")
        echo(f"source: {sc['quant_method']} ({', '.join(sc['stored_dtypes'])}, {block}): {sc['dequantized_tensors']} tensors "
             f"dequantized to {sc['dequantized_to']}, as transformers dequantizes them")
    for what, entries in (("not written", s["dropped"]), ("written in another dtype", s["cast"])):
        by_reason: dict[str, list[str]] = {}
        for e in entries:
            by_reason.setdefault(e["reason"], []).append(e["tensor"])
        for reason, names in by_reason.items():
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            echo(f"{what}: {', '.join(names[:3])}{more} ({reason})")


def _report_experts(s: dict) -> None:
    """What happened to the routed MoE experts, with their share of the parameters (issue 20)."""
    e = s.get("experts") or {}
    if not e.get("params"):
        return
    if e["mode"] == "16bit":
        echo(f"routed experts stay 16-bit (--experts 16bit, as transformers + bitsandbytes writes them): {e['share']:.1%} of the parameters")
        return
    echo(f"routed experts in 4 bits ({e['share']:.1%} of the parameters); plain transformers refuses this folder, qconvert.load_model loads it")
    if e["kept_16bit_params"]:
        names = [k["tensor"] for k in e["kept_16bit"]]
        echo(f"experts kept 16-bit: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} "
             f"({e['kept_16bit_share']:.1%} of the parameters; {e['kept_16bit'][0]['reason']})")


@click.command(short_help="A Hub id or folder to a 4-bit NF4 checkpoint, streamed.")
@click.argument("source")
@click.argument("output_dir")
@options.revision()
@click.option("--quant-type", type=click.Choice(QUANT_TYPES), default="nf4", show_default=True)
@click.option("--blocksize", type=int, default=64, show_default=True, help="32, 64, 128, ..., 4096.")
@click.option("--no-double-quant", is_flag=True, help="Store block scales as float32 (4.5 bits/param) instead of 8-bit.")
@options.compute_dtype()
@click.option("--skip-modules", multiple=True, metavar="PATTERN", help="Leave matching modules unquantized (repeatable; transformers' matching rules).")
@options.max_shard_size()
@click.option("--workers", metavar="N", help="Threads that quantize (0 or auto: one per CPU this process may use, the default).")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensors, which get quantized, output shards) and write nothing.")
@options.json_output("Print a machine-readable summary on stdout.")
@options.overwrite()
@click.option("--keep-source", is_flag=True, help="Keep downloaded Hub shards in the Hugging Face cache (default: delete each after use).")
@click.option("--experts", type=click.Choice(["4bit", "16bit"]), default="4bit", show_default=True,
              help="Routed MoE experts: 4-bit (loads with qconvert only) or 16-bit as transformers + bitsandbytes writes them.")
@click.option("--base-model", metavar="HUB_ID", help="The Hub id of a local SOURCE, for the card's base_model.")
@options.push_to_hub()
def quantize(source, output_dir, revision, quant_type, blocksize, no_double_quant, compute_dtype, skip_modules, max_shard_size,
             workers, dry_run, as_json, overwrite, keep_source, experts, base_model, push_to):
    """Stream a Hugging Face checkpoint (local folder or Hub repo id) into a 4-bit NF4 checkpoint.

    Interrupted runs resume: run the same command again."""
    from .._cpus import parse_workers
    from ..convert.options import QuantizeOptions
    from ..convert.quantize import quantize_checkpoint

    opts = QuantizeOptions(revision=revision, quant_type=quant_type, blocksize=blocksize, double_quant=not no_double_quant,
                           compute_dtype=compute_dtype, skip_modules=skip_modules, max_shard_size=max_shard_size,
                           workers=parse_workers(workers),  # a bad value fails here, before anything is read
                           dry_run=dry_run, overwrite=overwrite, keep_source=keep_source, experts=experts, base_model=base_model)
    s = quantize_checkpoint(source, output_dir, opts, log=None if as_json else (lambda m: echo(m, err=True)))
    if as_json:
        echo(json.dumps(s, indent=1))
        return
    if dry_run:
        echo(f"plan for {source} -> {output_dir} ({s['architecture']}): {s['tensors']} tensors, {s['quantized']} quantized")
        _report_drops_and_casts(s)
        for sh in s["shards"]:
            echo(f"  {sh['file']}: {sh['tensors']} tensors, about {_human(sh['estimated_bytes'])}")
        _report_experts(s)
        echo(f"source {_human(s['source_bytes'])} -> about {_human(s['estimated_output_bytes'])}; nothing written")
        return
    echo(
        f"wrote {s['output']}: {s['quantized']} of {s['tensors']} tensors quantized ({s['quant_type']}, block {s['blocksize']}, "
        f"{'double quant' if s['double_quant'] else 'fp32 scales'}), {_human(s['source_bytes'])} -> {_human(s['output_bytes'])}, "
        f"{len(s['shards'])} shard(s), {s['seconds']:.1f} s"
    )
    echo(f"size: {s['size_ratio']:.3f} of the source; {s['bits_per_param_model']:.3f} bits/param over the whole model, "
         f"{s['bits_per_param']:.3f} over the {s['quantized_params']:,} 4-bit parameters")
    _report_experts(s)
    _report_drops_and_casts(s)
    if push_to:
        from ..hub.push import push_folder

        r = push_folder(output_dir, push_to)
        echo(f"pushed to {push_to}: {r['commit_url']}")


@click.command(short_help="Check a 4-bit checkpoint against the spec (and its source).")
@click.argument("output_dir")
@click.option("--against", "source", help="The original checkpoint: report per-tensor quantization error against it.")
@options.json_output()
@click.option("--plot", metavar="FILE.png", help="With --against: draw each layer's SQNR by module type into FILE.png.")
@options.overwrite("Replace FILE.png if it exists.")
def verify(output_dir, source, as_json, plot, overwrite):
    """Check a 4-bit checkpoint against the spec; with --against, measure its quantization error."""
    from ..convert.verify import verify_checkpoint

    if plot and not source:
        from ..errors import OptionError

        raise OptionError("--plot needs --against SOURCE", hint="the picture shows the error against the original weights")
    if plot:
        from ..convert.verify_plot import check_plot_path

        check_plot_path(plot, overwrite, inputs=[output_dir, source])  # before the work
    r = verify_checkpoint(output_dir, against=source)
    if as_json:
        echo(json.dumps(r, indent=1))
    else:
        echo(f"{output_dir}: OK: {r['quantized']} quantized and {r['unquantized']} other tensors in {len(r['files'])} file(s) follow the spec")
        if source:
            e = r["error"]
            echo(
                f"quantization error against {source}: relative error mean {e['rel_error_mean']:.4f} (worst {e['rel_error_max']:.4f} "
                f"in {e['worst_tensor']}), SQNR mean {e['sqnr_db_mean']:.2f} dB (lowest {e['sqnr_db_min']:.2f} dB); "
                f"unquantized tensors identical: {e['unquantized_identical']}"
            )
            _report_drops_and_casts({"dropped": e["dropped"], "cast": []})
    if plot:
        from ..convert.verify_plot import plot_verify_report

        echo(f"wrote {plot_verify_report(r, plot, overwrite)['path']}", err=True)
    if not r["ok"]:
        raise SystemExit(1)


@click.command(short_help="What each tensor of a checkpoint is; bits per parameter.")
@click.argument("path")
@options.json_output("Print one JSON object instead of a table.")
def inspect(path: str, as_json: bool) -> None:
    """Show every tensor of a checkpoint folder or .safetensors file: shape, dtype, quant type, block size,
    double quant, stored bytes; and bits per parameter over the quantized tensors."""
    from ..convert.inspect import format_report, inspect_checkpoint

    report = inspect_checkpoint(path)
    if as_json:
        echo(json.dumps(report, indent=1))
    else:
        echo(format_report(report))


COMMANDS = [inspect, quantize, verify]
