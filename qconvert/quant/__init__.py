"""The numbers: the one reference implementation of 4-bit quantization and dequantization
(:mod:`.reference`), and the fast CPU paths beside it that match it bit for bit (:mod:`.fast_cpu`,
:mod:`.fast_dequant`)."""
