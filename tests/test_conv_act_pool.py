"""fastmnist.conv_act_pool and ConvActPool2d against eager conv2d -> activation -> avg_pool2d(2)."""

import pytest
import torch
from helpers import assert_close, cpu_path, noncontiguous
from torch import nn

import fastmnist
from fastmnist.nn import ConvActPool2d
from fastmnist.reference import conv_act_pool_reference

ACTIVATIONS = ["sigmoid", "relu", "tanh", "identity"]


def make_inputs(n, c_in, c_out, h, w, k, dtype, bias=True, seed=0, x_grad=True):
    gen = torch.Generator().manual_seed(seed)
    shape = (c_in, h, w) if n is None else (n, c_in, h, w)
    x = torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_(x_grad)
    weight = (torch.randn(c_out, c_in, k, k, generator=gen, dtype=dtype) / max(c_in * k * k, 1) ** 0.5)
    b = torch.randn(c_out, generator=gen, dtype=dtype).requires_grad_() if bias else None
    return x, weight.requires_grad_(), b


def outputs_and_grads(fn, x, w, b, grad_out):
    tensors = [t for t in (x, w, b) if t is not None and t.requires_grad]
    for t in tensors:
        t.grad = None
    out = fn(x, w, b)
    out.backward(grad_out)
    return out.detach(), [t.grad.clone() for t in tensors]


def check_against_eager(x, w, b, padding, activation, seed=0, equal_nan=False):
    ref = conv_act_pool_reference(x, w, b, padding, activation)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=x.dtype)
    out, grads = outputs_and_grads(lambda *a: fastmnist.conv_act_pool(*a, padding, activation), x, w, b, grad_out)
    ref, ref_grads = outputs_and_grads(lambda *a: conv_act_pool_reference(*a, padding, activation), x, w, b,
                                       grad_out)
    assert out.shape == ref.shape
    assert_close(out, ref, equal_nan=equal_nan)
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, equal_nan=equal_nan)


# every activation x kernel size x padding; bias and x.requires_grad alternate so that each activation and
# each kernel size meets all four combinations
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("padding", [0, 1, 2, 3])
def test_gradcheck_float64(activation, k, padding):
    bias = padding % 2 == 0
    x_grad = padding in (0, 3) if k in (1, 5) else padding in (1, 2)
    h = max(k - 2 * padding + 2 + (k % 3), 1)
    x, w, b = make_inputs(2, 2, 3, h, h + 1, k, torch.float64, bias=bias, seed=k * 10 + padding, x_grad=x_grad)
    inputs = tuple(t for t in (x, w, b) if t is not None)

    def fn(x, w, *rest):
        return fastmnist.conv_act_pool(x, w, rest[0] if rest else None, padding, activation)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gradcheck_float64_full(activation):
    x, w, b = make_inputs(2, 3, 2, 7, 6, 3, torch.float64, seed=5)
    assert torch.autograd.gradcheck(lambda *a: fastmnist.conv_act_pool(*a, 1, activation), (x, w, b))


@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("block", ["conv1", "conv2"])
def test_lenet_shapes_float32(block, batch):
    if block == "conv1":
        x, w, b = make_inputs(batch, 1, 6, 28, 28, 5, torch.float32, seed=batch, x_grad=False)
        check_against_eager(x, w, b, 2, "sigmoid")
    else:
        x, w, b = make_inputs(batch, 6, 16, 14, 14, 5, torch.float32, seed=batch + 1)
        check_against_eager(x, w, b, 0, "sigmoid")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "n,c_in,c_out,h,w,k,padding",
    [
        (1, 1, 1, 2, 2, 1, 0),     # one pooling window
        (3, 2, 5, 11, 17, 5, 1),   # H != W, odd sizes
        (2, 3, 7, 9, 40, 3, 2),    # several column tiles
        (1, 40, 33, 8, 9, 3, 0),   # many channels
        (5, 4, 2, 13, 7, 7, 3),    # big kernel, big padding
        (None, 3, 4, 10, 12, 5, 0),  # unbatched
        (2, 2, 3, 5, 6, 1, 3),     # padding larger than the kernel
    ],
)
def test_odd_shapes(activation, dtype, n, c_in, c_out, h, w, k, padding):
    x, wt, b = make_inputs(n, c_in, c_out, h, w, k, dtype, seed=h * w + c_out)
    check_against_eager(x, wt, b, padding, activation)


