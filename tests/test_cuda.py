"""The CUDA kernels against the CPU kernels (float32/float64) and against eager in float16/bfloat16.

Every case needs a GPU and a build with the CUDA kernels; without them each is skipped with the reason. CUDA is
queried only inside the `device` fixture, never at import. The device is parametrised over cuda:0 and cuda:1
(the latter skipped with fewer than two GPUs).

float16/bfloat16 rule: the fused op's largest error against a float32 reference (the same op on float32 copies
of the same inputs) is at most twice eager's own largest error in that dtype, plus a floor of a few units in the
last place of the dtype at the reference's scale (for outputs that eager happens to get exactly right).
"""

import os
import subprocess
import sys

import pytest
import torch

import fastmnist
from fastmnist import _lib
from fastmnist.reference import (
    conv_act_pool_reference,
    linear_act_reference,
    linear_cross_entropy_composition,
    sigmoid_bce_reference,
    softmax_cross_entropy_reference,
)

from helpers import assert_close, noncontiguous

ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh")
REDUCTIONS = ("none", "mean", "sum")
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(params=["cuda:0", "cuda:1"])
def device(request):
    if not _lib.LOADED:
        pytest.skip("fastmnist extension not built")
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available")
    if not _lib.WITH_CUDA:
        pytest.skip("fastmnist was built without its CUDA kernels")
    dev = torch.device(request.param)
    if dev.index >= torch.cuda.device_count():
        pytest.skip(f"{request.param} needs {dev.index + 1} GPUs, found {torch.cuda.device_count()}")
    return dev


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


def to(t, device, dtype=None):
    """A leaf copy of `t` on `device` (dtype kept for integer tensors), requiring grad when `t` does."""
    if t is None:
        return None
    out = t.detach().to(device=device, dtype=dtype if t.is_floating_point() and dtype is not None else t.dtype)
    return out.requires_grad_(t.requires_grad)


def run(fn, args, kwargs, grad_out_seed=0):
    """fn(*args, **kwargs) and the gradients of <out, g> for a fixed random g, for the args requiring grad."""
    out = fn(*args, **kwargs)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_out_seed), dtype=torch.float64)
    grads = torch.autograd.grad(out, leaves, g.to(out.device, out.dtype)) if leaves else ()
    return out, grads


