"""softmax_cross_entropy against F.cross_entropy: every option, shapes, extreme values, bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmnist
from fastmnist import _lib
from fastmnist.reference import softmax_cross_entropy_reference as reference

from helpers import assert_close, check_loss_against_reference, cpu_path, noncontiguous

pytestmark = pytest.mark.skipif(not _lib.LOADED, reason="fastmnist extension not built")

REDUCTIONS = ("none", "mean", "sum")
# (reduction, class weight, ignore_index used, label_smoothing, probability targets); ignore_index does not
# apply to probability targets
GRID = [g for g in itertools.product(REDUCTIONS, (False, True), (False, True), (0.0, 0.3), (False, True))
        if not (g[2] and g[4])]


def make_inputs(shape, weighted, ignore, prob, dtype, gen, scale=3.0):
    """logits of `shape` (class dim 1, or 0 for 1-D), matching targets and class weights."""
    class_dim = 0 if len(shape) == 1 else 1
    C = shape[class_dim]
    logits = torch.randn(shape, generator=gen, dtype=dtype) * scale
    target_shape = shape[:class_dim] + shape[class_dim + 1:]
    if prob:
        target = torch.softmax(torch.randn(shape, generator=gen, dtype=dtype), class_dim)
    else:
        target = torch.randint(0, C, target_shape, generator=gen)
        if ignore and target.numel() > 0:
            target.view(-1)[::3] = -7
    weight = torch.rand(C, generator=gen, dtype=dtype) + 0.1 if weighted else None
    return logits, target, weight


def options(reduction, ignore, smoothing, weight):
    return dict(weight=weight, reduction=reduction, ignore_index=-7 if ignore else -100, label_smoothing=smoothing)


def check_against_eager(logits, target, opts, grad_noncontiguous=False, **tol):
    check_loss_against_reference(fastmnist.softmax_cross_entropy, reference, (logits, target), (0,), opts,
                                 grad_noncontiguous, **tol)


@pytest.mark.parametrize("reduction,weighted,ignore,smoothing,prob", GRID)
def test_gradcheck(reduction, weighted, ignore, smoothing, prob):
    gen = torch.Generator().manual_seed(1)
    logits, target, weight = make_inputs((4, 5), weighted, ignore, prob, torch.float64, gen)
    logits.requires_grad_()
    if prob:
        target.requires_grad_()
    opts = options(reduction, ignore, smoothing, weight)
    inputs = (logits, target) if prob else (logits,)

    def f(*args):
        return fastmnist.softmax_cross_entropy(args[0], args[1] if prob else target, **opts)

    assert torch.autograd.gradcheck(f, inputs)


# (2600, 13): several parallel row ranges, whose boundary rows take the kernels' non-overreading tail path
SHAPES = [(7, 10), (1, 10), (5, 1), (6, 2), (3, 1000), (10,), (3, 4, 5), (2, 3, 4, 5), (0, 4), (19, 37), (2600, 13)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_against_eager_float32(shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    for reduction, weighted, ignore, smoothing, prob in GRID:
        logits, target, weight = make_inputs(shape, weighted, ignore, prob, torch.float32, gen)
        check_against_eager(logits, target, options(reduction, ignore, smoothing, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [1, 2, 10, 16, 17])
def test_short_rows_in_lanes(dtype, C):
    """Rows of <= 16 classes with index targets go through the kernel that puts one row per vector lane (8 float
    or 4 double rows per block, the rest row by row): full and partial blocks, ignored and extreme rows in a block."""
    gen = torch.Generator().manual_seed(C)
    for n in (3, 4, 5, 8, 9, 35):
        for reduction, weighted, ignore, smoothing, prob in GRID:
            if prob:
                continue
            logits, target, weight = make_inputs((n, C), weighted, ignore, prob, dtype, gen)
            logits[n // 2] *= 3e3  # logits of about +-1e4
            if n > 4:
                logits[1, : C // 2] = float("-inf")
                logits[3] = float("-inf")  # NaN loss (or 0 when ignored) and NaN gradient, as eager
            check_against_eager(logits, target, options(reduction, ignore, smoothing, weight))


def test_noncontiguous_logits_and_grad():
    gen = torch.Generator().manual_seed(2)
    for reduction, weighted, ignore, smoothing, prob in GRID:
        logits, target, weight = make_inputs((9, 13), weighted, ignore, prob, torch.float32, gen)
        check_against_eager(noncontiguous(logits), target, options(reduction, ignore, smoothing, weight),
                            grad_noncontiguous=True)
        check_against_eager(logits.t().contiguous().t(), target, options(reduction, ignore, smoothing, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
def test_cpu_paths(path, dtype):
    """Every compiled path against eager, at shapes around its vector widths (8/4 and 16/8 lanes): one vector,
    one lane more, the lanes kernel's row blocks with a remainder (37 rows of 10 classes), long rows with a tail,
    and extreme logits."""
    with cpu_path(path):
        gen = torch.Generator().manual_seed(3)
        for shape in [(5, 3), (11, 10), (37, 10), (3, 16), (19, 17), (4, 41), (2, 200), (3, 1000)]:
            for reduction, weighted, ignore, smoothing, prob in GRID[::3]:
                logits, target, weight = make_inputs(shape, weighted, ignore, prob, dtype, gen)
                check_against_eager(logits, target, options(reduction, ignore, smoothing, weight))
        logits = torch.randn(21, 33, generator=gen, dtype=dtype) * 1e4
        logits[2, :20] = float("-inf")
        logits[5] = float("-inf")
        target = torch.randint(20, 33, (21,), generator=gen)
        for reduction in REDUCTIONS:
            check_against_eager(logits, target, dict(reduction=reduction, label_smoothing=0.2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits(dtype):
    """±1e4 logits, rows with -inf, an all -inf row, where the naive exp/log formula overflows or gives NaN."""
    gen = torch.Generator().manual_seed(4)
    C = 12
    logits = torch.randn(8, C, generator=gen, dtype=dtype) * 1e4
    logits[1, :5] = float("-inf")
    logits[2, 3] = float("-inf")
    logits[3] = float("-inf")  # all -inf: NaN, as eager
    logits[4] = 1e4 + torch.arange(C, dtype=dtype)  # large and close together: needs an exact x - lse
    target = torch.randint(5, C, (8,), generator=gen)
    for reduction in REDUCTIONS:
        check_against_eager(logits, target, dict(reduction=reduction))
        check_against_eager(logits, target, dict(reduction=reduction, label_smoothing=0.1))
        keep = torch.ones(8, dtype=torch.bool)
        keep[3] = False
        check_against_eager(logits[keep], target[keep], dict(reduction=reduction, label_smoothing=0.1,
                                                             weight=torch.rand(C, dtype=dtype, generator=gen)))
    # a target on a -inf logit: infinite loss, as eager
    t = target.clone()
    t[1] = 0
    check_against_eager(logits, t, dict(reduction="none"))
    # an ignored all -inf row (eager: loss 0 there, gradient NaN in that row)
    t[3] = -100
    check_against_eager(logits, t, dict(reduction="mean"))
    check_against_eager(logits, t, dict(reduction="none", label_smoothing=0.2))


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_logits_propagate_as_in_eager(path, dtype):
    """A NaN logit makes its row's loss and gradient NaN, as eager's, in the short-row (10 classes) and long-row
    kernels: the shared exp keeps a NaN, where clamping it into its range would give a number."""
    gen = torch.Generator().manual_seed(6)
    with cpu_path(path):
        for classes in (10, 37):
            logits = torch.randn(9, classes, generator=gen, dtype=dtype) * 3
            logits[1, 4] = float("nan")
            logits[4] = float("nan")
            logits[6, 0] = float("nan")
            target = torch.randint(0, classes, (9,), generator=gen)
            target[6] = -100  # an ignored row with a NaN: its loss is left out, its gradient still NaN
            for reduction in REDUCTIONS:
                check_against_eager(logits, target, dict(reduction=reduction, ignore_index=-100))
                check_against_eager(logits, target, dict(reduction=reduction, ignore_index=-100,
                                                         label_smoothing=0.2))
                probs = torch.softmax(torch.randn(logits.shape, generator=gen, dtype=dtype), 1)
                check_against_eager(logits, probs, dict(reduction=reduction))


def test_empty_and_all_ignored_give_nan():
    for reduction in REDUCTIONS:
        for prob in (False, True):
            logits = torch.randn(0, 4)
            target = torch.rand(0, 4) if prob else torch.zeros(0, dtype=torch.long)
            check_against_eager(logits, target, dict(reduction=reduction))
    logits = torch.randn(5, 4)
    target = torch.full((5,), -100)
    for smoothing in (0.0, 0.5):
        check_against_eager(logits, target, dict(reduction="mean", label_smoothing=smoothing))
        assert torch.isnan(fastmnist.softmax_cross_entropy(logits, target, label_smoothing=smoothing))
    # weights of the kept targets summing to zero: 0/0 as eager
    check_against_eager(logits, torch.zeros(5, dtype=torch.long), dict(weight=torch.tensor([0.0, 1, 1, 1])))


def test_uint8_targets():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 5, generator=gen)
    target = torch.randint(0, 5, (6,), generator=gen, dtype=torch.uint8)
    check_against_eager(logits, target, dict(reduction="mean"))


def test_module_matches_nn():
    gen = torch.Generator().manual_seed(6)
    w = torch.rand(10, generator=gen)
    ours = fastmnist.nn.SoftmaxCrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.1, reduction="sum")
    ref = torch.nn.CrossEntropyLoss(weight=w, ignore_index=3, label_smoothing=0.1, reduction="sum")
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(16, 10, generator=gen)
    t = torch.randint(0, 10, (16,), generator=gen)
    assert_close(ours(x, t), ref(x, t))
    default = fastmnist.nn.SoftmaxCrossEntropyLoss()
    assert (default.reduction, default.ignore_index, default.label_smoothing) == ("mean", -100, 0.0)
    assert_close(default(x, t), torch.nn.CrossEntropyLoss()(x, t))


def test_lse_saved_for_backward_only():
    """The forward saves only the per-row log-sum-exp (besides its inputs)."""
    logits = torch.randn(6, 9, requires_grad=True)
    target = torch.randint(0, 9, (6,))
    loss, lse = torch.ops.fastmnist.softmax_cross_entropy(logits, target, None, -100, 1, 0.0)
    assert lse.shape == (6,) and lse.dtype == torch.float64
    assert_close(lse, torch.logsumexp(logits.double(), 1), dtype=torch.float32)  # summed in float32


# ---- bad input ----

def test_target_out_of_range_names_the_value():
    logits = torch.randn(4, 5)
    before = logits.clone()
    with pytest.raises(IndexError, match="target 5 is out of bounds"):
        fastmnist.softmax_cross_entropy(logits, torch.tensor([0, 1, 5, 2]))
    with pytest.raises(IndexError, match="target -3 is out of bounds"):
        fastmnist.softmax_cross_entropy(logits, torch.tensor([0, 1, -3, 2]))
    with pytest.raises(IndexError, match="target 1000000000000 is out of bounds"):
        fastmnist.softmax_cross_entropy(logits, torch.tensor([0, 1, 10**12, 2]), reduction="none")
    assert torch.equal(logits, before)
    # the backward op checks too
    lse = torch.zeros(4, dtype=torch.float64)
    with pytest.raises(IndexError, match="target 7"):
        torch.ops.fastmnist.softmax_cross_entropy_backward(torch.ones(()), logits, torch.tensor([0, 7, 1, 1]), None,
                                                           lse, -100, 2, 0.0, [True, False])


def test_bad_target_dtype():
    logits = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="Long or Byte, but got Int"):
        fastmnist.softmax_cross_entropy(logits, torch.tensor([0, 1, 2], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int64"):
        torch.ops.fastmnist.softmax_cross_entropy(logits, torch.tensor([0, 1, 2], dtype=torch.int32), None, -100, 1,
                                                  0.0)


def test_batch_size_mismatch():
    with pytest.raises(ValueError, match=r"batch_size \(3\) to match target batch_size \(2\)"):
        fastmnist.softmax_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="Expected target size"):
        fastmnist.softmax_cross_entropy(torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(RuntimeError, match="multi-target not supported"):
        fastmnist.softmax_cross_entropy(torch.randn(3, 4), torch.zeros(3, 1, dtype=torch.long))


def test_weight_wrong_length():
    with pytest.raises(RuntimeError, match="all 4 classes or no classes"):
        fastmnist.softmax_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), weight=torch.ones(3))
    with pytest.raises(RuntimeError, match="one entry per class"):
        torch.ops.fastmnist.softmax_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.ones(5), -100,
                                                  1, 0.0)


def test_probability_target_wrong_shape():
    with pytest.raises(RuntimeError, match=r"Expected target size \[3, 4\], got \[3, 5\]"):
        fastmnist.softmax_cross_entropy(torch.randn(3, 4), torch.rand(3, 5))
    with pytest.raises(RuntimeError, match="ignore_index is not supported"):
        fastmnist.softmax_cross_entropy(torch.randn(3, 4), torch.rand(3, 4), ignore_index=1)


@pytest.mark.parametrize("smoothing", [-0.1, 1.5, float("nan")])
def test_label_smoothing_out_of_range(smoothing):
    with pytest.raises(RuntimeError, match="label_smoothing must be between 0.0 and 1.0"):
        fastmnist.softmax_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), label_smoothing=smoothing)


def test_bad_reduction_and_weight_requiring_grad():
    with pytest.raises(ValueError, match="foo is not a valid value for reduction"):
        fastmnist.softmax_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), reduction="foo")
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        fastmnist.softmax_cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]),
                                        weight=torch.ones(4, requires_grad=True))


# ---- registration: opcheck, torch.compile ----

def opcheck_samples():
    gen = torch.Generator().manual_seed(7)
    samples = []
    for reduction, weighted, ignore, smoothing, prob in GRID[::2]:
        logits, target, weight = make_inputs((5, 6), weighted, ignore, prob, torch.float32, gen)
        logits.requires_grad_()
        samples.append((logits, target, weight, -7 if ignore else -100, ("none", "mean", "sum").index(reduction),
                        smoothing))
    return samples


def test_opcheck():
    for args in opcheck_samples():
        torch.library.opcheck(torch.ops.fastmnist.softmax_cross_entropy.default, args)
    logits, target, weight, ignore, reduction, smoothing = opcheck_samples()[1]
    loss, lse = torch.ops.fastmnist.softmax_cross_entropy(logits, target, weight, ignore, reduction, smoothing)
    grad = torch.randn_like(loss)
    torch.library.opcheck(torch.ops.fastmnist.softmax_cross_entropy_backward.default,
                          (grad, logits.detach(), target, weight, lse, ignore, reduction, smoothing, [True, True]))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)

    def step(x, t, w):
        return fastmnist.softmax_cross_entropy(x, t, weight=w, label_smoothing=0.1)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    x = torch.randn(8, 10, generator=gen, requires_grad=True)
    t = torch.randint(0, 10, (8,), generator=gen)
    w = torch.rand(10, generator=gen)
    loss = compiled(x, t, w)
    (grad,) = torch.autograd.grad(loss, x)  # the backward graph compiled by AOTAutograd
    ref = reference(x, t, weight=w, label_smoothing=0.1)
    assert_close(loss, ref)
    assert_close(grad, torch.autograd.grad(ref, x)[0])


# ---- property-based ----

@settings(derandomize=True, max_examples=60, deadline=None)
@given(
    rows=st.integers(0, 9),
    C=st.integers(1, 40),
    kdim=st.sampled_from([(), (3,), (2, 2)]),
    reduction=st.sampled_from(REDUCTIONS),
    weighted=st.booleans(),
    ignore=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.05, 1.0]),
    prob=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    n_neg_inf=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_property_against_eager(rows, C, kdim, reduction, weighted, ignore, smoothing, prob, scale, n_neg_inf,
                                seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (rows, C, *kdim)
    logits, target, weight = make_inputs(shape, weighted, ignore and not prob, prob, torch.float32, gen, scale)
    if n_neg_inf and logits.numel():
        idx = torch.randint(0, logits.numel(), (n_neg_inf,), generator=gen)
        logits.view(-1)[idx] = float("-inf")
    # infinite or NaN losses compare by position; float32 sums of values of 1e4 carry absolute rounding of ~1e-3
    check_against_eager(logits, target, options(reduction, ignore and not prob, smoothing, weight),
                        atol=1e-5 * max(1.0, scale) * C, rtol=1e-4)
