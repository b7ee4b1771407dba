"""CLI commands `qconvert merge` and `qconvert export-adapter` (library: qconvert.export)."""

from __future__ import annotations

import json

import click

from ..errors import printable
from . import options


@click.command()
@click.argument("base")
@click.argument("adapter")
@click.argument("output_dir")
@options.dtype(auto=False)
@click.option("--quantize", is_flag=True, help="Re-quantize the merged weights to 4 bits, and print what that costs.")
@options.max_shard_size()
@click.option("--base-original", help="Merge into these original full-precision weights instead (warns: training saw the dequantized ones).")
@options.revision("Branch, tag or commit of BASE when it is a Hub id.")
@options.overwrite()
@options.json_output()
@click.option("--base-model", metavar="HUB_ID", help="The Hub id of BASE (or of its source), for the card's base_model.")
@options.push_to_hub()
def merge(base, adapter, output_dir, dtype, quantize, max_shard_size, base_original, revision, overwrite, as_json, base_model, push_to):
    """Merge a PEFT LoRA ADAPTER into its 4-bit BASE: W = dequant(W4) + scaling * B @ A, in float32, then cast."""
    from .._cpus import cap_torch_threads
    from ..export.merge import merge_adapter

    cap_torch_threads()
    s = merge_adapter(base, adapter, output_dir, dtype=dtype, quantize=quantize, max_shard_size=max_shard_size,
                      base_original=base_original, overwrite=overwrite, revision=revision, base_model=base_model,
                      log=lambda m: click.echo(printable(m), err=True))
    if push_to:
        from ..hub.push import push_folder

        s["pushed"] = push_folder(output_dir, push_to)
    if as_json:
        click.echo(json.dumps(s, indent=1))
        return
    click.echo(f"wrote {s['output']}: {s['merged_modules']} LoRA modules merged, {'4-bit' if quantize else s['dtype']}, "
               f"{s['bytes'] / 1e6:.1f} MB in {len(s['shards'])} shard(s)")
    if "requantization_cost" in s:
        c = s["requantization_cost"]
        click.echo(f"re-quantizing cost: relative output error {c['output_error_mean']:.4f} (max {c['output_error_max']:.4f}) "
                   f"against the 16-bit merge on random probes; {c['adapter_change_lost_mean']:.0%} of the adapter's change lost")
    if push_to:
        click.echo(printable(f"pushed to {push_to}: {s['pushed']['commit_url']}"))


@click.command(name="export-adapter")
@click.argument("source")
@click.argument("output_dir")
@click.option("--base-model", help="Set base_model_name_or_path (use the Hub id of the 4-bit base).")
@options.overwrite()
def export_adapter_cmd(source, output_dir, base_model, overwrite):
    """Write a clean PEFT adapter folder (config, weights, card) from a `qconvert train` output or checkpoint-N
    (given a train output with no final adapter, its latest checkpoint)."""
    from ..export.adapter import export_adapter

    r = export_adapter(source, output_dir, base_model=base_model, overwrite=overwrite)
    # the base model's name comes from the adapter's config: escape sequences in it are shown, not sent to the terminal
    click.echo(printable(f"wrote {r['output']}: {r['tensors']} LoRA tensors from {r['source']} (base model {r['base_model']})"))


COMMANDS = [merge, export_adapter_cmd]
