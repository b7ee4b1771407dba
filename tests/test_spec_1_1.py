"""One test per rule that spec/format.md 1.1 added or made precise (its section 13 lists them): a file
that breaks the rule is refused by qconvert's readers, or the documented behaviour holds. Where the
rule is about what other programs do (bitsandbytes, safetensors), the test checks that too, so the
spec's statements about them stay true."""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import pytest
import torch

import qconvert
from helpers import make_tiny_llama
from qconvert.errors import FormatError
from qconvert.io.checkpoint import Checkpoint
from qconvert.format.constants import codebook, dynamic_map
from qconvert.format.layout import QuantizedTensor, pack_quant_state, unpack_quant_state
from qconvert.quant.reference import dequantize_4bit_ref, float32_product_ref, quantize_4bit_ref
from tolerances import REPORTED_FIGURE_REL

ROOT = Path(__file__).resolve().parent.parent
FLT_MAX = 3.4028234663852886e38
IDS = torch.tensor([[1, 5, 9, 33, 2, 7]])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A small bf16 Llama quantized by qconvert (one file), to be damaged copy by copy."""
    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("spec11")
    quantize_checkpoint(str(make_tiny_llama(d / "src", hidden=32, intermediate=48, layers=1, vocab=64)), d / "q")
    return d / "q"


def copy_with(src: Path, dst: Path, edit=None, meta=None, config=None) -> Path:
    """A copy of checkpoint ``src`` whose tensors pass through ``edit(dict)``, whose file metadata is
    ``meta`` and whose config.json goes through ``config(dict)``."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    with safe_open(str(src / "model.safetensors"), "pt") as h:
        old_meta = h.metadata()
    sd = load_file(str(src / "model.safetensors"))
    if edit:
        edit(sd)
    save_file(sd, str(dst / "model.safetensors"), metadata=old_meta if meta is None else meta)
    if config:
        cfg = json.loads((src / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def refused_everywhere(path: Path, match: str, culprit: str | None = None) -> None:
    """The format's reader rules (what merge runs before reading a tensor) refuse ``path`` with a
    message matching ``match``; load_model and verify refuse it too, with a message that matches
    ``culprit`` (default ``match``): their model-folder checks (spec/robustness.md) may see it first."""
    from qconvert.convert.verify import verify_checkpoint
    from qconvert.format.conformance import check_checkpoint

    with pytest.raises(FormatError, match=match):
        check_checkpoint(Checkpoint(path, streaming=True))
    with pytest.raises(FormatError, match=culprit or match):
        qconvert.load_model(path, backend="reference", device="cpu")
    with pytest.raises(FormatError, match=culprit or match):
        verify_checkpoint(path)


# ---------------------------------------------------------------- section 8: the float32 reading
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_s8_float32_output_is_logical_value_widened(dtype):
    """A float32 (or other) output is the logical value converted, as bitsandbytes' dequantize_4bit(...)
    .to(dtype) gives; the float32 product differs for most elements, so the rule is not vacuous."""
    F = pytest.importorskip("bitsandbytes.functional")
    x = (torch.randn(24, 50, generator=torch.Generator().manual_seed(1)) * 0.3).to(dtype)
    for dq in (False, True):
        packed, st = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=dq)
        qt = quantize_4bit_ref(x, "nf4", 64, dq)
        theirs = F.dequantize_4bit(packed, st)
        assert theirs.dtype == dtype
        for out in (torch.float32, torch.float16, torch.bfloat16):
            assert torch.equal(dequantize_4bit_ref(qt, out), theirs.to(out)), (out, dq)
        differ = (float32_product_ref(qt) != theirs.float()).float().mean().item()
        assert differ > 0.5, differ


# ---------------------------------------------------------------- sections 3.1 and 11: FP4's zero
def test_s3_fp4_nibble_8_is_positive_zero_and_bitsandbytes_cpu_diverges():
    """Nibble 0x8 is +0.0: under a positive scale a reader MUST produce +0.0 (bits 0x00000000).
    bitsandbytes' native CPU dequantize gives -0.0 for nibble 0x8 (not 0x0) when the row length is
    even, here (50: not a multiple of 16, so on every CPU; section 11); its portable path (odd row
    length) gives +0.0."""
    F = pytest.importorskip("bitsandbytes.functional")
    packed = torch.tensor([0x88, 0x08, 0x80, 0x37] * 25, dtype=torch.uint8).reshape(-1, 1)
    nibble = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)
    for shape in ((4, 50), (3, 65)):
        n = shape[0] * shape[1]
        qt = QuantizedTensor(packed[: (n + 1) // 2], torch.full((-(-n // 32),), 2.0), shape, torch.float32, "fp4", 32, codebook("fp4"))
        ours = dequantize_4bit_ref(qt).reshape(-1)
        eight = nibble[:n] == 8
        assert (ours[eight] == 0).all() and not torch.signbit(ours[ours == 0]).any()
        st = F.QuantState(absmax=qt.absmax, shape=torch.Size(shape), code=qt.quant_map, blocksize=32, quant_type="fp4", dtype=torch.float32)
        theirs = F.dequantize_4bit(qt.packed, st).reshape(-1)
        assert torch.equal(theirs, ours)  # equal as numbers
        assert bool(torch.signbit(theirs[eight]).all()) == (shape[1] % 2 == 0), shape  # the divergence of section 11
        assert not torch.signbit(theirs[nibble[:n] == 0]).any()


def test_s3_zero_codes_under_a_negative_decoded_scale_are_negative_zero():
    """The golden vector fp4_signed_zero: block 0's decoded scale is negative, so its zero codes give
    -0.0 (IEEE: +0.0 times a negative number); the other blocks' give +0.0."""
    from test_golden import VECTORS, stored

    v = next(v for v in VECTORS if v["name"] == "fp4_signed_zero")
    qt = stored(v)
    from qconvert.quant.reference import dequantize_absmax_ref

    scales = dequantize_absmax_ref(qt)
    assert scales[0] < 0 < scales[1:].min()
    w = dequantize_4bit_ref(qt, torch.float32).reshape(-1)
    assert torch.signbit(w[:32][w[:32] == 0]).all() and not torch.signbit(w[32:][w[32:] == 0]).any()


# ---------------------------------------------------------------- sections 3.5 and 5.1: nested_offset
def qs_bytes(offset_text: str) -> torch.Tensor:
    text = ('{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [64], "nested_blocksize": 256, '
            f'"nested_dtype": "float32", "nested_offset": {offset_text}}}')
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def bnb_offset(offset_text: str) -> float:
    """What bitsandbytes makes of the number: QuantState.from_dict's torch.tensor(float(...))."""
    F = pytest.importorskip("bitsandbytes.functional")
    parts = {"quant_state.bitsandbytes__nf4": qs_bytes(offset_text), "absmax": torch.zeros(1, dtype=torch.uint8),
             "quant_map": codebook("nf4"), "nested_absmax": torch.zeros(1), "nested_quant_map": dynamic_map()}
    return F.QuantState.from_dict(parts, device=torch.device("cpu")).offset.item()


@pytest.mark.parametrize("text, value", [
    ("0.24744313955307007", 0.24744313955307007),  # a conforming writer's float32, exactly
    ("0.1", 0.10000000149011612),  # not a float32: rounded (through the double 0.1)
    # just above the midpoint between 1.0 and the next float32: its double IS the midpoint, which
    # rounds to even (1.0); a direct decimal-to-float32 rounding would give 1.0000001192092896
    ("1.0000000596046447753906250000001", 1.0),
    ("3.4028234663852886e38", FLT_MAX),
    ("-3.4028234663852886e38", -FLT_MAX),
    ("7", 7.0),
])
def test_s35_nested_offset_read_through_a_double(text, value):
    assert unpack_quant_state(qs_bytes(text))["nested_offset"] == value
    assert bnb_offset(text) == value  # bitsandbytes reads the same float32


@pytest.mark.parametrize("text", ["3.4028235677973366e38", "1e39", "-1e39", "1e400", "340282356779733661637539395458142568448" + "0" * 10,
                                  "NaN", "Infinity", "-Infinity", '"0.5"', "true", "null"])
def test_s35_nested_offset_beyond_float32_refused(text):
    """A double beyond the largest float32 (the first rounds to FLT_MAX directly but to infinity through a
    double, which is what bitsandbytes reads) is refused; so are the non-standard NaN/Infinity tokens
    (Python's json accepts them) and non-numbers."""
    with pytest.raises(FormatError, match="nested_offset"):
        unpack_quant_state(qs_bytes(text))
    if text == "3.4028235677973366e38":
        assert bnb_offset(text) == float("inf")


def test_s35_schema_agrees_with_the_reader_on_nested_offset():
    jsonschema = pytest.importorskip("jsonschema")
    from qconvert.format.constants import load_json

    schema = load_json("quant_state.schema.json")
    for text, ok in (("3.4028234663852886e38", True), ("0.1", True), ("3.4028235677973366e38", False), ("1e39", False), ("-1e39", False)):
        obj = json.loads(bytes(qs_bytes(text).tolist()))
        try:
            jsonschema.validate(obj, schema)
            schema_ok = True
        except jsonschema.ValidationError:
            schema_ok = False
        try:
            unpack_quant_state(qs_bytes(text))
            reader_ok = True
        except FormatError:
            reader_ok = False
        assert schema_ok == reader_ok == ok, text


# ---------------------------------------------------------------- section 9: decoded scales
def test_s9_infinite_decoded_scale_refused():
    """nested_absmax 3e38 and nested_offset 3e38 pass every per-field check but decode to infinity."""
    good = quantize_4bit_ref(torch.randn(64), "nf4", 32, True)
    sd = good.state_dict("w")
    sd["w.absmax"] = torch.tensor([255, 0], dtype=torch.uint8)  # code 255 is 1.0
    sd["w.nested_absmax"] = torch.tensor([3e38])
    qs = good.quant_state_dict() | {"nested_offset": 3e38}
    sd["w.quant_state.bitsandbytes__nf4"] = pack_quant_state(qs)
    with pytest.raises(FormatError, match="overflows float32"):
        QuantizedTensor.from_state_dict("w", sd)
    sd["w.nested_absmax"] = torch.tensor([3e37])  # 3e37 * 1.0 + 3e38 is finite: accepted
    assert torch.isfinite(dequantize_4bit_ref(QuantizedTensor.from_state_dict("w", sd))).all()


# ---------------------------------------------------------------- section 9: the safetensors container
def st_file(path: Path, header: str, data: bytes, pad: bytes = b"") -> Path:
    h = header.encode() + pad
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


A = torch.arange(4, dtype=torch.float32).numpy().tobytes()
B = torch.arange(2, dtype=torch.float32).numpy().tobytes()
GOOD = '{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}'
CONTAINER = {
    # name: (header, data, padding, refused?)
    "good": (GOOD, A + B, b"", False),
    "space_padding": (GOOD, A + B, b"    ", False),
    "tab_newline_padding": (GOOD, A + B, b"\t\n\r ", False),
    "any_order": ('{"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}', B + A, b"", False),
    "leading_whitespace": ("\t " + GOOD, A + B, b"", False),
    "unknown_entry_member": (GOOD.replace('"shape":[2],', '"shape":[2],"note":"x",'), A + B, b"", False),
    "nul_padding": (GOOD, A + B, b"\0\0", True),
    "trailing_bytes": (GOOD, A + B + b"\0\0\0\0", b"", True),
    "short_data": (GOOD, A + B[:4], b"", True),
    "gap": (GOOD.replace("[16,24]", "[20,28]"), A + b"xxxx" + B, b"", True),
    "overlap": (GOOD.replace("[16,24]", "[8,16]"), A, b"", True),
    "size_mismatch": (GOOD.replace('"shape":[4]', '"shape":[3]'), A + B, b"", True),
    "duplicate_tensor": (GOOD[:-1] + ',"b":{"dtype":"F32","shape":[2],"data_offsets":[16,24]}}', A + B, b"", True),
    "duplicate_metadata": (GOOD.replace('"format":"pt"', '"format":"pt","format":"pt"'), A + B, b"", True),
    "non_string_metadata": (GOOD.replace('"format":"pt"', '"format":"pt","n":1'), A + B, b"", True),
}


@pytest.mark.parametrize("name", list(CONTAINER))
def test_s9_safetensors_container_rules(tmp_path, name):
    """What the reader refuses and accepts, and, for every case but the duplicate names (which the
    safetensors library accepts, the last entry winning), the same verdict from safetensors itself."""
    from safetensors import safe_open

    header, data, pad, refused = CONTAINER[name]
    p = st_file(tmp_path / "m.safetensors", header, data, pad)
    try:
        with safe_open(str(p), "pt") as h:
            [h.get_tensor(k) for k in h.keys()]
        library_refuses = False
    except Exception:
        library_refuses = True
    assert library_refuses == (refused and not name.startswith("duplicate")), name
    if refused:
        with pytest.raises(FormatError):
            Checkpoint(p)
    else:
        c = Checkpoint(p)
        assert c.get("a").tolist() == [0.0, 1.0, 2.0, 3.0] and c.get("b").tolist() == [0.0, 1.0]


def test_s9_header_length_past_the_end_refused(tmp_path):
    p = tmp_path / "m.safetensors"
    for blob in (struct.pack("<Q", 10**6) + b"{}", b"\x02\x00\x00"):
        p.write_bytes(blob)
        with pytest.raises(FormatError):
            Checkpoint(p)


# ---------------------------------------------------------------- section 9: metadata
def test_s9_format_must_be_pt(ckpt, tmp_path):
    bad = copy_with(ckpt, tmp_path / "tf", meta={"format": "tf"})
    refused_everywhere(bad, "format is 'tf'")
    missing = copy_with(ckpt, tmp_path / "none", meta={})
    qconvert.load_model(missing, backend="reference", device="cpu")  # a loader accepts a file without it
    from qconvert.convert.verify import verify_checkpoint

    with pytest.raises(FormatError, match="lacks \"format\": \"pt\""):  # the conformance check does not
        verify_checkpoint(missing)


def test_s9_unknown_layout_version_refused_quantizer_version_ignored(ckpt, tmp_path):
    from safetensors import safe_open

    with safe_open(str(ckpt / "model.safetensors"), "pt") as h:
        meta = h.metadata()
    assert meta["qconvert.layout_version"] == "1"
    refused_everywhere(copy_with(ckpt, tmp_path / "m2", meta=meta | {"qconvert.layout_version": "2"}), "layout version '2'")
    refused_everywhere(copy_with(ckpt, tmp_path / "c2", config=lambda c: c["qconvert"].update(layout_version="1.1")), "layout version '1.1'")
    other = copy_with(ckpt, tmp_path / "q7", meta=meta | {"qconvert.quantizer_version": "7"},
                      config=lambda c: c["qconvert"].update(quantizer_version="7"))
    from qconvert.convert.verify import verify_checkpoint

    assert verify_checkpoint(other)["ok"]


# ---------------------------------------------------------------- section 9: the key set
def test_s9_unknown_entry_of_a_quantized_weight_refused(ckpt, tmp_path):
    k = "model.layers.0.mlp.up_proj.weight"
    bad = copy_with(ckpt, tmp_path / "extra", edit=lambda sd: sd.update({k + ".bias_correction": torch.zeros(3)}))
    refused_everywhere(bad, r"up_proj\.weight\.bias_correction' is not an entry", r"up_proj\.weight\.bias_correction")
    other = copy_with(ckpt, tmp_path / "qs", edit=lambda sd: sd.update({k + ".quant_state.extra": torch.zeros(3, dtype=torch.uint8)}))
    refused_everywhere(other, r"quant_state\.extra' is not an entry", r"up_proj\.weight")


def test_s9_orphan_companion_refused(ckpt, tmp_path):
    k = "model.layers.0.self_attn.o_proj.weight"
    bad = copy_with(ckpt, tmp_path / "orphan", edit=lambda sd: sd.pop(k + ".quant_state.bitsandbytes__nf4"))
    refused_everywhere(bad, r"o_proj\.weight\.absmax' is a 4-bit companion entry, but .* has no quant-state", r"o_proj\.weight")


def test_s9_nested_entries_without_nested_fields_refused():
    sd = quantize_4bit_ref(torch.randn(64), "nf4", 32, False).state_dict("w")
    sd["w.nested_absmax"] = torch.ones(1)
    with pytest.raises(FormatError, match="nested_absmax' is present but the quant-state has no nested_"):
        QuantizedTensor.from_state_dict("w", sd)


# ---------------------------------------------------------------- section 9: config.json
@pytest.mark.parametrize("change, match", [
    ({"bnb_4bit_quant_type": "fp4"}, "bnb_4bit_quant_type is 'fp4'"),
    ({"bnb_4bit_use_double_quant": False}, "bnb_4bit_use_double_quant is False"),
    ({"bnb_4bit_quant_storage": "bfloat16"}, "bnb_4bit_quant_storage is 'bfloat16'"),
])
def test_s9_config_disagreement_refused(ckpt, tmp_path, change, match):
    refused_everywhere(copy_with(ckpt, tmp_path / "c", config=lambda c: c["quantization_config"].update(change)), match)


def test_s9_absent_config_keys_take_the_quant_states(ckpt, tmp_path):
    """Older files lack keys: the loader takes the type and double quantization from the weights."""
    def drop(c):
        for key in ("bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage"):
            c["quantization_config"].pop(key)

    m = qconvert.load_model(copy_with(ckpt, tmp_path / "old", config=drop), backend="reference", device="cpu")
    assert m.model.layers[0].mlp.up_proj.quant_type == "nf4"


def test_s9_index_totals_are_not_used_for_reading(tmp_path):
    """A loader neither needs nor trusts metadata.total_size / total_parameters; verify checks
    total_size (a writer's MUST) and ignores total_parameters."""
    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.convert.verify import verify_checkpoint

    quantize_checkpoint(str(make_tiny_llama(tmp_path / "src", hidden=32, intermediate=48, layers=2, vocab=64)), tmp_path / "q",
                        max_shard_size="20KB")
    idx = tmp_path / "q" / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    assert len(set(data["weight_map"].values())) > 1
    with torch.no_grad():
        want = qconvert.load_model(tmp_path / "q", backend="reference", device="cpu")(IDS).logits
    data["metadata"]["total_parameters"] = 12345
    idx.write_text(json.dumps(data))
    assert verify_checkpoint(tmp_path / "q")["ok"]
    data["metadata"]["total_size"] += 1
    idx.write_text(json.dumps(data))
    with pytest.raises(FormatError, match="total_size"):
        verify_checkpoint(tmp_path / "q")
    del data["metadata"]
    idx.write_text(json.dumps(data))
    with torch.no_grad():
        got = qconvert.load_model(tmp_path / "q", backend="reference", device="cpu")(IDS).logits
    assert torch.equal(got, want)


# ---------------------------------------------------------------- section 3: the table recipes
def test_s3_table_recipes_need_float32_end_points():
    """The NF4 and dynamic-map recipes reproduce the normative bits with the linspace end points
    rounded to float32 first; keeping 0.9677083 as a double changes an NF4 entry."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_formats
    finally:
        sys.path.pop(0)
    assert torch.equal(torch.tensor(make_formats.nf4_values()), codebook("nf4"))
    assert torch.equal(torch.tensor(make_formats.dynamic_map_values()), dynamic_map())
    assert not torch.equal(torch.tensor(make_formats.nf4_values(round_ends=False)), codebook("nf4"))
    for n in (2, 3, 8, 9, 17, 65):
        assert make_formats.linspace_f32(0.1, 1.0, n) == torch.linspace(0.1, 1.0, n).tolist()


# ---------------------------------------------------------------- verify's error figures
def test_verify_error_figures_use_the_logical_value(ckpt):
    """verify --against measures the error of the weights every consumer computes with."""
    from qconvert.convert.verify import verify_checkpoint

    src = ckpt.parent / "src"
    report = verify_checkpoint(ckpt, against=str(src))["error"]
    c, s = Checkpoint(ckpt), Checkpoint(src)
    for t in report["tensors"][:3]:
        w = s.get(t["name"]).double()
        d = dequantize_4bit_ref(c.quantized(t["name"])).double()
        assert t["rel_error"] == pytest.approx(((w - d).norm() / w.norm()).item(), rel=REPORTED_FIGURE_REL)
