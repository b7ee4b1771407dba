"""The fast CPU dequantizer (and the CPU matmul over it) against the reference: bit for bit on every
block size, quant type, dtype pair, with and without double quantization, on ragged and odd shapes,
on hostile stored bytes, and whichever worker count and chunking computes it."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from qconvert.names import BLOCKSIZES, QUANT_TYPES
from qconvert.format.constants import FLOAT_DTYPES, codebook
from qconvert.format.layout import QuantizedTensor
from qconvert.ops import reference as reference_kernels
from qconvert.ops.args import weight_args
from qconvert.ops.cpu import kernels as cpu_kernels
from qconvert.quant import fast_dequant
from qconvert.quant.fast_dequant import block_scales, dequantize_4bit_fast
from qconvert.quant.reference import dequantize_4bit_ref, quantize_4bit_ref
from tolerances import BF16_REL, FLOAT32_SAME_MATH_REL

#: element counts: tiny, odd (a half-used last byte), one short of and past a block, ragged past a chunk
SIZES = (1, 7, 63, 65, 4097)


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns: equal bits, not equal values (NaN == NaN, -0.0 != 0.0)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def sample(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Weights over a wide range of magnitudes, with a zero run (a zero block where one fits)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 10.0 ** torch.randint(-3, 4, (n,), generator=g)
    x[n // 3 : n // 3 + 70] = 0.0
    return x.to(dtype)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 bytes: every test tensor spans several, so the chunk loop and its workers run."""
    monkeypatch.setattr(fast_dequant, "CHUNK_BYTES", 64)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_bit_identical_to_the_reference(blocksize, quant_type, small_chunks):
    """Every logical dtype asked as every dtype, double quant on and off, every size."""
    for n, logical, dq in itertools.product((*SIZES, 3 * blocksize + 5), FLOAT_DTYPES, (False, True)):
        qt = quantize_4bit_ref(sample(n, logical, n), quant_type, blocksize, dq)
        for dtype in FLOAT_DTYPES:
            want = dequantize_4bit_ref(qt, dtype)
            assert same(dequantize_4bit_fast(qt, dtype, workers=2), want), (n, logical, dq, dtype)
        assert same(dequantize_4bit_fast(qt), dequantize_4bit_ref(qt))  # no dtype: the logical one


