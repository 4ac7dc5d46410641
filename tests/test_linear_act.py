"""fastmnist.linear_act and FusedLinear against F.linear + the eager activation."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, cpu_path, noncontiguous

import fastmnist
from fastmnist.nn import FusedLinear
from fastmnist.reference import linear_act_reference

ACTIVATIONS = ["identity", "relu", "leaky_relu", "sigmoid", "tanh"]
# the tutorial models' layer shapes (in, out)
TUTORIAL_SHAPES = [(784, 400), (400, 200), (200, 100), (100, 10), (784, 200), (784, 50), (784, 10)]


def make_inputs(shape_x, n_out, dtype, bias=True, seed=0, requires_grad=True):
    gen = torch.Generator().manual_seed(seed)
    n_in = shape_x[-1]
    x = torch.randn(*shape_x, generator=gen, dtype=dtype)
    w = torch.randn(n_out, n_in, generator=gen, dtype=dtype) / max(n_in, 1) ** 0.5
    b = torch.randn(n_out, generator=gen, dtype=dtype) if bias else None
    tensors = [x, w] + ([b] if bias else [])
    for t in tensors:
        t.requires_grad_(requires_grad)
    return x, w, b


def grads_of(fn, tensors, grad_out):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(grad_out)
    return out.detach(), [t.grad for t in tensors]


def check_against_eager(x, w, b, activation, negative_slope=0.01, grad_atol=None):
    """Outputs and gradients against the eager composition; grad_atol overrides the dtype's absolute tolerance
    for the gradients."""
    tensors = [t for t in (x, w, b) if t is not None and t.requires_grad]
    grad_out = torch.randn(*x.shape[:-1], w.shape[0], dtype=x.dtype)
    out, grads = grads_of(lambda: fastmnist.linear_act(x, w, b, activation, negative_slope), tensors, grad_out)
    ref, ref_grads = grads_of(lambda: linear_act_reference(x, w, b, activation, negative_slope), tensors, grad_out)
    assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, **({} if grad_atol is None else {"atol": grad_atol}))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape_x", [(5,), (3, 5), (2, 3, 5)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("n_out", [4, 70])  # our small-output kernels; BLAS and the bias+activation pass
def test_gradcheck_float64(activation, bias, shape_x, n_out):
    x, w, b = make_inputs(shape_x, n_out, torch.float64, bias=bias, seed=1)
    inputs = (x, w, b) if bias else (x, w)

    def fn(*args):
        return fastmnist.linear_act(*args, **({} if bias else {"bias": None}), activation=activation,
                                    negative_slope=0.2)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# n_out up to 64: our small-output kernels (45: three output groups of 12 and one of 9 in the weight gradient);
# n_out = 77: BLAS, then the bias+activation pass's 4-vector step, single vectors and a scalar tail (float and
# double)
@pytest.mark.parametrize("shape_x,n_out", [((1, 7), 3), ((13, 37), 11), ((6, 9), 17), ((33, 100), 10),
                                           ((2, 3, 19), 5), ((40,), 16), ((1, 1), 1), ((5, 11), 45),
                                           ((9, 30), 64), ((5, 11), 77)])
def test_matches_eager(activation, dtype, shape_x, n_out):
    x, w, b = make_inputs(shape_x, n_out, dtype, seed=sum(shape_x) + n_out)
    check_against_eager(x, w, b, activation, negative_slope=0.05)


@pytest.mark.parametrize("batch", [1, 64, 256])
@pytest.mark.parametrize("n_in,n_out", TUTORIAL_SHAPES)
def test_tutorial_shapes_float32(batch, n_in, n_out):
    activation = "identity" if n_out == 10 else ("relu" if n_out in (400, 100) else "sigmoid")
    x, w, b = make_inputs((batch, n_in), n_out, torch.float32, seed=batch + n_in + n_out)
    # The weight and bias gradients sum `batch` products of unit-size values (magnitude ~sqrt(batch)); where a sum
    # cancels to near zero, the two summation orders differ by ~sqrt(batch) float32 ulps of that magnitude, not
    # by a relative error of the result (1.2e-5 seen at batch 256, against the default 1e-5).
    check_against_eager(x, w, b, activation, grad_atol=max(1e-5, 2e-6 * batch ** 0.5))


@pytest.mark.parametrize("n_in,n_out", [(784, 400), (400, 200), (200, 100), (784, 200)])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_gemm_layers_forward_equals_eager_bit_for_bit(batch, n_in, n_out):
    """Past the small-output kernels the bias goes in through the GEMM, as eager's addmm: the pre-activations
    are eager's to the bit (what the fused step's float32 parity test relies on near ReLU's kink)."""
    x, w, b = make_inputs((batch, n_in), n_out, torch.float32, seed=batch + n_out, requires_grad=False)
    for activation, eager in (("identity", lambda z: z), ("relu", torch.relu)):
        assert torch.equal(fastmnist.linear_act(x, w, b, activation), eager(F.linear(x, w, b))), activation


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_noncontiguous_inputs(activation):
    x, w, b = make_inputs((9, 21), 6, torch.float32, seed=3, requires_grad=False)
    cases = {
        "sliced x": (noncontiguous(x), w),
        "transposed x": (x.t().contiguous().t(), w),
        "transposed weight": (x, w.t().contiguous().t()),
        "sliced weight": (x, noncontiguous(w)),
    }
    for name, (xc, wc) in cases.items():
        xc = xc.detach().requires_grad_(True)
        wc = wc.detach().requires_grad_(True)
        bc = b.detach().requires_grad_(True)
        check_against_eager(xc, wc, bc, activation)
    # a non-contiguous grad_output too
    xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    grad_out = noncontiguous(torch.randn(9, 6))
    fastmnist.linear_act(xg, wg, b, activation).backward(grad_out)
    xr, wr = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    linear_act_reference(xr, wr, b, activation).backward(grad_out)
    assert_close(xg.grad, xr.grad)
    assert_close(wg.grad, wr.grad)


