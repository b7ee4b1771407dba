"""Write formats/golden/vectors.json: small inputs with their exact expected bytes.

    python tools/make_golden.py           # regenerate
    python tools/make_golden.py --check   # exit 1 if the file differs from a fresh build

Each vector holds the raw little-endian input bytes, the packed codes, the block scales, the
quant-state JSON and the exact dequantized bytes, computed by qconvert's reference implementation.
tests/test_golden.py recomputes every vector with the reference AND with bitsandbytes.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

from qconvert.format.layout import dtype_name
from qconvert.quant.reference import dequantize_4bit_ref, quantize_4bit_ref

OUT = Path(__file__).resolve().parent.parent / "formats" / "golden" / "vectors.json"
OUT_EXPERTS = OUT.parent / "experts.json"  # spec section 14: fused [E, out, in] routed-expert stacks


def tensor_hex(t: torch.Tensor) -> str:
    t = t.contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes().hex()


def f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def inputs() -> list[tuple[str, torch.Tensor, str, int, bool]]:
    g = torch.Generator().manual_seed(1234)
    cases = []
    # 1. the worked example of spec section 3.4: five values, one ragged block, odd count (pad nibble)
    cases.append(("worked_example_nf4", torch.tensor([0.5, -1.25, 2.0, 0.0, 0.0999], dtype=torch.float32), "nf4", 64, False))
    # 2. bf16 random, ragged (130 = 2*64 + 2), double quant
    cases.append(("bf16_ragged_dq", torch.randn(10, 13, generator=g).to(torch.bfloat16), "nf4", 64, True))
    # 3. values exactly on NF4 midpoints (times absmax 1), zeros, and +/-1: tie rule
    from qconvert.format.constants import quantize_midpoints

    mids, _ = quantize_midpoints("nf4")
    tie = torch.cat([mids, -mids, torch.tensor([1.0, -1.0, 0.0, -0.0])])
    cases.append(("nf4_midpoint_ties", tie, "nf4", 32, False))
    # 4. FP4: tiny positives and negatives around the two zeros, midpoints, a ragged tail
    mids4, _ = quantize_midpoints("fp4")
    fp4 = torch.cat([mids4, torch.tensor([1e-4, -1e-4, 0.0, 1.0, -1.0, 0.003, -0.003, 0.5])])
    cases.append(("fp4_ties_and_zeros", fp4, "fp4", 32, False))
    # 5. subnormals, a huge outlier and an all-zero block
    sub = torch.cat([
        torch.full((32,), f32(0x00000001)), torch.linspace(-1e-40, 1e-40, 32),
        torch.randn(31, generator=g), torch.tensor([3.0e38]), torch.zeros(32),
    ])
    cases.append(("subnormal_outlier_zero", sub, "nf4", 32, True))
    # 6. fp16 with 257 blocks of 32: two nested blocks (256 + 1), the second ragged
    cases.append(("fp16_two_nested_blocks", (torch.randn(257 * 32, generator=g) * 0.02).to(torch.float16), "nf4", 32, True))
    # 7. fp4 double quant, blocksize 128, 2-D odd shape
    cases.append(("fp4_dq_odd_shape", torch.randn(7, 37, generator=g), "fp4", 128, True))
    # 8. spec 1.1 section 8, the float32-output reading: a bfloat16 weight whose float32 products mostly
    #    differ from their bfloat16 roundings; "dequantized_float32" is the bfloat16 value widened
    cases.append(("bf16_float32_output", (torch.randn(6, 50, generator=g) * 0.1).to(torch.bfloat16), "nf4", 32, False))
    # 9. spec 1.1 sections 3.1 and 11, FP4's zero: nibble 0x8 is +0.0, so it dequantizes to +0.0 under a
    #    positive scale (bitsandbytes' native CPU path gives -0.0 for this even row length) and, as
    #    every zero code does, to -0.0 under a negative decoded scale (block 0 here decodes to -0.0091)
    z = torch.zeros(100)
    z[0:6] = torch.tensor([0.01, 1e-7, 0.0, -1e-7, -0.0, 2e-5])
    z[32:38] = torch.tensor([0.5, 1e-7, 0.0, -1e-7, 1e-3, -0.25])
    z[64], z[96:100] = 4.0169491767883301, torch.tensor([0.5, 1e-5, 0.0, -0.25])
    cases.append(("fp4_signed_zero", z.reshape(2, 50), "fp4", 32, True))
    return cases


def build() -> str:
    vectors = []
    for name, x, qtype, bs, dq in inputs():
        qt = quantize_4bit_ref(x, qtype, bs, dq, name=name)
        v = {
            "name": name,
            "quant_type": qtype,
            "blocksize": bs,
            "double_quant": dq,
            "dtype": dtype_name(x.dtype),
            "shape": list(x.shape),
            "input": tensor_hex(x),
            "packed": tensor_hex(qt.packed),
            "absmax": tensor_hex(qt.absmax),
            "quant_state": qt.quant_state_dict(),
            "dequantized": tensor_hex(dequantize_4bit_ref(qt)),
            "dequantized_float32": tensor_hex(dequantize_4bit_ref(qt, torch.float32)),
        }
        if dq:
            v["nested_absmax"] = tensor_hex(qt.nested_absmax)
        vectors.append(v)
    doc = {
        "description": "Golden vectors: raw little-endian hex of input, packed codes ([(n+1)//2, 1] uint8), "
        "absmax (uint8 with double quant, else float32), nested_absmax (float32), and the dequantized "
        "tensor in the input dtype (its logical dtype), and dequantized_float32: that logical value "
        "widened to float32, the float32 output every reader produces (spec 1.1 section 8; NOT the float32 "
        "product before rounding). Produced by the reference quantizer (quantizer version 1).",
        "vectors": vectors,
    }
    return json.dumps(doc, indent=1) + "\n"


def expert_inputs() -> list[tuple[str, torch.Tensor, str, int, bool]]:
    """Fused [E, out, in] stacks (spec section 14.2): each expert a whole number of blocks."""
    g = torch.Generator().manual_seed(2020)
    scale = torch.tensor([1.0, 0.01, 30.0]).reshape(3, 1, 1)  # experts of very different ranges share nested blocks
    return [
        ("experts_bf16_dq", (torch.randn(3, 4, 32, generator=g) * scale).to(torch.bfloat16), "nf4", 64, True),
        ("experts_f32_plain", torch.randn(2, 8, 16, generator=g), "nf4", 32, False),
        # 6 experts of 12 x 128 = 48 blocks of 32 each: expert 5's scales (240..287) straddle the nested
        # block boundary at 256, so its scales decode from two nested absmax values
        ("experts_fp16_two_nested", (torch.randn(6, 12, 128, generator=g) * 0.02).to(torch.float16), "nf4", 32, True),
    ]


def build_experts() -> str:
    vectors = []
    for name, x, qtype, bs, dq in expert_inputs():
        qt = quantize_4bit_ref(x, qtype, bs, dq, name=name)
        n_e = x[0].numel()
        v = {
            "name": name, "quant_type": qtype, "blocksize": bs, "double_quant": dq, "dtype": dtype_name(x.dtype),
            "shape": list(x.shape), "expert_code_bytes": n_e // 2, "expert_blocks": n_e // bs,
            "input": tensor_hex(x), "packed": tensor_hex(qt.packed), "absmax": tensor_hex(qt.absmax),
            "quant_state": qt.quant_state_dict(), "dequantized": tensor_hex(dequantize_4bit_ref(qt)),
        }
        if dq:
            v["nested_absmax"] = tensor_hex(qt.nested_absmax)
        vectors.append(v)
    doc = {
        "description": "Golden vectors of the routed-experts extension (spec section 14): a fused [E, out, in] "
        "stack stored as one 4-bit weight over its expert-major flattening, each expert a whole number of "
        "blocks; expert e's codes are packed bytes [e*expert_code_bytes, (e+1)*expert_code_bytes) and its "
        "block scales absmax entries [e*expert_blocks, (e+1)*expert_blocks). Fields as in vectors.json.",
        "vectors": vectors,
    }
    return json.dumps(doc, indent=1) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    for out, text in ((OUT, build()), (OUT_EXPERTS, build_experts())):
        if args.check:
            if not out.exists() or out.read_text() != text:
                print(f"formats/golden/{out.name} is stale: run python tools/make_golden.py", file=sys.stderr)
                return 1
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out.relative_to(out.parents[2])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