@pytest.mark.parametrize("layout", ["noncontiguous", "channels_last"])
def test_input_layouts(layout):
    x, w, b = make_inputs(3, 4, 6, 12, 13, 5, torch.float32, seed=3, x_grad=False)
    x = noncontiguous(x) if layout == "noncontiguous" else x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    assert not x.is_contiguous()
    check_against_eager(x, w, b, 1, "tanh")
    # a non-contiguous weight and grad_out
    w2 = noncontiguous(w.detach()).requires_grad_()
    check_against_eager(x, w2, None, 2, "sigmoid")


def test_zero_size_batch():
    x, w, b = make_inputs(0, 2, 3, 9, 9, 3, torch.float32)
    out = fastmnist.conv_act_pool(x, w, b, 1, "sigmoid")
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_no_grad_and_identity_save_nothing():
    x, w, b = make_inputs(2, 2, 3, 8, 8, 3, torch.float32)
    _, act = torch.ops.fastmnist.conv_act_pool(x.detach(), w.detach(), b.detach(), 0, "sigmoid", False)
    assert act.numel() == 0
    with torch.no_grad():
        assert_close(fastmnist.conv_act_pool(x, w, b, 0, "sigmoid"), conv_act_pool_reference(x, w, b, 0, "sigmoid"))
    out, act = torch.ops.fastmnist.conv_act_pool(x, w, b, 0, "relu", True)
    assert act.shape == (2, 3, 6, 6)
    out, _ = torch.ops.fastmnist.conv_act_pool(x, w, b, 0, "relu", False)
    with pytest.raises(RuntimeError, match="save_act"):
        out.sum().backward()


PATHS = ["portable", "avx2", "avx512"]


# each compiled path against eager at LeNet's shapes (column path: 1->6; channel path: 6->16) and at shapes
# with tails in every dimension, for every activation
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_path_against_eager(path, dtype):
    cases = [(3, 1, 6, 28, 28, 5, 2), (2, 6, 16, 14, 14, 5, 0), (2, 3, 5, 11, 37, 5, 1), (1, 19, 21, 9, 8, 3, 0),
             (2, 2, 3, 5, 6, 1, 3)]
    with cpu_path(path):
        for activation in ACTIVATIONS:
            for i, (n, c_in, c_out, h, w, k, padding) in enumerate(cases):
                x, wt, b = make_inputs(n, c_in, c_out, h, w, k, dtype, seed=i, x_grad=c_in > 1)
                check_against_eager(x, wt, b, padding, activation, seed=i)


# a NaN pixel inside the image reaches the outputs and gradients that read it, as in eager (relu, sigmoid and
# tanh had turned it into a number), on both forward paths (column: 1->6; channel: 6->16)
@pytest.mark.parametrize("path", PATHS)
def test_nan_input_propagates_as_in_eager(path):
    with cpu_path(path):
        for activation in ACTIVATIONS:
            for i, (n, c_in, c_out, size, padding) in enumerate([(2, 1, 6, 28, 2), (2, 6, 16, 14, 0)]):
                x, wt, b = make_inputs(n, c_in, c_out, size, size, 5, torch.float32, seed=i, x_grad=c_in > 1)
                with torch.no_grad():
                    x[1, 0, 6, 7] = float("nan")
                ref = conv_act_pool_reference(x, wt, b, padding, activation)
                assert torch.isnan(ref[1]).any() and not torch.isnan(ref[0]).any()
                check_against_eager(x, wt, b, padding, activation, seed=i, equal_nan=True)