def compare_with_cpu(fn, args, kwargs, device, dtype, equal_nan=False):
    """The op on `device` against the same op on the CPU (float32/float64): outputs and gradients."""
    cpu_args = [to(a, "cpu", dtype) if isinstance(a, torch.Tensor) else a for a in args]
    cpu_kwargs = {k: to(v, "cpu", dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    dev_args = [to(a, device, dtype) if isinstance(a, torch.Tensor) else a for a in args]
    dev_kwargs = {k: to(v, device, dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    out, grads = run(fn, dev_args, dev_kwargs)
    ref, ref_grads = run(fn, cpu_args, cpu_kwargs)
    assert out.device == device and out.dtype == dtype and out.shape == ref.shape
    assert_close(out.cpu(), ref, equal_nan=equal_nan)
    for g, r in zip(grads, ref_grads):
        assert g.device == device
        assert_close(g.cpu(), r, equal_nan=equal_nan)


def max_err(a, ref):
    return (a.double().cpu() - ref.double().cpu()).abs().max().item() if ref.numel() else 0.0


def compare_low_precision(fused, eager, args, kwargs, device, dtype):
    """fused in `dtype` vs fused in float32 (the reference), with eager in `dtype` setting the tolerance."""
    def on(d):
        return ([to(a, device, d) if isinstance(a, torch.Tensor) else a for a in args],
                {k: to(v, device, d) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    ref, ref_grads = run(fused, *on(torch.float32))
    out, grads = run(fused, *on(dtype))
    eager_out, eager_grads = run(eager, *on(dtype))
    assert out.dtype == dtype and out.shape == ref.shape
    ulp = torch.finfo(dtype).eps
    for a, e, r in [(out, eager_out, ref), *zip(grads, eager_grads, ref_grads)]:
        floor = 4 * ulp * (r.abs().max().item() if r.numel() else 0.0)
        assert max_err(a, r) <= 2 * max_err(e, r) + floor, (
            f"{dtype}: fused error {max_err(a, r):.3g} > 2 x eager error {max_err(e, r):.3g} + {floor:.3g}")


# ---------------------------------------------------------------- linear_act


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 7, 5), (33, 64, 10), (300, 100, 130)])
def test_linear_act_matches_cpu(device, gen, activation, dtype, shape):
    m, k, n = shape
    x = torch.randn(m, k, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.randn(n, k, generator=gen, dtype=torch.float64) / k**0.5).requires_grad_()
    b = torch.randn(n, generator=gen, dtype=torch.float64).requires_grad_()
    compare_with_cpu(fastmnist.linear_act, [x, w, b], dict(activation=activation, negative_slope=0.1), device, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", LOW)
def test_linear_act_low_precision(device, gen, activation, dtype):
    x = torch.randn(257, 96, generator=gen).requires_grad_()
    w = (torch.randn(40, 96, generator=gen) / 96**0.5).requires_grad_()
    b = torch.randn(40, generator=gen).requires_grad_()
    kw = dict(activation=activation, negative_slope=0.1)
    compare_low_precision(fastmnist.linear_act, linear_act_reference, [x, w, b], kw, device, dtype)


def test_linear_act_no_bias_noncontiguous_3d(device, gen):
    x = noncontiguous(torch.randn(3, 5, 24, generator=gen, dtype=torch.float64)).requires_grad_()
    w = torch.randn(17, 24, generator=gen, dtype=torch.float64).requires_grad_()
    compare_with_cpu(fastmnist.linear_act, [x, w, None], dict(activation="tanh"), device, torch.float64)


def test_linear_act_bias_grad_deterministic(device, gen):
    x = torch.randn(5000, 32, generator=gen, device="cpu").to(device)
    w = torch.randn(24, 32, generator=gen).to(device).requires_grad_()
    b = torch.randn(24, generator=gen).to(device).requires_grad_()
    g = torch.randn(5000, 24, generator=gen).to(device)
    first = torch.autograd.grad(fastmnist.linear_act(x, w, b, "relu"), b, g)[0]
    for _ in range(3):
        again = torch.autograd.grad(fastmnist.linear_act(x, w, b, "relu"), b, g)[0]
        assert torch.equal(first, again)


def test_linear_act_device_mismatch(device):
    x = torch.randn(4, 3, device=device)
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        fastmnist.linear_act(x, torch.randn(2, 3), None, "relu")
    with pytest.raises(RuntimeError, match="bias is on cpu but x is on cuda"):
        fastmnist.linear_act(x, torch.randn(2, 3, device=device), torch.randn(2), "relu")


def test_linear_act_low_precision_rejected_on_cpu():
    if not _lib.LOADED:
        pytest.skip("fastmnist extension not built")
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        fastmnist.linear_act(torch.randn(2, 3).half(), torch.randn(4, 3).half(), None, "relu")


def test_opcheck_cuda(device, gen):
    x = torch.randn(6, 5, generator=gen).to(device).requires_grad_()
    w = torch.randn(3, 5, generator=gen).to(device).requires_grad_()
    b = torch.randn(3, generator=gen).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.fastmnist.linear_act.default, (x, w, b, "sigmoid", 0.01))
    t = torch.randint(0, 3, (6,), generator=gen).to(device)
    logits = torch.randn(6, 3, generator=gen).to(device).requires_grad_()
    torch.library.opcheck(torch.ops.fastmnist.softmax_cross_entropy.default, (logits, t, None, -100, 1, 0.1))
    y = torch.rand(6, 3, generator=gen).to(device)
    torch.library.opcheck(torch.ops.fastmnist.sigmoid_bce.default, (logits, y, None, None, 1))


def test_compile_low_precision(device, gen):
    torch._dynamo.reset()
    x = torch.randn(8, 16, generator=gen).to(device, torch.bfloat16).requires_grad_()
    w = torch.randn(4, 16, generator=gen).to(device, torch.bfloat16).requires_grad_()

    def f(x, w):
        return fastmnist.linear_act(x, w, None, "relu").sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = compiled(x, w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, f(x, w))


# ---------------------------------------------------------------- softmax cross-entropy


def ce_inputs(rows, C, prob, weighted, ignore, gen, scale=3.0):
    logits = (torch.randn(rows, C, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    if prob:
        target = torch.softmax(torch.randn(rows, C, generator=gen, dtype=torch.float64), 1).requires_grad_()
    else:
        target = torch.randint(0, C, (rows,), generator=gen)
        if ignore:
            target[::3] = -7
    weight = torch.rand(C, generator=gen, dtype=torch.float64) + 0.1 if weighted else None
    return logits, target, weight


@pytest.mark.parametrize("C", [10, 1000, 3000])  # warp per row, and a block per row above 1024 classes
@pytest.mark.parametrize("prob", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_entropy_matches_cpu(device, gen, C, prob, reduction, dtype):
    logits, target, weight = ce_inputs(37, C, prob, True, not prob, gen)
    kw = dict(weight=weight, reduction=reduction, ignore_index=-100 if prob else -7, label_smoothing=0.2)
    compare_with_cpu(fastmnist.softmax_cross_entropy, [logits, target], kw, device, dtype)


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_options_float64(device, gen, smoothing, weighted):
    logits, target, weight = ce_inputs(50, 13, False, weighted, True, gen)
    kw = dict(weight=weight, reduction="mean", ignore_index=-7, label_smoothing=smoothing)
    compare_with_cpu(fastmnist.softmax_cross_entropy, [logits, target], kw, device, torch.float64)


@pytest.mark.parametrize("C", [10, 2000])
def test_cross_entropy_extreme_logits(device, gen, C):
    logits = torch.randn(6, C, generator=gen, dtype=torch.float64)
    logits[0, :] = 1e4
    logits[1, ::2] = -1e4
    logits[2, 1:] = -float("inf")
    logits[3, :] = -float("inf")  # all -inf: NaN, as eager
    logits[4, 0] = float("nan")
    logits.requires_grad_()
    target = torch.zeros(6, dtype=torch.int64)
    for dtype in (torch.float32, torch.float64):
        compare_with_cpu(fastmnist.softmax_cross_entropy, [logits, target], dict(reduction="none"), device, dtype,
                         equal_nan=True)


@pytest.mark.parametrize("C", [10, 3000])
@pytest.mark.parametrize("dtype", LOW)
def test_cross_entropy_low_precision(device, gen, C, dtype):
    logits, target, weight = ce_inputs(64, C, False, True, True, gen)
    kw = dict(weight=weight, reduction="mean", ignore_index=-7, label_smoothing=0.1)
    compare_low_precision(fastmnist.softmax_cross_entropy, softmax_cross_entropy_reference, [logits, target], kw,
                          device, dtype)


def test_cross_entropy_bad_inputs(device):
    logits = torch.randn(4, 3, device=device)
    with pytest.raises(RuntimeError, match="target is on cpu"):
        fastmnist.softmax_cross_entropy(logits, torch.zeros(4, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="weight is on cpu"):
        fastmnist.softmax_cross_entropy(logits, torch.zeros(4, dtype=torch.int64, device=device),
                                        weight=torch.ones(3))


def test_cross_entropy_out_of_range_target_asserts_on_device(device):
    """An out-of-range class index is a device-side assert (no host sync in the op); it poisons the CUDA
    context, so it runs in a child process."""
    code = (
        "import torch, fastmnist\n"
        f"x = torch.randn(4, 3, device='{device}')\n"
        f"t = torch.tensor([0, 1, 3, 2], device='{device}')\n"
        "try:\n"
        "    fastmnist.softmax_cross_entropy(x, t, reduction='sum').item()\n"
        "    print('NO ERROR')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    text = proc.stdout + proc.stderr
    assert "NO ERROR" not in text
    assert "device-side assert" in text or "out of bounds" in text, text[-2000:]


# ---------------------------------------------------------------- linear cross-entropy


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("prob", [False, True])
def test_linear_cross_entropy_matches_cpu(device, gen, reduction, prob):
    x = torch.randn(45, 20, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(10, 20, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(10, generator=gen, dtype=torch.float64).requires_grad_()
    if prob:
        target = torch.softmax(torch.randn(45, 10, generator=gen, dtype=torch.float64), 1)
    else:
        target = torch.randint(0, 10, (45,), generator=gen)
        target[::4] = -100
    kw = dict(reduction=reduction, label_smoothing=0.1)
    for dtype in (torch.float32, torch.float64):
        compare_with_cpu(lambda x, w, t, b, **k: fastmnist.linear_cross_entropy(x, w, t, b, **k),
                         [x, w, target, b], kw, device, dtype)


@pytest.mark.parametrize("dtype", LOW)
def test_linear_cross_entropy_low_precision(device, gen, dtype):
    x = torch.randn(128, 64, generator=gen).requires_grad_()
    w = (torch.randn(10, 64, generator=gen) / 8).requires_grad_()
    b = torch.randn(10, generator=gen).requires_grad_()
    target = torch.randint(0, 10, (128,), generator=gen)
    compare_low_precision(lambda x, w, t, b: fastmnist.linear_cross_entropy(x, w, t, b),
                          lambda x, w, t, b: linear_cross_entropy_composition(x, w, t, b),
                          [x, w, target, b], {}, device, dtype)


# ---------------------------------------------------------------- sigmoid BCE


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("full_weights", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sigmoid_bce_matches_cpu(device, gen, reduction, full_weights, dtype):
    shape = (67, 13)
    logits = (torch.randn(shape, generator=gen, dtype=torch.float64) * 4).requires_grad_()
    logits.data[0, 0], logits.data[0, 1] = 1e4, -1e4
    target = torch.rand(shape, generator=gen, dtype=torch.float64).requires_grad_()
    wshape = shape if full_weights else shape[-1:]
    weight = torch.rand(wshape, generator=gen, dtype=torch.float64)
    pos_weight = torch.rand(wshape, generator=gen, dtype=torch.float64) * 3
    kw = dict(weight=weight, pos_weight=pos_weight, reduction=reduction)
    compare_with_cpu(fastmnist.sigmoid_bce, [logits, target], kw, device, dtype)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_bce_low_precision(device, gen, dtype, reduction):
    logits = (torch.randn(300, 10, generator=gen) * 4).requires_grad_()
    target = torch.rand(300, 10, generator=gen).requires_grad_()
    pos_weight = torch.rand(10, generator=gen) * 3
    compare_low_precision(fastmnist.sigmoid_bce, sigmoid_bce_reference, [logits, target],
                          dict(pos_weight=pos_weight, reduction=reduction), device, dtype)


def test_sigmoid_bce_sum_deterministic(device, gen):
    logits = torch.randn(100_000, 10, generator=gen).to(device)
    target = torch.rand(100_000, 10, generator=gen).to(device)
    first = fastmnist.sigmoid_bce(logits, target, reduction="sum")
    for _ in range(3):
        assert torch.equal(first, fastmnist.sigmoid_bce(logits, target, reduction="sum"))


def test_sigmoid_bce_device_mismatch(device):
    with pytest.raises(RuntimeError, match="target is on cpu"):
        fastmnist.sigmoid_bce(torch.randn(4, 3, device=device), torch.rand(4, 3))


# ---------------------------------------------------------------- LeNet block (conv + activation + 2x2 pool)

CONV_ACTIVATIONS = ("identity", "relu", "sigmoid", "tanh")
# (x shape, C_out, k, padding): LeNet's two blocks, an odd-sized input with floor pooling, and an unbatched one
CONV_SHAPES = [((3, 1, 28, 28), 6, 5, 2), ((2, 6, 14, 14), 16, 5, 0), ((2, 3, 11, 9), 4, 3, 1), ((2, 7, 8), 3, 2, 0)]


def conv_inputs(x_shape, c_out, k, gen):
    c_in = x_shape[-3]
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.randn(c_out, c_in, k, k, generator=gen, dtype=torch.float64) / (c_in * k * k) ** 0.5).requires_grad_()
    b = torch.randn(c_out, generator=gen, dtype=torch.float64).requires_grad_()
    return x, w, b


@pytest.mark.parametrize("activation", CONV_ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv_act_pool_matches_cpu(device, gen, activation, dtype, shape):
    x_shape, c_out, k, padding = shape
    x, w, b = conv_inputs(x_shape, c_out, k, gen)
    compare_with_cpu(fastmnist.conv_act_pool, [x, w, b], dict(padding=padding, activation=activation), device, dtype)


@pytest.mark.parametrize("activation", CONV_ACTIVATIONS)
@pytest.mark.parametrize("dtype", LOW)
def test_conv_act_pool_low_precision(device, gen, activation, dtype):
    x, w, b = conv_inputs((8, 6, 14, 14), 16, 5, gen)
    compare_low_precision(fastmnist.conv_act_pool, conv_act_pool_reference, [x, w, b],
                          dict(padding=0, activation=activation), device, dtype)


def test_conv_act_pool_grads_deterministic(device, gen):
    x, w, b = (t.detach().float().to(device).requires_grad_() for t in conv_inputs((70, 1, 28, 28), 6, 5, gen))
    g = torch.randn(70, 6, 14, 14, generator=gen).to(device)
    first = torch.autograd.grad(fastmnist.conv_act_pool(x, w, b, 2, "sigmoid"), (x, w, b), g)
    for _ in range(2):
        again = torch.autograd.grad(fastmnist.conv_act_pool(x, w, b, 2, "sigmoid"), (x, w, b), g)
        assert all(torch.equal(a, f) for a, f in zip(again, first))


def test_conv_act_pool_device_mismatch(device):
    x = torch.randn(1, 1, 8, 8, device=device)
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        fastmnist.conv_act_pool(x, torch.randn(2, 1, 3, 3))
    with pytest.raises(RuntimeError, match="weight is on cpu but x is on cuda"):
        torch.ops.fastmnist.conv_act_pool(x, torch.randn(2, 1, 3, 3), None, 0, "relu", False)