def hostile(n: int, blocksize: int, dq: bool, seed: int) -> QuantizedTensor:
    """Stored bytes no quantizer writes: every byte value, scales with NaN, Inf, -0.0, subnormals and
    products that overflow the logical dtype."""
    g = torch.Generator().manual_seed(seed)
    nb = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2, 1), generator=g, dtype=torch.uint8)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45, 3e38, 7e4, 1.0])
    if dq:
        absmax = torch.randint(0, 256, (nb,), generator=g, dtype=torch.uint8)
        nested = torch.cat([special, torch.randn(-(-nb // 256), generator=g)])[: -(-nb // 256)]
        extra = {"nested_absmax": nested, "nested_quant_map": torch.randn(256, generator=g), "nested_offset": 0.25}
    else:
        absmax = torch.cat([special, torch.randn(nb, generator=g) * 100])[:nb]
        extra = {}
    return QuantizedTensor(packed=packed, absmax=absmax, shape=(n,), dtype=torch.bfloat16, quant_type="nf4",
                           blocksize=blocksize, quant_map=torch.randn(16, generator=g), **extra)


@pytest.mark.parametrize("dq", [False, True])
def test_bit_identical_on_hostile_bytes(dq, small_chunks):
    for n, blocksize in ((4097, 32), (8 * 256 * 32 + 33, 32), (9, 4096)):
        qt = hostile(n, blocksize, dq, seed=n)
        for logical, dtype in itertools.product(FLOAT_DTYPES, FLOAT_DTYPES):
            qt.dtype = logical
            assert same(dequantize_4bit_fast(qt, dtype, workers=3), dequantize_4bit_ref(qt, dtype)), (n, logical, dtype)


def test_decoded_scales_match_the_layouts():
    """block_scales' broadcast decoding of double-quant scales gives format.layout's bits, on a ragged
    nested block too."""
    from qconvert.format.layout import decoded_scales

    for nb in (1, 255, 256, 257, 1000):
        qt = hostile(nb * 64, 64, True, seed=nb)
        assert same(block_scales(qt), decoded_scales(qt)), nb


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_codebook_probe(quant_type):
    """The bytes 0x01, 0x23, ..., 0xEF with absmax 1.0 read back as the codebook, in order, through
    the CPU op: a wrong table or a swapped nibble order fails here."""
    table = codebook(quant_type)
    packed = torch.tensor([[0x01], [0x23], [0x45], [0x67], [0x89], [0xAB], [0xCD], [0xEF]], dtype=torch.uint8)
    qt = QuantizedTensor(packed=packed, absmax=torch.ones(1), shape=(16,), dtype=torch.float32, quant_type=quant_type,
                         blocksize=64, quant_map=table)
    got = torch.ops.qconvert.dequantize_4bit(*weight_args(qt), torch.float32)
    assert same(got, table.float())


def test_worker_counts_agree(small_chunks):
    qt = quantize_4bit_ref(sample(64 * 50 + 3, torch.float16, 5), "nf4", 64, True)
    want = dequantize_4bit_ref(qt, torch.float32)
    for workers in (1, 2, 5):
        assert same(dequantize_4bit_fast(qt, torch.float32, workers=workers), want), workers


def test_cpu_op_runs_the_fast_path(monkeypatch):
    """Without the compiled kernels (QCONVERT_CPU_KERNEL=torch), CPU tensors take the fast
    dequantizer, in dequantize_4bit, matmul_4bit and its backward."""
    monkeypatch.setenv("QCONVERT_CPU_KERNEL", "torch")
    calls = []
    real = fast_dequant.dequantize_4bit_fast

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(fast_dequant, "dequantize_4bit_fast", counted)
    qt = quantize_4bit_ref(sample(20 * 70, torch.bfloat16, 1).reshape(20, 70), "nf4", 64, True)
    args = weight_args(qt)
    assert same(torch.ops.qconvert.dequantize_4bit(*args, torch.float32), dequantize_4bit_ref(qt, torch.float32))
    x = torch.randn(3, 70, requires_grad=True)
    b = torch.randn(20, requires_grad=True)
    y = torch.ops.qconvert.matmul_4bit(x, *args, b)
    y.sum().backward()
    assert len(calls) == 3
    assert cpu_kernels.matmul_cpu is not reference_kernels.matmul_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matmul_and_input_gradient_match_the_reference(dtype):
    """Forward: the reference's F.linear over the same weight, so equal; the input gradient: the
    product with the reference weight computed in float64, within FLOAT32_SAME_MATH_REL in float32
    and BF16_REL in bfloat16."""
    qt = quantize_4bit_ref(sample(48 * 130, torch.bfloat16, 2).reshape(48, 130) * 0.01, "nf4", 64, True)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 130, generator=g).to(dtype).requires_grad_()
    b = torch.randn(48, generator=g).to(dtype)
    y = torch.ops.qconvert.matmul_4bit(x, *weight_args(qt), b)
    w = dequantize_4bit_ref(qt, dtype)
    assert same(y, torch.nn.functional.linear(x.detach(), w, b))
    grad = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(grad)
    want = (grad.double() @ w.double()).to(dtype)
    err = ((x.grad.double() - want.double()).norm() / want.double().norm()).item()
    assert err < (FLOAT32_SAME_MATH_REL if dtype == torch.float32 else BF16_REL)


def test_matmul_buffer_reuse_keeps_results_apart(monkeypatch):
    """Consecutive matmuls decode into one reused buffer: each result stays the reference's, and a
    weight over the limit (a new tensor each call) gives the same values. (Both paths: the torch
    one, and the compiled one past its fused kernel's rows.)"""
    if os.environ.get("QCONVERT_CPU_KERNEL") != "torch":
        monkeypatch.setattr(cpu_kernels, "GEMV_ROWS", {})
    g = torch.Generator().manual_seed(4)
    qts = [quantize_4bit_ref(torch.randn(40, 96, generator=g), "nf4", 64, dq) for dq in (True, False)]
    x = torch.randn(3, 96, generator=g)
    ys = [torch.ops.qconvert.matmul_4bit(x, *weight_args(qt), None) for qt in qts]
    for qt, y in zip(qts, ys):
        assert same(y, torch.nn.functional.linear(x, dequantize_4bit_ref(qt, torch.float32)))
    monkeypatch.setattr(cpu_kernels, "SCRATCH_LIMIT", 0)
    assert same(torch.ops.qconvert.matmul_4bit(x, *weight_args(qts[0]), None), ys[0])


def test_input_gradient_with_create_graph_stays_differentiable():
    """Backward with create_graph takes the differentiable path (dequantize, then a product): the
    same input gradient as the usual backward's grad_input_4bit, and it has a gradient itself."""
    qt = quantize_4bit_ref(sample(24 * 64, torch.float32, 6).reshape(24, 64) * 0.01, "nf4", 64, True)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(6), requires_grad=True)
    y = torch.ops.qconvert.matmul_4bit(x, *weight_args(qt), None)
    (plain,) = torch.autograd.grad((y ** 2).sum(), x, retain_graph=True)
    (graphed,) = torch.autograd.grad((y ** 2).sum(), x, create_graph=True)
    assert graphed.requires_grad and same(graphed.detach(), plain)
    graphed.sum().backward()
    w = dequantize_4bit_ref(qt, torch.float32)  # d/dx sum(2 (x W^T) W) = 2 * (1 W^T) W per row
    want = 2 * (torch.ones(5, 64) @ w.T) @ w
    assert ((x.grad - want).norm() / want.norm()).item() < FLOAT32_SAME_MATH_REL


@pytest.mark.slow
def test_opcheck_grad_input():
    qt = quantize_4bit_ref(sample(20 * 70, torch.bfloat16, 8).reshape(20, 70), "nf4", 64, True)
    g = torch.randn(3, 20, generator=torch.Generator().manual_seed(8))
    args = (g, *weight_args(qt))
    torch.library.opcheck(torch.ops.qconvert.grad_input_4bit.default, args)
    assert same(torch.ops.qconvert.grad_input_4bit(*args), g @ dequantize_4bit_ref(qt, torch.float32))


@pytest.mark.parametrize("damage", ["packed", "quant_map", "nested_quant_map"])
def test_not_the_layouts_sizes_falls_back_to_the_reference(damage):
    """Tensors of the wrong size are the reference's to judge: the same result or the same error."""
    qt = quantize_4bit_ref(sample(100, torch.float32, 4), "nf4", 64, True)
    setattr(qt, damage, getattr(qt, damage)[:-1])
    try:
        want = dequantize_4bit_ref(qt, torch.float32)
    except Exception as ref_error:  # noqa: BLE001 (whatever the reference raises, the fast path raises too)
        with pytest.raises(type(ref_error)):
            dequantize_4bit_fast(qt, torch.float32)
    else:
        assert same(dequantize_4bit_fast(qt, torch.float32), want)


@pytest.fixture(scope="module")
def tiny_quantized(tmp_path_factory):
    """A one-layer Llama (float32), its 4-bit checkpoint, and a hand-written LoRA adapter on v_proj."""
    import json

    from helpers import make_tiny_llama
    from safetensors.torch import save_file

    from qconvert.convert.quantize import quantize_checkpoint

    d = tmp_path_factory.mktemp("fastdq")
    src = make_tiny_llama(d / "src", hidden=64, intermediate=100, layers=1, dtype=torch.float32)
    quantize_checkpoint(str(src), d / "q")
    (d / "adapter").mkdir()
    (d / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["v_proj"], "task_type": "CAUSAL_LM"}))
    g = torch.Generator().manual_seed(7)
    module = "base_model.model.model.layers.0.self_attn.v_proj"
    save_file({f"{module}.lora_A.weight": torch.randn(2, 64, generator=g), f"{module}.lora_B.weight": torch.randn(32, 2, generator=g)},
              str(d / "adapter" / "adapter_model.safetensors"))
    return d


