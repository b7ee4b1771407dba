"""Regenerate the machine-readable tables in formats/ from first principles.

    python tools/make_formats.py            # rewrite formats/codebooks.json and formats/dynamic_map.json
    python tools/make_formats.py --check    # exit 1 if the files on disk differ from a fresh build

The tables are derived, not typed in: NF4 from quantiles of the standard normal (scipy), FP4 from
its E2M1 bit layout, the 8-bit dynamic map from its exponent/fraction construction. Every value is
rounded to float32 exactly where the construction that the ecosystem uses rounds it, so the bit
patterns equal the ones bitsandbytes ships (tests/test_formats.py checks that against bitsandbytes).
The golden vectors (formats/golden/) are written by tools/make_golden.py.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

FORMATS = Path(__file__).resolve().parent.parent / "formats"


def f32_hex(x: float) -> str:
    return "0x%08x" % struct.unpack("<I", struct.pack("<f", x))[0]


def f32(x: float) -> float:
    """x rounded once to float32 (round to nearest, ties to even)."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def linspace_f32(start: float, end: float, n: int, round_ends: bool = True) -> list[float]:
    """torch.linspace in float32, as spec section 3.1 writes it down: the END POINTS are rounded to
    float32 first; step = float32((end - start) / (n - 1)); point i is float32(start + step * i) for
    i < n / 2 and float32(end - step * (n - 1 - i)) otherwise, each evaluated in double (exact here)
    and rounded once. ``round_ends=False`` keeps the end points as doubles: that variant does NOT
    reproduce the NF4 table (one entry differs), which is why the spec says to round them first."""
    if round_ends:
        start, end = f32(start), f32(end)
    step = f32((end - start) / (n - 1))
    return [f32(start + step * i) if i < n / 2 else f32(end - step * (n - 1 - i)) for i in range(n)]


def nf4_values(round_ends: bool = True) -> list[float]:
    """NF4: 8 positive and 7 negative normal quantiles plus an exact zero, scaled to [-1, 1].

    The positive half takes the quantiles at 9 evenly spaced probabilities from 0.9677083 down to 0.5
    (the last, 0.5, dropped); the negative half takes 8 from the same start (last dropped) and
    negates them. The asymmetry gives the table an exact zero and 16 entries.
    """
    from scipy.stats import norm

    offset = 0.9677083
    pos = norm.ppf(linspace_f32(offset, 0.5, 9, round_ends)[:-1]).tolist()
    neg = (-norm.ppf(linspace_f32(offset, 0.5, 8, round_ends)[:-1])).tolist()
    v = torch.tensor(pos + [0.0] + neg)  # float32, as the reference construction rounds
    v = v.sort().values
    v /= v.max()
    return v.tolist()


def fp4_values() -> list[float]:
    """FP4 (E2M1, no inf/nan) in nibble order, divided by its largest magnitude (12).

    Nibble bit 3 is the sign. The three magnitude bits are read as in the historical bitsandbytes
    table (create_fp8_map(signed=True, exponent_bits=2, precision_bits=1, total_bits=4)):
    0b000 -> 0, 0b001 -> 0.0625 (subnormal), 0b010 -> 8, 0b011 -> 12, 0b100 -> 4, 0b101 -> 6,
    0b110 -> 2, 0b111 -> 3. Nibble 0x8 is +0.0, not -0.0, as in that table.
    """
    magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    vals = magnitudes + [-m if m != 0.0 else 0.0 for m in magnitudes]
    t = torch.tensor(vals, dtype=torch.float32)
    t /= t.abs().max()
    return t.tolist()


def dynamic_map_values(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> list[float]:
    """The signed 8-bit 'dynamic' map used for double quantization (Dettmers, 8-bit approximations).

    For exponent level i in 0..6 there are 2**i fraction steps: the midpoints of a float32
    linspace(0.1, 1, 2**i + 1) multiplied in float32 by 10**(i - 6), with both signs. Levels give 2 * 127 = 254
    values; 0 and 1.0 complete the 256, which are sorted ascending.
    """
    data: list[float] = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        n = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        b = torch.tensor(linspace_f32(0.1, 1.0, n), dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()  # scaled in float32, as the original construction does
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    assert len(data) == 2**total_bits
    return torch.tensor(data, dtype=torch.float32).tolist()


def build() -> dict[str, str]:
    nf4 = nf4_values()
    fp4 = fp4_values()
    fp4_t = torch.tensor(fp4)
    # Quantization visits the codebook in ascending value order; torch's argsort on CPU puts the
    # +0.0 of nibble 0x0 before the +0.0 of nibble 0x8. This order is normative (spec 6.3).
    fp4_order = torch.argsort(fp4_t).tolist()
    codebooks = {
        "description": "4-bit codebooks, indexed by nibble value. 'bits' are IEEE-754 float32 bit patterns "
        "and are normative; 'values' are the same numbers as decimal for reading.",
        "nf4": {"bits": [f32_hex(v) for v in nf4], "values": nf4, "quantize_order": list(range(16))},
        "fp4": {"bits": [f32_hex(v) for v in fp4], "values": fp4, "quantize_order": fp4_order},
    }
    dyn = dynamic_map_values()
    dynamic = {
        "description": "Signed 8-bit dynamic map for double quantization of absmax, indexed by the uint8 "
        "code, ascending. 'bits' are float32 bit patterns and are normative.",
        "bits": [f32_hex(v) for v in dyn],
        "values": dyn,
    }
    return {
        "codebooks.json": json.dumps(codebooks, indent=1) + "\n",
        "dynamic_map.json": json.dumps(dynamic, indent=1) + "\n",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    bad = 0
    for name, text in build().items():
        path = FORMATS / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                print(f"formats/{name} is stale: run python tools/make_formats.py", file=sys.stderr)
                bad = 1
        else:
            path.write_text(text)
            print(f"wrote formats/{name}")
    return bad


if __name__ == "__main__":
    sys.exit(main())
