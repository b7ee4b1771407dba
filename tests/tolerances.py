"""The named tolerances of the test-suite, one per kind of claim (tests/README.md explains each).

Bit-exact claims (codes, bytes, file contents, quant-state JSON, dequantized values against the
reference) use equality and have no constant here. Timing is never asserted.
"""

from __future__ import annotations

import torch

#: float32 math against a float32 reference that computes the same thing in another order (another
#: kernel, a merged against an unmerged weight, another library): relative error, ||a - b|| / ||b||
#: for tensors, |a - b| / |b| for a loss.
FLOAT32_REL = 1e-5
#: float32 results that differ only in summation order inside one op (a gradient by autograd against
#: one by hand, the same loss printed twice): relative.
FLOAT32_SAME_MATH_REL = 1e-6
#: gradients and trained weights after backward through a whole model in float32: relative.
GRAD_REL = 1e-4
#: a loss curve (or a trained model's loss) across process counts, or across backends that train
#: the same model: relative, per logged step.
LOSS_ACROSS_RUNS_REL = 1e-4
#: bfloat16 compute against a float32 reference (8 bits of mantissa): relative.
BF16_REL = 1e-2
#: a figure reported by qconvert and recomputed by the test from the same float64 numbers.
REPORTED_FIGURE_REL = 1e-12
#: the fused small-batch matmul (Triton kernel, the compiled CPU kernel of qconvert/ops/native, or
#: the torch op) against the float64 product with the reference weight, by the dtype of its input:
#: the output is rounded to that dtype once; float32 accumulation in another order.
GEMV_REL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
#: what a LoRA adapter changes in a model's logits, on the 16-bit model against on its NF4 model (the
#: same adapter, the base weights differing by the quantization error): relative. Measured 9.3e-3 on
#: test_conv1d.py's tiny GPT-2, whose NF4 logits are 6.3e-3 from the 16-bit ones (2026-12-01).
LORA_CHANGE_ACROSS_NF4_REL = 5e-2
#: llama.cpp running qconvert's F16 GGUF against transformers float32 on the same (dequantized) model:
#: max |a - b| over all logits / max |b| (F16 weights: 11 bits of mantissa; llama.cpp's kernels).
#: Measured 5.4e-4 (4-bit source), 6.0e-4 (16-bit source), 7.6e-4 (adapter merged) on test_gguf.py's
#: tiny Llama (2026-12-06); llama.cpp applying the --lora-only adapter to the base GGUF: 6.6e-4 from
#: transformers on the `qconvert merge` output, 1.2e-3 from llama.cpp on the merged GGUF; mistral 5.8e-4,
#: qwen2 6.0e-4, qwen3 9.0e-4 (16-bit sources). test_gguf_families.py (2026-12-06): gemma2 3.5e-4,
#: gemma3 9.8e-5, phi3 5.7e-4, llama with linear / yarn / llama3 rope 5.5e-4 / 5.6e-4 / 5.7e-4, qwen2 with
#: yarn 5.1e-4; from 4-bit checkpoints with 4-bit experts: mixtral 5.3e-4, qwen2_moe 4.8e-4, qwen3_moe 5.1e-4.
GGUF_F16_LOGIT_REL = {"f16": 2e-3}
#: mean KL(transformers float32 || llama.cpp on the GGUF) over the prompt's positions, by --type: the
#: cost of the type's rounding on test_gguf.py's tiny Llama, whose head is scaled x25 (very sensitive).
#: Measured (2026-12-06): bf16 3.6e-4, q8_0 2.8e-3, q4_0 1.11, q4_k_m 0.31; llama.cpp on the Q4_0 file
#: against transformers on that file's own dequantized values: 1.8e-3 (so the 1.11 is Q4_0's rounding).
GGUF_KL_MAX = {"bf16": 1e-3, "q8_0": 1e-2, "q4_0": 2.0, "q4_k_m": 0.6}