def counting(monkeypatch) -> list:
    """Calls of the torch path's dequantizer, with the compiled kernels switched off."""
    monkeypatch.setenv("QCONVERT_CPU_KERNEL", "torch")
    calls: list = []
    real = fast_dequant.dequantize_4bit_fast

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(fast_dequant, "dequantize_4bit_fast", counted)
    return calls


@pytest.mark.slow
def test_verify_against_uses_the_fast_path(tiny_quantized, monkeypatch):
    """verify --against dequantizes every 4-bit weight once, through the CPU op, to the reference's bits."""
    from qconvert.convert.verify import verify_checkpoint
    from qconvert.io.checkpoint import Checkpoint
    from tolerances import REPORTED_FIGURE_REL

    d = tiny_quantized
    calls = counting(monkeypatch)
    report = verify_checkpoint(d / "q", against=str(d / "src"))
    assert len(calls) == report["quantized"] == len(report["error"]["tensors"]) > 0
    ckpt, src = Checkpoint(d / "q"), Checkpoint(d / "src")
    first = report["error"]["tensors"][0]
    w = src.get(first["name"]).double()
    err = (w - dequantize_4bit_ref(ckpt.quantized(first["name"]), torch.float32).double()).pow(2).sum().item()
    assert first["rel_error"] == pytest.approx((err / w.pow(2).sum().item()) ** 0.5, rel=REPORTED_FIGURE_REL)


@pytest.mark.slow
def test_merge_uses_the_fast_path(tiny_quantized, monkeypatch, tmp_path):
    """merge dequantizes each 4-bit weight through the CPU op; the merged weights are the reference's
    dequantized values plus the LoRA update, bit for bit."""
    from safetensors.torch import load_file

    from qconvert.export.lora_merge import LoraAdapter
    from qconvert.export.merge import merge_adapter
    from qconvert.io.checkpoint import Checkpoint
    from qconvert.format.layout import find_quantized

    d = tiny_quantized
    calls = counting(monkeypatch)
    summary = merge_adapter(str(d / "q"), str(d / "adapter"), tmp_path / "m", dtype="float32")
    ckpt = Checkpoint(d / "q")
    names = find_quantized(ckpt.keys())
    assert len(calls) == len(names) > 0, summary
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    v = "model.layers.0.self_attn.v_proj.weight"
    delta = LoraAdapter(d / "adapter").delta("model.layers.0.self_attn.v_proj")
    assert same(merged[v], dequantize_4bit_ref(ckpt.quantized(v), torch.float32) + delta)
    for k in names:
        if k != v:
            assert same(merged[k], dequantize_4bit_ref(ckpt.quantized(k), torch.float32)), k
