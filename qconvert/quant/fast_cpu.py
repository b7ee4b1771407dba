"""A fast CPU path for 4-bit quantization, bit-identical to :mod:`qconvert.quant.reference`.

The reference bins every value with ``torch.bucketize``. Here a value in [-1, 1] first indexes a
table over a fine uniform grid (32768 cells, far narrower than the gap between any two midpoints)
that holds the bin of a point just below the cell's lower edge (a margin larger than the rounding
of the cell index), so the table never over-counts; one comparison with the next midpoint then
moves the bin up where needed. The result is the bucketize bin exactly (tests check every float32
value around every midpoint and cell edge). Work goes through the tensor in cache-sized chunks, and
non-finite input is detected from the block maxima instead of a separate pass. Block scales, the ragged
tail and double quantization reuse the reference's own functions, so there is one definition of the
math and this module only changes how fast the codes are found.
"""

from __future__ import annotations

import torch

from ..format.constants import codebook, quantize_midpoints
from ..format.layout import QuantizedTensor
from .reference import _TINY, absmax_blocks, check_quantizable, codes_for, double_quantize, pack_nibbles

#: Elements per chunk: about 1 MB of float32 working set.
CHUNK = 1 << 18


GRID = 1 << 15


class _Binner:
    """Tables for one quant type: the grid table, the midpoint above each bin, bin -> nibble order."""

    def __init__(self, quant_type: str):
        mids, order = quantize_midpoints(quant_type)
        self.order = order.to(torch.uint8)
        self.identity = bool(torch.equal(order, torch.arange(16)))
        self.upper = torch.cat([mids, torch.tensor([float("inf")])])  # midpoint above bin b
        # The cell index (v + 1) * GRID / 2 is computed in float32: at most 2**-9 of a cell too high.
        # Entry c counts the midpoints below edge_c - 2**-8 cells, so it never exceeds the true bin of
        # any value that lands in cell c, and falls short by at most one (cells are far narrower than
        # the gaps between midpoints).
        c = torch.arange(GRID + 1, dtype=torch.float64)
        below_edges = -1.0 + 2.0 * (c - 2.0**-8) / GRID
        self.grid = torch.bucketize(below_edges, mids.double())
        # the one midpoint that can still lie above the table's bin, looked up by the same cell index
        self.next_mid = self.upper[self.grid]
        self.grid_u8 = self.grid.to(torch.uint8)
        gaps = (mids[1:] - mids[:-1]).min().item()
        assert gaps > 4.0 / GRID, "midpoints closer than the grid can separate"

    def bins(self, scaled: torch.Tensor) -> torch.Tensor:
        """Number of midpoints strictly below each value (= torch.bucketize, right=False)."""
        cell = ((scaled + 1.0) * (GRID / 2)).long()
        return torch.take(self.grid, cell) + (torch.take(self.next_mid, cell) < scaled).long()

    def codes(self, scaled: torch.Tensor) -> torch.Tensor:
        cell = ((scaled + 1.0) * (GRID / 2)).long()
        b = torch.take(self.grid_u8, cell) + (torch.take(self.next_mid, cell) < scaled).to(torch.uint8)
        return b if self.identity else self.order[b.long()]


_BINNERS: dict[str, _Binner] = {}


def binner(quant_type: str) -> _Binner:
    if quant_type not in _BINNERS:
        _BINNERS[quant_type] = _Binner(quant_type)
    return _BINNERS[quant_type]


def quantize_4bit_fast(
    x: torch.Tensor,
    quant_type: str = "nf4",
    blocksize: int = 64,
    double_quant: bool = True,
    name: str = "tensor",
) -> QuantizedTensor:
    """Same result as :func:`qconvert.quant.reference.quantize_4bit_ref`, faster on CPU."""
    if x.device.type != "cpu":
        from .reference import quantize_4bit_ref

        return quantize_4bit_ref(x, quant_type, blocksize, double_quant, name)
    check_quantizable(x, name, quant_type, blocksize, check_finite=False)  # finiteness: from absmax below
    flat = x.detach().reshape(-1)
    n = flat.numel()
    full = n - n % blocksize
    search = binner(quant_type)
    nbytes = (n + 1) // 2
    packed = torch.empty(nbytes, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    # whole blocks, chunk by chunk (a chunk is a whole number of blocks, so an even count)
    step = max(blocksize, CHUNK - CHUNK % blocksize)
    for start in range(0, full, step):
        stop = min(start + step, full)
        body = flat[start:stop].to(torch.float32).view(-1, blocksize)
        am = body.abs().amax(dim=1)
        if not bool(torch.isfinite(am).all()):  # amax propagates NaN and Inf: one cheap check per chunk
            check_quantizable(x, name, quant_type, blocksize)  # raises, naming the first bad element
        absmax[start // blocksize : stop // blocksize] = am
        scaled = torch.clamp(body * (1.0 / am.clamp(min=_TINY)).unsqueeze(1), -1, 1).reshape(-1)
        packed[start // 2 : stop // 2] = pack_nibbles(search.codes(scaled)).reshape(-1)
    if full < n:  # the ragged last block: the reference's own code, on a handful of values
        tail_absmax, tail_scaled = absmax_blocks(flat[full:].to(torch.float32), blocksize)
        absmax[-1] = tail_absmax[0]
        if tail_scaled.numel() % 2:
            tail_scaled = torch.cat([tail_scaled, tail_scaled.new_zeros(1)])
        packed[full // 2 :] = pack_nibbles(codes_for(tail_scaled, quant_type)).reshape(-1)
    if not bool(torch.isfinite(absmax).all()):  # the ragged tail
        check_quantizable(x, name, quant_type, blocksize)
    qt = QuantizedTensor(
        packed=packed.reshape(-1, 1),
        absmax=absmax,
        shape=tuple(x.shape),
        dtype=x.dtype,
        quant_type=quant_type,
        blocksize=blocksize,
        quant_map=codebook(quant_type),
    )
    if double_quant:
        double_quantize(qt, name)
    return qt