# backward over several chunks (grad_W and grad_b are summed per 8 samples, then chunk by chunk) and a tail
# chunk, with grad_x, at shapes whose dz rows are narrower than the input rows: input pixels with every tap
# inside dz, with some, and with none (13x11 with a 5x5 kernel: the pooling drops the last conv row and column)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chunked_backward_with_grad_x(path, dtype):
    cases = [(19, 6, 16, 14, 14, 5, 0), (9, 3, 4, 13, 11, 5, 0), (13, 7, 5, 10, 10, 3, 1), (17, 2, 3, 9, 9, 7, 3),
             (12, 13, 2, 7, 18, 1, 0), (11, 2, 2, 3, 3, 3, 1)]
    with cpu_path(path):
        for i, (n, c_in, c_out, h, w, k, padding) in enumerate(cases):
            activation = ACTIVATIONS[i % len(ACTIVATIONS)]
            x, wt, b = make_inputs(n, c_in, c_out, h, w, k, dtype, seed=100 + i)
            check_against_eager(x, wt, b, padding, activation, seed=i)


def test_gradcheck_float64_chunk_tail():
    x, w, b = make_inputs(9, 2, 3, 7, 8, 3, torch.float64, seed=6)
    assert torch.autograd.gradcheck(lambda *a: fastmnist.conv_act_pool(*a, 0, "tanh"), (x, w, b), fast_mode=True)


@pytest.mark.parametrize("path", PATHS[1:])
def test_vectorised_and_portable_paths_agree(path):
    results = {}
    for p in (path, "portable"):
        with cpu_path(p):
            for dtype in (torch.float32, torch.float64):
                for k, padding, shape in ((5, 2, (3, 2, 6, 17, 29)), (3, 1, (2, 3, 5, 10, 9))):
                    x, w, b = make_inputs(*shape[:3], *shape[3:], k, dtype, seed=k)
                    ref = conv_act_pool_reference(x, w, b, padding, "sigmoid")
                    g = torch.randn(ref.shape, dtype=dtype, generator=torch.Generator().manual_seed(2))
                    results.setdefault(p, []).append(outputs_and_grads(
                        lambda *a: fastmnist.conv_act_pool(*a, padding, "sigmoid"), x, w, b, g))
    for (out_a, grads_a), (out_b, grads_b) in zip(results["portable"], results[path]):
        assert_close(out_a, out_b)
        for ga, gb in zip(grads_a, grads_b):
            assert_close(ga, gb)


def test_backward_deterministic():
    x, w, b = make_inputs(37, 6, 16, 14, 14, 5, torch.float32, seed=9)
    g = torch.randn(37, 16, 5, 5, generator=torch.Generator().manual_seed(1))
    first = outputs_and_grads(lambda *a: fastmnist.conv_act_pool(*a, 0, "sigmoid"), x, w, b, g)[1]
    for _ in range(3):
        again = outputs_and_grads(lambda *a: fastmnist.conv_act_pool(*a, 0, "sigmoid"), x, w, b, g)[1]
        for a, c in zip(first, again):
            assert torch.equal(a, c)


@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
def test_opcheck(activation):
    x, w, b = make_inputs(2, 3, 4, 9, 8, 3, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.fastmnist.conv_act_pool.default, (x, w, b, 1, activation, True))
    # without save_act there is nothing to differentiate with: inference inputs
    torch.library.opcheck(torch.ops.fastmnist.conv_act_pool.default,
                          (x.detach(), w.detach(), None, 0, activation, False))
    out, act = torch.ops.fastmnist.conv_act_pool(x, w, b, 1, activation, True)
    g = torch.randn_like(out)
    for mask in ([True, True, True], [False, True, False]):
        torch.library.opcheck(torch.ops.fastmnist.conv_act_pool_backward.default,
                              (g, x.detach(), w.detach(), act.detach(), 1, activation, mask))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    x, w, b = make_inputs(4, 1, 6, 28, 28, 5, torch.float32, seed=8, x_grad=False)

    def block(x, w, b):
        return fastmnist.conv_act_pool(x, w, b, 2, "sigmoid").sum(dim=(1, 2, 3)).square().mean()

    compiled = torch.compile(block, fullgraph=True, backend=backend)
    loss = compiled(x, w, b)
    loss.backward()
    grads = (w.grad.clone(), b.grad.clone())
    w.grad = b.grad = None
    ref = conv_act_pool_reference(x, w, b, 2, "sigmoid").sum(dim=(1, 2, 3)).square().mean()
    ref.backward()
    assert_close(loss.detach(), ref.detach())
    assert_close(grads[0], w.grad)
    assert_close(grads[1], b.grad)
    with torch.no_grad():
        assert_close(compiled(x, w, b), ref.detach())


