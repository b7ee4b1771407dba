"""qconvert's compiled CPU kernels: a C dequantizer and a fused small-batch dequantize-and-multiply.

- ``nf4.c``: the kernels (no torch headers; OpenMP over coarse chunks);
- :mod:`.build`: the build into a per-user cache, the trust checks, the fallback;
- :mod:`.calls`: the checked Python calls (None where the torch path must run).

qconvert.ops.cpu.kernels tries them first for CPU tensors; where they cannot be built or cannot read a
weight, the torch path (qconvert.quant.fast_dequant) runs, bit-identical. ``python -m
qconvert.ops.native`` builds them ahead of time (tools/setup.sh) and says what it found.
Importing this package builds nothing.
"""
