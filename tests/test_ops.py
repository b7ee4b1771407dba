"""qconvert's custom ops (torch.ops.qconvert.*): opcheck on each op and kernel, the kernels following
the tensors' device, forced kernels through the same op (and its one backward), torch.compile of a 4-bit layer."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qconvert import ops
from qconvert.errors import QuantizationError
from qconvert.nn.linear4bit import Linear4bit
from qconvert.ops import reference as reference_kernels
from qconvert.ops.args import weight_args
from qconvert.ops.triton import kernels as triton_kernels
from qconvert.quant import fast_dequant, reference
from qconvert.quant.reference import dequantize_4bit_ref, quantize_4bit_ref
from tolerances import FLOAT32_SAME_MATH_REL, GEMV_REL

#: the fused small-batch matmul's tolerance (as tests/test_kernels.py GEMV_TOL, float32)
GEMV_TOL = GEMV_REL[torch.float32]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weight(shape=(20, 70), dtype=torch.float32, dq=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return quantize_4bit_ref((torch.randn(shape, generator=g) * 2).to(dtype), "nf4", 64, dq)


@pytest.mark.slow
@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("logical", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_dequantize(dq, logical):
    qt = weight(dtype=logical, dq=dq)
    for out in (torch.float32, torch.bfloat16):
        args = (*weight_args(qt), out)
        torch.library.opcheck(torch.ops.qconvert.dequantize_4bit.default, args)
        assert torch.equal(torch.ops.qconvert.dequantize_4bit(*args), dequantize_4bit_ref(qt, out))


@pytest.mark.slow
@pytest.mark.parametrize("dq", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_matmul(dq, bias):
    """Forward, the registered autograd (input and bias gradients) and the fake implementation."""
    qt = weight(dq=dq)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 70, generator=g, requires_grad=True)
    b = torch.randn(20, generator=g, requires_grad=True) if bias else None
    args = (x, *weight_args(qt), b)
    torch.library.opcheck(torch.ops.qconvert.matmul_4bit.default, args)
    y = torch.ops.qconvert.matmul_4bit(*args)
    w = dequantize_4bit_ref(qt, torch.float32)
    want = torch.nn.functional.linear(x, w, b)
    assert rel(y, want) < GEMV_TOL  # 3 rows: the compiled fused kernel where it builds (the same bits on the torch path)
    y.square().sum().backward()
    gx, gb = x.grad.clone(), None if b is None else b.grad.clone()
    x.grad = None
    if b is not None:
        b.grad = None
    want.square().sum().backward()
    assert rel(gx, x.grad) < GEMV_TOL  # d(y^2)/dy = 2y: y's own difference carries over
    if b is not None:
        assert rel(gb, b.grad) < GEMV_TOL


@pytest.mark.slow
@pytest.mark.parametrize("dq", [True, False])
def test_opcheck_quantize_is_the_reference(dq):
    """The CPU kernel (the fast quantizer) and the default (the reference) give the same bytes."""
    g = torch.Generator().manual_seed(2)
    for x in (torch.randn(33, 65, generator=g), torch.randn(7, generator=g).bfloat16()):
        args = (x, "nf4", 64, dq, "w")
        torch.library.opcheck(torch.ops.qconvert.quantize_4bit.default, args)
        got = torch.ops.qconvert.quantize_4bit(*args)
        want = reference_kernels.quantize_reference(*args)
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(got, want))
        qt = quantize_4bit_ref(x, "nf4", 64, dq)
        assert torch.equal(got[0], qt.packed) and torch.equal(got[1], qt.absmax)
        assert got[5].item() == (qt.nested_offset if dq else 0.0)
        via = triton_kernels.quantize_via_cpu(*args)  # the CUDA kernel: the CPU one, results copied back
        assert all(a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(via, want))


@pytest.mark.slow
def test_conversion_goes_through_the_quantize_op(tmp_path, monkeypatch):
    """quantize_checkpoint calls the op, which takes the fast CPU kernel, even when a GPU is
    present: never the slow reference on a GPU, and no tensor is moved to one."""
    from helpers import make_tiny_llama

    from qconvert.convert.quantize import quantize_checkpoint
    from qconvert.quant import fast_cpu

    seen = []
    fast = fast_cpu.quantize_4bit_fast

    def counted(x, *a, **k):
        seen.append(x.device.type)
        return fast(x, *a, **k)

    def no_reference(*a, **k):
        raise AssertionError("the reference quantizer ran")

    monkeypatch.setattr(fast_cpu, "quantize_4bit_fast", counted)
    monkeypatch.setattr(reference, "quantize_4bit_ref", no_reference)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    src = make_tiny_llama(tmp_path / "src")
    quantize_checkpoint(str(src), tmp_path / "q")
    assert seen and set(seen) == {"cpu"}


def test_opcheck_triton_kernels_in_the_interpreter():
    """The CUDA kernels (Triton), standing in on CPU tensors under TRITON_INTERPRET=1: opcheck, and
    the same numbers as the reference (dequantize bit-exact; the fused matmul within GEMV_TOL)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the CUDA kernels run on CUDA here (test_moved_to_cuda_uses_triton)")
    qt = weight(shape=(8, 64), dtype=torch.bfloat16)
    x = torch.randn(2, 64, requires_grad=True)
    with ops.stand_in("cpu"):
        dargs = (*weight_args(qt), torch.float32)
        torch.library.opcheck(torch.ops.qconvert.dequantize_4bit.default, dargs, test_utils=("test_schema", "test_faketensor"))
        assert torch.equal(torch.ops.qconvert.dequantize_4bit(*dargs), dequantize_4bit_ref(qt, torch.float32))
        margs = (x, *weight_args(qt), None)
        torch.library.opcheck(torch.ops.qconvert.matmul_4bit.default, margs,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        y = torch.ops.qconvert.matmul_4bit(*margs)
    assert rel(y, x @ dequantize_4bit_ref(qt, torch.float32).T) < GEMV_TOL


def test_quantize_op_on_the_triton_kernel_in_the_interpreter():
    """quantize_4bit's CUDA kernel (Triton codes and scales, double quantization on the CPU path),
    standing in on CPU tensors: opcheck, and the reference's bytes, nested offset included."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("the CUDA kernel runs on CUDA here (tests/test_kernels.py)")
    g = torch.Generator().manual_seed(4)
    for x, dq in ((torch.randn(33, 65, generator=g), True), (torch.randn(7, generator=g).bfloat16(), True),
                  (torch.randn(3, 130, generator=g).half(), False)):
        args = (x, "nf4", 64, dq, "w")
        want = reference_kernels.quantize_reference(*args)
        with ops.stand_in("cpu"):
            torch.library.opcheck(torch.ops.qconvert.quantize_4bit.default, args, test_utils=("test_schema", "test_faketensor"))
            got = torch.ops.qconvert.quantize_4bit(*args)
        assert all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(got, want)), dq
    with ops.stand_in("cpu"), pytest.raises(QuantizationError, match="NaN or Inf"):
        torch.ops.qconvert.quantize_4bit(torch.tensor([1.0, float("nan")]), "nf4", 64, True, "w")


@pytest.mark.slow
def test_import_registers_lazily():
    """Importing qconvert and its packages does not register the ops; importing qconvert.ops does,
    without Triton or CUDA."""
    probe = (
        "import sys, torch, qconvert, qconvert.nn, qconvert.model, qconvert.run, qconvert.convert\n"
        "before = hasattr(torch.ops.qconvert, 'matmul_4bit')\n"
        "import qconvert.ops\n"
        "print(before, hasattr(torch.ops.qconvert, 'matmul_4bit'), 'triton' in sys.modules, torch.cuda.is_initialized())\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True", "False", "False"]


class Calls:
    """Counts which kernel family computed (patched into the functions the registered kernels call)."""

    def __init__(self, monkeypatch):
        self.n = {"reference": 0, "cpu": 0, "triton": 0}
        ref, fast, tri = reference.dequantize_4bit_ref, fast_dequant.dequantize_4bit_fast, triton_kernels._triton

        def counted_ref(*a, **k):
            self.n["reference"] += 1
            return ref(*a, **k)

        def counted_fast(*a, **k):
            self.n["cpu"] += 1
            return fast(*a, **k)

        def counted_triton():
            self.n["triton"] += 1
            return tri()

        monkeypatch.setattr(reference, "dequantize_4bit_ref", counted_ref)  # every family looks it up at each call
        monkeypatch.setattr(triton_kernels, "_triton", counted_triton)
        from qconvert.ops.native import calls as native  # the compiled CPU kernels count as "cpu" when they compute

        for name in ("dequantize", "gemv", "gemv_prepared"):
            def counted_native(*a, _real=getattr(native, name), **k):
                out = _real(*a, **k)
                self.n["cpu"] += out is not None
                return out

            monkeypatch.setattr(native, name, counted_native)
        monkeypatch.setattr(fast_dequant, "dequantize_4bit_fast", counted_fast)

    def take(self) -> dict:
        n, self.n = self.n, {"reference": 0, "cpu": 0, "triton": 0}
        return n


def layer(backend, seed=0):
    qt = weight(seed=seed)
    b = torch.randn(20, generator=torch.Generator().manual_seed(seed))
    return Linear4bit(qt, b, backend, torch.float32)


def test_moved_model_follows_its_device(monkeypatch):
    """One auto-backend model, no rebinding: CPU tensors take the CPU kernels (fast_dequant); with
    the Triton kernels standing in for the CUDA ones on CPU tensors, the same module takes them; on
    the meta device, the fake kernel; forced backends ignore the device's kernels."""
    calls = Calls(monkeypatch)
    m = torch.nn.Sequential(layer("auto"))
    assert m[0].backend == "auto"
    x = torch.randn(3, 70)
    with torch.no_grad():
        y_cpu = m(x)
        assert calls.take() == {"reference": 0, "cpu": 1, "triton": 0}
        assert rel(y_cpu, torch.nn.functional.linear(x, m[0].dequantized(torch.float32), m[0].bias)) < GEMV_TOL
        calls.take()
        if not torch.cuda.is_available():
            pytest.importorskip("triton")
            with ops.stand_in("cpu"):
                y_cuda = m(x)
                assert calls.take() == {"reference": 0, "cpu": 0, "triton": 1}
            assert rel(y_cuda, y_cpu) < GEMV_TOL
            m(x)
            assert calls.take() == {"reference": 0, "cpu": 1, "triton": 0}  # back to the CPU kernels
        y_meta = m.to("meta")(x.to("meta"))
        assert y_meta.device.type == "meta" and y_meta.shape == (3, 20)
        assert calls.take() == {"reference": 0, "cpu": 0, "triton": 0}
        forced = layer("reference")
        if not torch.cuda.is_available():
            with ops.stand_in("cpu"):
                forced(x)
            assert calls.take() == {"reference": 1, "cpu": 0, "triton": 0}


def test_backward_through_the_op_keeps_no_dequantized_weight():
    """The op's autograd saves the module's own tensors only: no weight-shaped float copy."""
    m = layer("auto")
    own = {t.untyped_storage().data_ptr() for t in list(m.parameters()) + list(m.buffers())}
    saved = []

    def pack(t):
        if t.dtype.is_floating_point and t.untyped_storage().data_ptr() not in own and t.dim() == 2 and 20 in t.shape and 70 in t.shape:
            saved.append(tuple(t.shape))
        return t

    x = torch.randn(3, 70, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    y.sum().backward()
    assert saved == [] and x.grad.shape == (3, 70)
    assert torch.allclose(x.grad, torch.ones(3, 20) @ m.dequantized(torch.float32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_moved_to_cuda_uses_triton(monkeypatch):
    pytest.importorskip("triton")
    calls = Calls(monkeypatch)
    m = layer("auto")
    x = torch.randn(3, 70, requires_grad=True)
    y_cpu = m(x)
    y_cpu.sum().backward()
    g_cpu = x.grad
    assert calls.take() == {"reference": 0, "cpu": 2, "triton": 0}
    m.to("cuda")
    xc = x.detach().cuda().requires_grad_()
    y = m(xc)
    y.sum().backward()
    assert calls.take() == {"reference": 0, "cpu": 0, "triton": 2}
    assert rel(y.cpu(), y_cpu) < GEMV_TOL and rel(xc.grad.cpu(), g_cpu) < FLOAT32_SAME_MATH_REL


COMPILE = r"""
import sys, torch
import torch._dynamo
torch._dynamo.config.disable = False
from qconvert.nn.linear4bit import Linear4bit
from qconvert.quant.reference import quantize_4bit_ref

backend = sys.argv[1]
g = torch.Generator().manual_seed(0)
qt = quantize_4bit_ref(torch.randn(20, 70, generator=g).bfloat16(), "nf4", 64, True)
m = Linear4bit(qt, torch.randn(20, generator=g), "auto", torch.float32)
lora = torch.nn.Linear(70, 20, bias=False)

def f(x):
    return (m(x) + lora(x)).square().sum()

out = []
for fn in (f, torch.compile(f, fullgraph=True, backend=backend)):
    lora.zero_grad()
    x = torch.randn(5, 70, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = fn(x)
    loss.backward()
    out.append((loss.detach(), x.grad, lora.weight.grad.clone()))
(l0, gx0, gw0), (l1, gx1, gw1) = out
from torch._dynamo.utils import counters
ok = [counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], torch.allclose(l1, l0, rtol=1e-5), torch.allclose(gx1, gx0, rtol=1e-5, atol=1e-6), torch.allclose(gw1, gw0, rtol=1e-5, atol=1e-6)]
with torch.no_grad():  # inference: the layer's no-gradient path steps aside under tracing, the op is one node
    y = torch.compile(lambda x: m(x) * 2, fullgraph=True, backend=backend)(x)
    ok.append(torch.allclose(y, m(x) * 2, rtol=1e-5, atol=1e-6) and not counters["graph_break"])
print(ok)
"""


def _compile(backend: str):
    env = {k: v for k, v in __import__("os").environ.items() if k != "TORCHDYNAMO_DISABLE"}
    r = subprocess.run([sys.executable, "-c", COMPILE, backend], check=False, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip().splitlines()[-1] == "[True, True, True, True, True]", r.stdout


@pytest.mark.slow
def test_compile_forward_and_backward_fullgraph():
    """torch.compile(fullgraph=True) of a 4-bit layer plus a LoRA-like layer, forward and backward,
    through Dynamo and AOTAutograd (the op is one opaque node with its fake and autograd): equals eager;
    and the layer alone under no_grad (where eager takes the no-gradient path)."""
    _compile("aot_eager")


@pytest.mark.slow
def test_compile_forward_and_backward_inductor():
    """The same with Inductor (generates and compiles C++ on CPU: slow here)."""
    _compile("inductor")