def test_module_matches_conv2d():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 16, 5)
    torch.manual_seed(0)
    fused = ConvActPool2d(6, 16, activation="sigmoid")
    assert fused.state_dict().keys() == conv.state_dict().keys() == {"weight", "bias"}
    for name, p in conv.named_parameters():
        assert torch.equal(p, getattr(fused, name))  # same initialisation
    conv = nn.Conv2d(1, 6, 5, padding=2, bias=False)
    fused = ConvActPool2d(1, 6, kernel_size=5, padding=2, bias=False, activation="relu")
    fused.load_state_dict(conv.state_dict())
    x = torch.randn(3, 1, 28, 28)
    eager = nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2))
    assert_close(fused(x), eager(x))
    assert "activation=relu" in repr(fused)


BAD_INPUTS = [
    (lambda x, w, b: fastmnist.conv_act_pool(x[0, 0], w, b), "dimensions|shape"),
    (lambda x, w, b: fastmnist.conv_act_pool(x, w[0], b), "weight must have 4 dimensions"),
    (lambda x, w, b: fastmnist.conv_act_pool(x, w[:, :1], b), "input channels"),
    (lambda x, w, b: fastmnist.conv_act_pool(x, w[:, :, :, :2], b), "square"),
    (lambda x, w, b: fastmnist.conv_act_pool(x[..., :2, :2], w, b), "larger than the padded input"),
    (lambda x, w, b: fastmnist.conv_act_pool(x[..., :3, :], w[..., :3, :3], b), "pooling window"),
    (lambda x, w, b: fastmnist.conv_act_pool(x, w, b, padding=-1), "padding must be >= 0"),
    (lambda x, w, b: torch.ops.fastmnist.conv_act_pool(x, w, b, -1, "relu", False), "padding must be >= 0"),
    (lambda x, w, b: fastmnist.conv_act_pool(x, w, b, padding=1.5), "padding must be an int"),
    (lambda x, w, b: fastmnist.conv_act_pool(x.double(), w, b), "dtype"),
    (lambda x, w, b: fastmnist.conv_act_pool(x, w, b.double()), "dtype"),
    (lambda x, w, b: fastmnist.conv_act_pool(x.int(), w.int(), b), "float32 or float64"),
    (lambda x, w, b: fastmnist.conv_act_pool(x, w, b[:2]), "bias must have shape"),
    (lambda x, w, b: fastmnist.conv_act_pool(x, w, b, activation="swish"), "unknown activation"),
    (lambda x, w, b: torch.ops.fastmnist.conv_act_pool(x, w, b, 0, "swish", False), "unknown activation"),
    (lambda x, w, b: torch.ops.fastmnist.conv_act_pool(x, w, b, 0, "leaky_relu", False), "not supported"),
    (lambda x, w, b: fastmnist.conv_act_pool(x, w.to("meta"), b), "device|meta"),
    (lambda x, w, b: torch.ops.fastmnist.conv_act_pool_backward(
        torch.randn(2, 4, 3, 3), x, w, torch.empty(0), 0, "sigmoid", [True, True, True]), "grad_out must have"),
    (lambda x, w, b: torch.ops.fastmnist.conv_act_pool_backward(
        torch.randn(2, 4, 2, 2), x, w, torch.empty(0), 0, "sigmoid", [True, True, True]), "act must be"),
]


@pytest.mark.parametrize("index", range(len(BAD_INPUTS)))
def test_bad_inputs(index):
    fn, match = BAD_INPUTS[index]
    x = torch.randn(2, 3, 8, 8)
    w = torch.randn(4, 3, 5, 5)
    b = torch.randn(4)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        fn(x, w, b)


def test_module_bad_arguments():
    with pytest.raises(ValueError, match="square"):
        ConvActPool2d(1, 6, kernel_size=(5, 3))
    with pytest.raises(ValueError, match="unknown activation"):
        ConvActPool2d(1, 6, activation="gelu")
    with pytest.raises(ValueError, match="padding must be >= 0"):
        ConvActPool2d(1, 6, padding=-2)
