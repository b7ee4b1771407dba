"""CLI commands `qconvert merge` and `qconvert export-adapter` (library: qconvert.export)."""

from __future__ import annotations

import json

import click

from ..errors import printable
from . import options


@click.command(short_help="Merge a LoRA adapter into 16-bit weights, checked.")
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
@click.option("--no-check", is_flag=True, help="Skip the check: `qconvert compare` of the merge against BASE + ADAPTER unmerged (as load_model runs it).")
@click.option("--check-tolerance", type=float, help="Largest mean KL the check passes (default by --dtype: 0.0001 float32, 0.001 float16, 0.01 bfloat16; "
              "0.5 with --quantize or --base-original).")
def merge(base, adapter, output_dir, dtype, quantize, max_shard_size, base_original, revision, overwrite, as_json, base_model, push_to,
          no_check, check_tolerance):
    """Merge a PEFT LoRA ADAPTER into its 4-bit BASE: W = dequant(W4) + scaling * B @ A, in float32, then cast.
    Then compare the merge with BASE + ADAPTER unmerged; a merge that fails goes to OUTPUT_DIR.unverified, exit 1."""
    from .._cpus import cap_torch_threads
    from ..export.merge import merge_adapter

    cap_torch_threads()
    s = merge_adapter(base, adapter, output_dir, dtype=dtype, quantize=quantize, max_shard_size=max_shard_size,
                      base_original=base_original, overwrite=overwrite, revision=revision, base_model=base_model,
                      log=lambda m: click.echo(printable(m), err=True), check=not no_check, check_tolerance=check_tolerance)
    if s.get("check", {}).get("passed") is False:
        _say_merge_failed(s, as_json)
        raise SystemExit(1)
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
    _say_check(s.get("check"), "the merge does not compute what BASE + ADAPTER computes")
    if push_to:
        click.echo(printable(f"pushed to {push_to}: {s['pushed']['commit_url']}"))


def _say_merge_failed(s: dict, as_json: bool) -> None:
    """A failed check: the figures, and where the unverified merge was kept (never at OUTPUT_DIR; not pushed)."""
    if as_json:
        click.echo(json.dumps(s, indent=1))
    else:
        _say_check(s["check"], "the merge does not compute what BASE + ADAPTER computes")
    click.echo(printable(f"qconvert: error: the merge failed its check; kept for inspection at {s['output']} (with CHECK_FAILED.json), "
                         "not at the output folder (and nothing was pushed)"), err=True)
    click.echo("hint: a wrong adapter for this base, or a merge bug; --no-check skips the check, --check-tolerance sets its bound", err=True)


@click.command(name="export-adapter", short_help="A clean PEFT adapter folder from a run or checkpoint.")
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


@click.command(name="export-gguf", short_help="One GGUF file for llama.cpp, checked against MODEL.")
@click.argument("model")
@click.argument("output")
@click.option("--type", "out_type", type=click.Choice(("f16", "bf16", "q8_0", "q4_0", "q4_k_m")),
              help="GGUF tensor type, default f16 (q4_k_m by llama.cpp's own quantizer).")