@pytest.mark.parametrize("needs", list(itertools.product([False, True], repeat=3)))
def test_only_needed_gradients(needs):
    x, w, b = make_inputs((5, 8), 3, torch.float64, seed=4, requires_grad=False)
    for t, need in zip((x, w, b), needs):
        t.requires_grad_(need)
    out = fastmnist.linear_act(x, w, b, "tanh")
    if not any(needs):
        assert not out.requires_grad
        return
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [t for t, n in zip((x, w, b), needs) if n], grad_out)
    ref_out = linear_act_reference(x, w, b, "tanh")
    want = torch.autograd.grad(ref_out, [t for t, n in zip((x, w, b), needs) if n], grad_out)
    for g, r in zip(got, want):
        assert_close(g, r)


def test_zero_size_batch():
    x, w, b = make_inputs((0, 6), 4, torch.float32, seed=5)
    out = fastmnist.linear_act(x, w, b, "sigmoid")
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 6)
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


def test_extreme_values():
    x = torch.tensor([[1e4, -1e4, 0.0], [-88.0, 88.0, 50.0], [1e-30, -1e-30, 3.0]], dtype=torch.float32)
    w = torch.eye(3)
    for activation in ACTIVATIONS:
        out = fastmnist.linear_act(x, w, None, activation)
        ref = linear_act_reference(x, w, None, activation)
        assert torch.isfinite(out).all()
        assert_close(out, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("n_out", [10, 70])  # our small-output kernels; BLAS and the bias+activation pass
def test_nan_input_propagates_as_in_eager(path, n_out):
    """A NaN in x makes its row of the output NaN after every activation and reaches the gradients where eager's
    does (relu, sigmoid and tanh had turned it into a number; relu's derivative at a NaN output is eager's 1)."""
    with cpu_path(path):
        for activation in ACTIVATIONS:
            x, w, b = make_inputs((5, 37), n_out, torch.float32, seed=n_out)
            with torch.no_grad():
                x[1, 3] = float("nan")
            tensors = [x, w, b]
            grad_out = torch.randn(5, n_out, generator=torch.Generator().manual_seed(1))
            out, grads = grads_of(lambda: fastmnist.linear_act(x, w, b, activation), tensors, grad_out)
            ref, ref_grads = grads_of(lambda: linear_act_reference(x, w, b, activation), tensors, grad_out)
            assert torch.isnan(ref[1]).all() and not torch.isnan(ref[0]).any()
            assert_close(out, ref, equal_nan=True)
            for g, r in zip(grads, ref_grads):
                assert_close(g, r, equal_nan=True)


@pytest.mark.parametrize("path", ["avx2", "avx512"])
def test_vectorised_and_portable_paths_agree(path):
    def run():
        results = []
        for activation in ACTIVATIONS:
            # the small-output kernels (up to 16 outputs on every path, 64 but on AVX-512) and the BLAS path; batch
            # sizes that leave row blocks of 4 and single rows after the forward's 6-row blocks (AVX-512)
            for n_out in (10, 16, 50, 100):
                for batch in (1, 10, 37):
                    x, w, b = make_inputs((batch, 53), n_out, torch.float64, seed=n_out)
                    out = fastmnist.linear_act(x, w, b, activation)
                    out.backward(torch.ones_like(out))
                    results.append([out.detach(), x.grad, w.grad, b.grad])
        return results

    with cpu_path(path):
        vectorised = run()
    with cpu_path("portable"):
        portable = run()
    for v_tensors, p_tensors in zip(vectorised, portable):
        for v, p in zip(v_tensors, p_tensors):
            assert_close(v, p, atol=1e-13, rtol=1e-12)


def test_set_cpu_path_rejects_unknown():
    with pytest.raises(RuntimeError, match="expected 'auto', 'avx512', 'avx2' or 'portable'"):
        torch.ops.fastmnist.set_cpu_path("sse9")


def test_set_cpu_path_reports_the_path_in_use():
    best = torch.ops.fastmnist.set_cpu_path("auto")
    assert best in ("avx512", "avx2", "portable")
    try:
        order = ["portable", "avx2", "avx512"]
        for path in order[: order.index(best) + 1]:
            assert torch.ops.fastmnist.set_cpu_path(path) == path
        for path in order[order.index(best) + 1:]:
            with pytest.raises(RuntimeError, match=f"this CPU has no {path} path"):
                torch.ops.fastmnist.set_cpu_path(path)
            assert torch.ops.fastmnist.set_cpu_path("auto") == best
    finally:
        torch.ops.fastmnist.set_cpu_path("auto")


def test_opcheck():
    samples = []
    for activation in ACTIVATIONS:
        x, w, b = make_inputs((4, 6), 3, torch.float64, seed=6)
        samples.append((x, w, b, activation, 0.1))
        x, w, _ = make_inputs((2, 3, 6), 12, torch.float32, seed=7)
        samples.append((x, w, None, activation, 0.0))
    for args in samples:
        torch.library.opcheck(torch.ops.fastmnist.linear_act.default, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    layer1 = FusedLinear(20, 16, activation="leaky_relu", negative_slope=0.02)
    layer2 = FusedLinear(16, 10, activation="identity")

    def model(x):
        return layer2(layer1(x)).sum()

    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(7, 20)
    loss = compiled(x)
    loss.backward()
    grads = [p.grad.clone() for p in (layer1.weight, layer1.bias, layer2.weight)]
    for p in (layer1.weight, layer1.bias, layer2.weight, layer2.bias):
        p.grad = None
    ref = model(x)
    ref.backward()
    assert_close(loss, ref)
    for g, p in zip(grads, (layer1.weight, layer1.bias, layer2.weight)):
        assert_close(g, p.grad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_linear_matches_nn_linear(activation):
    torch.manual_seed(8)
    linear = torch.nn.Linear(30, 12)
    fused = FusedLinear(30, 12, activation=activation, negative_slope=0.02)
    fused.load_state_dict(linear.state_dict())
    assert list(fused.state_dict()) == list(linear.state_dict()) == ["weight", "bias"]
    x = torch.randn(5, 30)
    assert_close(fused(x), linear_act_reference(x, linear.weight, linear.bias, activation, 0.02))
    # a fused layer's weights load back into nn.Linear
    back = torch.nn.Linear(30, 12)
    back.load_state_dict(fused.state_dict())
    assert torch.equal(back.weight, fused.weight)


def test_fused_linear_initialisation_matches_nn_linear():
    torch.manual_seed(9)
    linear = torch.nn.Linear(50, 20, dtype=torch.float64)
    torch.manual_seed(9)
    fused = FusedLinear(50, 20, dtype=torch.float64)
    assert torch.equal(linear.weight, fused.weight) and torch.equal(linear.bias, fused.bias)
    assert fused.weight.dtype == torch.float64
    no_bias = FusedLinear(4, 3, bias=False)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]


# ---- bad input ----

def test_rejects_mismatched_dtypes():
    x, w, b = make_inputs((2, 4), 3, torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match="weight has dtype Double but x has dtype Float"):
        fastmnist.linear_act(x, w.double(), b)
    with pytest.raises(RuntimeError, match="bias has dtype Double but x has dtype Float"):
        fastmnist.linear_act(x, w, b.double())


def test_rejects_wrong_in_features():
    x, w, b = make_inputs((2, 4), 3, torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match="x has in_features = 5 but weight has shape"):
        fastmnist.linear_act(torch.randn(2, 5), w, b)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(3,\)"):
        fastmnist.linear_act(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match="weight must have 2 dimensions"):
        fastmnist.linear_act(x, w.reshape(3, 2, 2), b)
    with pytest.raises(RuntimeError, match="0-dimensional"):
        fastmnist.linear_act(torch.tensor(1.0), w, b)
    with pytest.raises(RuntimeError, match="x has in_features = 5"):
        FusedLinear(4, 3)(torch.randn(2, 5))


def test_rejects_integer_tensors():
    w = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="x must be float32 or float64, got Long"):
        fastmnist.linear_act(torch.ones(2, 4, dtype=torch.long), w)


def test_rejects_unknown_activation_and_bad_slope():
    x, w, b = make_inputs((2, 4), 3, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        fastmnist.linear_act(x, w, b, "gelu")
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        FusedLinear(4, 3, activation="gelu")
    with pytest.raises(RuntimeError, match="unknown activation 'softplus'"):
        torch.ops.fastmnist.linear_act(x, w, b, "softplus", 0.0)
    with pytest.raises(TypeError, match="negative_slope must be a real number, got str"):
        fastmnist.linear_act(x, w, b, "leaky_relu", "0.1")
    with pytest.raises(TypeError, match="negative_slope must be a real number, got NoneType"):
        FusedLinear(4, 3, activation="leaky_relu", negative_slope=None)
    for slope in (float("nan"), float("inf"), -0.1):
        with pytest.raises(RuntimeError, match="negative_slope must be a finite number >= 0"):
            fastmnist.linear_act(x, w, b, "leaky_relu", slope)


class _CudaLookalike(torch.Tensor):
    """A tensor whose .device says cuda, to exercise the no-CUDA-build check on a machine without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)

    @property
    def is_cuda(self):
        return True


def test_rejects_cuda_tensor_without_cuda_build():
    if fastmnist._lib.WITH_CUDA:
        pytest.skip("this build has CUDA kernels; the CUDA tests cover it")
    x = torch.randn(2, 4).as_subclass(_CudaLookalike)
    with pytest.raises(RuntimeError, match="got a CUDA tensor, but fastmnist was built without CUDA"):
        fastmnist.linear_act(x, torch.randn(3, 4))
