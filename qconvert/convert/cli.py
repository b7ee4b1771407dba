"""CLI commands `qconvert quantize` and `qconvert verify`."""

from __future__ import annotations

import json

import click

from ..cli import register
from ..names import FLOAT_DTYPE_NAMES, QUANT_TYPES


def _human(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _report_drops_and_casts(s: dict) -> None:
    """Every source tensor that is not written, or written in another dtype, grouped by reason."""
    for what, entries in (("not written", s["dropped"]), ("written in another dtype", s["cast"])):
        by_reason: dict[str, list[str]] = {}
        for e in entries:
            by_reason.setdefault(e["reason"], []).append(e["tensor"])
        for reason, names in by_reason.items():
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            click.echo(f"{what}: {', '.join(names[:3])}{more} ({reason})")


@register
@click.command()
@click.argument("source")
@click.argument("output_dir")
@click.option("--revision", help="Branch, tag or commit of a Hub repo.")
@click.option("--quant-type", type=click.Choice(QUANT_TYPES), default="nf4", show_default=True)
@click.option("--blocksize", type=int, default=64, show_default=True, help="32, 64, 128, ..., 4096.")
@click.option("--no-double-quant", is_flag=True, help="Store block scales as float32 (4.5 bits/param) instead of 8-bit.")
@click.option("--compute-dtype", type=click.Choice(sorted(FLOAT_DTYPE_NAMES)), default="bfloat16", show_default=True,
              help="Recorded in quantization_config: the dtype layers compute in after dequantizing.")
@click.option("--skip-modules", multiple=True, metavar="PATTERN", help="Leave matching modules unquantized (repeatable; transformers' matching rules).")
@click.option("--max-shard-size", default="2GB", show_default=True, help="Output shard size, decimal units (5GB = 5e9 bytes).")
@click.option("--workers", metavar="N", help="Threads that quantize (0 or auto: one per CPU this process may use, the default).")
@click.option("--dry-run", is_flag=True, help="Print the plan (tensors, which get quantized, output shards) and write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary on stdout.")
@click.option("--overwrite", is_flag=True, help="Replace OUTPUT_DIR if it exists (only once the new output is complete).")
@click.option("--keep-source", is_flag=True, help="Keep downloaded Hub shards in the Hugging Face cache (default: delete each after use).")
@click.option("--push-to-hub", "push_to", metavar="REPO_ID", help="Publish the result (see `qconvert push`).")
def quantize(source, output_dir, revision, quant_type, blocksize, no_double_quant, compute_dtype, skip_modules, max_shard_size,
             workers, dry_run, as_json, overwrite, keep_source, push_to):
    """Stream a Hugging Face checkpoint (local folder or Hub repo id) into a 4-bit NF4 checkpoint.

    Interrupted runs resume: run the same command again."""
    from .._cpus import parse_workers
    from .quantize import quantize_checkpoint

    workers = parse_workers(workers)  # a bad value fails here, before anything is read
    log = None if as_json else (lambda m: click.echo(m, err=True))
    s = quantize_checkpoint(
        source, output_dir, revision=revision, quant_type=quant_type, blocksize=blocksize, double_quant=not no_double_quant,
        compute_dtype=compute_dtype, skip_modules=list(skip_modules), max_shard_size=max_shard_size, workers=workers,
        dry_run=dry_run, overwrite=overwrite, keep_source=keep_source, log=log,
    )
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    if dry_run:
        click.echo(f"plan for {source} -> {output_dir} ({s['architecture']}): {s['tensors']} tensors, {s['quantized']} quantized")
        _report_drops_and_casts(s)
        for sh in s["shards"]:
            click.echo(f"  {sh['file']}: {sh['tensors']} tensors, about {_human(sh['estimated_bytes'])}")
        click.echo(f"source {_human(s['source_bytes'])} -> about {_human(s['estimated_output_bytes'])}; nothing written")
        return
    click.echo(
        f"wrote {s['output']}: {s['quantized']} of {s['tensors']} tensors quantized ({s['quant_type']}, block {s['blocksize']}, "
        f"{'double quant' if s['double_quant'] else 'fp32 scales'}), {_human(s['source_bytes'])} -> {_human(s['output_bytes'])}, "
        f"{s['bits_per_param']:.3f} bits/param, {len(s['shards'])} shard(s), {s['seconds']:.1f} s"
    )
    _report_drops_and_casts(s)
    if push_to:
        from ..hub.push import push_folder

        r = push_folder(output_dir, push_to)
        click.echo(f"pushed to {push_to}: {r['commit_url']}")


@register
@click.command()
@click.argument("output_dir")
@click.option("--against", "source", help="The original checkpoint: report per-tensor quantization error against it.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", metavar="FILE.png", help="With --against: draw each layer's SQNR by module type into FILE.png.")
def verify(output_dir, source, as_json, plot):
    """Check a 4-bit checkpoint against the spec; with --against, measure its quantization error."""
    from .verify import verify_checkpoint

    if plot and not source:
        from ..errors import OptionError

        raise OptionError("--plot needs --against SOURCE", hint="the picture shows the error against the original weights")
    r = verify_checkpoint(output_dir, against=source)
    if as_json:
        click.echo(json.dumps(r, indent=1))
    else:
        click.echo(f"{output_dir}: OK: {r['quantized']} quantized and {r['unquantized']} other tensors in {len(r['files'])} file(s) follow the spec")
        if source:
            e = r["error"]
            click.echo(
                f"quantization error against {source}: relative error mean {e['rel_error_mean']:.4f} (worst {e['rel_error_max']:.4f} "
                f"in {e['worst_tensor']}), SQNR mean {e['sqnr_db_mean']:.2f} dB (lowest {e['sqnr_db_min']:.2f} dB); "
                f"unquantized tensors identical: {e['unquantized_identical']}"
            )
            _report_drops_and_casts({"dropped": e["dropped"], "cast": []})
    if plot:
        from ..plot import plot_verify_report

        click.echo(f"wrote {plot_verify_report(r, plot)['path']}", err=True)
    if not r["ok"]:
        raise SystemExit(1)