@click.option("--adapter", help="A PEFT LoRA adapter folder merged on the fly, exactly as `qconvert merge` merges.")
@click.option("--lora-only", is_flag=True, help="Write the --adapter alone as a GGUF LoRA adapter (llama.cpp --lora) for MODEL's GGUF.")
@options.overwrite("Replace OUTPUT if it exists (only once the new file is complete).")
@options.json_output()
@click.option("--progress", is_flag=True, help="Print one line per tensor written (to stderr).")
@click.option("--no-check", is_flag=True, help="Skip the check: `qconvert compare` of MODEL (+ adapter) against the written file.")
@click.option("--check-tolerance", type=float, help="Largest mean KL the check passes (default by --type, see docs/gguf.md).")
def export_gguf_cmd(model, output, out_type, adapter, lora_only, overwrite, as_json, progress, no_check, check_tolerance):
    """Write MODEL (4-bit: its dequantized values; or 16-bit) as one GGUF file that llama.cpp runs."""
    from .._cpus import cap_torch_threads
    from ..export.gguf import export_gguf

    cap_torch_threads()
    log = (lambda m: click.echo(printable(m), err=True)) if progress else None
    if not no_check and not lora_only:  # the check holds MODEL in float32 (and llama.cpp the file): refused before the export
        from ..export.check import check_fits
        from ..io.source import resolve_model_path

        check_fits(resolve_model_path(model, None)[0], "export-gguf")
    s = export_gguf(model, output, out_type=out_type, adapter=adapter, lora_only=lora_only, overwrite=overwrite, log=log)
    if not no_check and not lora_only:
        from ..export.gguf import check_export

        s["check"] = check_export(model, output, s["type"], adapter, check_tolerance)
    if as_json:
        click.echo(json.dumps(s, indent=1))
    else:
        click.echo(printable(f"wrote {s['output']}: {s['architecture']} {s['type']}, {s['tensors']} tensors, {s['bytes'] / 1e6:.1f} MB"
                             + (f", {s['merged_modules']} LoRA modules merged" if s["merged_modules"] else "")))
        for note in s.get("notes", []):
            click.echo(printable(f"note: {note}"))
        _say_check(s.get("check"))
    if s.get("check", {}).get("passed") is False:
        raise SystemExit(1)


def _say_check(c: dict | None, failure: str = "the file does not compute what MODEL computes") -> None:
    """The check's one-line verdict."""
    if c is None:
        return
    if "skipped" in c:
        click.echo(f"not checked: {c['skipped']}")
        return
    click.echo(f"check {'PASS' if c['passed'] else 'FAIL: ' + failure}: mean KL {c['kl']:.3g} "
               f"(tolerance {c['tolerance']:g}), top-1 agreement {c['top1_agreement']:.1%}, max relative logit error {c['max_rel_logit_error']:.3g}")


@click.command(name="compare", short_help="Do two models compute the same? KL, top-1, logit error.")
@click.argument("a")
@click.argument("b")
@click.option("--adapter-a", help="A PEFT LoRA adapter merged into A (as `qconvert merge` merges).")
@click.option("--adapter-b", help="A PEFT LoRA adapter merged into B.")
@click.option("--prompts", type=click.Path(dir_okay=False), help="Probe prompts, one a line (default: built-in ones).")
@click.option("--tolerance", type=float, default=1e-2, show_default=True, help="Largest overall mean KL(A||B) that passes.")
@click.option("--new-tokens", type=click.IntRange(0, 512), default=16, show_default=True, help="Greedy tokens shown side by side.")
@options.json_output()
def compare_cmd(a, b, adapter_a, adapter_b, prompts, tolerance, new_tokens, as_json):
    """Do A and B compute the same? Each a Hugging Face folder (16- or 4-bit), a folder plus adapter, or a GGUF
    (run by llama.cpp). Prints KL(A||B), top-1 agreement, max relative logit error; exit 1 above --tolerance."""
    from .._cpus import cap_torch_threads
    from ..export.compare import compare

    cap_torch_threads()
    r = compare(a, b, adapter_a=adapter_a, adapter_b=adapter_b, prompts=prompts, tolerance=tolerance, new_tokens=new_tokens)
    if as_json:
        click.echo(json.dumps(r, indent=1))
    else:
        for p in r["prompts"]:
            click.echo(printable(f"{p['prompt'][:40]!r}: KL {p['kl']:.3g}, top-1 {p['top1_agreement']:.0%}, max rel error {p['max_rel_logit_error']:.3g}"))
            click.echo(printable(f"  A: {p['greedy_a']!r}\n  B: {p['greedy_b']!r}"))
        click.echo(f"{'PASS' if r['passed'] else 'FAIL'}: mean KL(A||B) {r['kl']:.3g} (tolerance {tolerance:g}), "
                   f"top-1 agreement {r['top1_agreement']:.1%}, max relative logit error {r['max_rel_logit_error']:.3g}")
    if not r["passed"]:
        raise SystemExit(1)


COMMANDS = [merge, export_adapter_cmd, export_gguf_cmd, compare_cmd]
