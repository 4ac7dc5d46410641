"""linear_cross_entropy against F.linear_cross_entropy (torch >= 2.13) or, where torch lacks it, its
documented composition cross_entropy(linear(...)); every option, shapes, memory, bad input."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, check_loss_against_reference
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmnist
from fastmnist import _lib
from fastmnist.reference import linear_cross_entropy_composition
from fastmnist.reference import linear_cross_entropy_reference as reference

pytestmark = pytest.mark.skipif(not _lib.LOADED, reason="fastmnist extension not built")

REDUCTIONS = ("none", "mean", "sum")
GRID = [g for g in itertools.product(REDUCTIONS, (False, True), (False, True), (0.0, 0.3), (False, True))
        if not (g[2] and g[4])]


def make_inputs(n, in_features, C, out_features, weighted, ignore, prob, bias, dtype, gen):
    """input (n, in) or (in,) when n is None; linear weight (C, *out_features, in); targets; class weights."""
    x = torch.randn(*(() if n is None else (n,)), in_features, generator=gen, dtype=dtype)
    w = torch.randn(C, *out_features, in_features, generator=gen, dtype=dtype) / in_features**0.5 * 3
    b = torch.randn(C, *out_features, generator=gen, dtype=dtype) if bias else None
    batch = () if n is None else (n,)
    if prob:
        target = torch.softmax(torch.randn(*batch, C, *out_features, generator=gen, dtype=dtype), len(batch))
    else:
        target = torch.randint(0, C, (*batch, *out_features), generator=gen)
        if ignore and target.numel():
            target.view(-1)[::3] = -5
    cw = torch.rand(C, generator=gen, dtype=dtype) + 0.1 if weighted else None
    return x, w, b, target, cw


def options(reduction, ignore, smoothing, cw):
    return dict(weight=cw, reduction=reduction, ignore_index=-5 if ignore else None, label_smoothing=smoothing)


def check_against_eager(x, w, b, target, opts, ref=reference, **tol):
    wrt = (0, 1) if b is None else (0, 1, 3)
    check_loss_against_reference(fastmnist.linear_cross_entropy, ref, (x, w, target, b), wrt, opts, **tol)


@pytest.mark.parametrize("reduction,weighted,ignore,smoothing,prob", GRID)
def test_gradcheck(reduction, weighted, ignore, smoothing, prob):
    gen = torch.Generator().manual_seed(1)
    x, w, b, target, cw = make_inputs(4, 3, 5, (), weighted, ignore, prob, True, torch.float64, gen)
    opts = options(reduction, ignore, smoothing, cw)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(lambda *a: fastmnist.linear_cross_entropy(a[0], a[1], target, a[2], **opts),
                                    inputs)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck_k_dimensional(reduction):
    gen = torch.Generator().manual_seed(2)
    for prob in (False, True):
        x, w, b, target, cw = make_inputs(3, 4, 3, (2,), True, False, prob, True, torch.float64, gen)
        opts = options(reduction, False, 0.1, cw)
        inputs = tuple(t.requires_grad_() for t in (x, w, b))
        assert torch.autograd.gradcheck(lambda *a: fastmnist.linear_cross_entropy(a[0], a[1], target, a[2], **opts),
                                        inputs)


CASES = [  # (batch, in_features, classes, out_features)
    (7, 5, 10, ()), (1, 8, 10, ()), (6, 3, 1, ()), (5, 4, 2, ()), (3, 16, 1000, ()), (None, 6, 10, ()),
    (4, 5, 3, (2,)), (3, 4, 3, (2, 2)), (0, 4, 5, ()), (300, 33, 5000, ()),  # last: several row chunks
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_against_eager_float32(case):
    n, k, C, out_features = case
    gen = torch.Generator().manual_seed(n or 0 + k + C)
    grid = GRID if C <= 10 else GRID[::5]
    for reduction, weighted, ignore, smoothing, prob in grid:
        for bias in (False, True):
            x, w, b, target, cw = make_inputs(n, k, C, out_features, weighted, ignore, prob, bias, torch.float32,
                                              gen)
            check_against_eager(x, w, b, target, options(reduction, ignore, smoothing, cw), atol=2e-5)


def test_composition_reference_agrees():
    """The fallback used on torch without F.linear_cross_entropy (2.11) is the same function."""
    gen = torch.Generator().manual_seed(3)
    for reduction, weighted, ignore, smoothing, prob in GRID[::3]:
        x, w, b, target, cw = make_inputs(5, 6, 4, (), weighted, ignore, prob, True, torch.float32, gen)
        check_against_eager(x, w, b, target, options(reduction, ignore, smoothing, cw),
                            ref=linear_cross_entropy_composition)


def test_noncontiguous_inputs():
    gen = torch.Generator().manual_seed(4)
    x, w, b, target, cw = make_inputs(9, 7, 12, (), True, True, False, True, torch.float32, gen)
    check_against_eager(x.t().contiguous().t(), w.t().contiguous().t(), b, target, options("mean", True, 0.1, cw))


def test_backward_without_precomputed_gradients():
    """Gradients requested for only some inputs, and grad mode switched: backward recomputes what it lacks."""
    gen = torch.Generator().manual_seed(5)
    x, w, b, target, _ = make_inputs(6, 5, 7, (), False, False, False, True, torch.float32, gen)
    w.requires_grad_()
    loss = fastmnist.linear_cross_entropy(x, w, target, b)
    (gw,) = torch.autograd.grad(loss, w)
    w_ref = w.detach().clone().requires_grad_()
    (gw_ref,) = torch.autograd.grad(reference(x, w_ref, target, b), w_ref)
    assert_close(gw, gw_ref)
    with torch.no_grad():
        assert_close(fastmnist.linear_cross_entropy(x, w, target, b), reference(x, w, target, b))


def test_module_matches_nn():
    gen = torch.Generator().manual_seed(6)
    cw = torch.rand(10, generator=gen)
    torch.manual_seed(0)
    ours = fastmnist.nn.LinearCrossEntropyLoss(20, 10, bias=True, weight=cw, label_smoothing=0.1)
    x = torch.randn(8, 20, generator=gen)
    t = torch.randint(0, 10, (8,), generator=gen)
    ref_cls = getattr(torch.nn, "LinearCrossEntropyLoss", None)
    if ref_cls is not None:
        torch.manual_seed(0)
        ref = ref_cls(20, 10, bias=True, weight=cw, label_smoothing=0.1)
        assert ours.state_dict().keys() == ref.state_dict().keys()
        for key, value in ref.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value)  # same initialisation
        assert_close(ours(x, t), ref(x, t))
    expected = F.cross_entropy(ours.linear(x), t, weight=cw, label_smoothing=0.1)
    assert_close(ours(x, t), expected)
    kdim = fastmnist.nn.LinearCrossEntropyLoss(6, 3, out_features=(2,))
    assert kdim.linear.weight.shape == (6, 6)
    xk, tk = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4, 2), generator=gen)
    assert_close(kdim(xk, tk), F.cross_entropy(kdim.linear(xk).reshape(4, 3, 2), tk))


def test_peak_memory_below_eager():
    """The classifier head never holds the (N, C) logits: its largest allocation is the chunk buffer."""
    profiler = pytest.importorskip("torch.profiler")
    gen = torch.Generator().manual_seed(7)
    n, k, C = 2048, 32, 4000
    x = torch.randn(n, k, generator=gen, requires_grad=True)
    w = torch.randn(C, k, generator=gen, requires_grad=True)
    t = torch.randint(0, C, (n,), generator=gen)

    def largest_allocation(fn):
        with profiler.profile(activities=[profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn(x, w, t).backward()
        return max(e.cpu_memory_usage for e in prof.key_averages(group_by_input_shape=True)
                   if e.cpu_memory_usage > 0) if prof.key_averages() else 0

    ours = largest_allocation(lambda a, b, c: fastmnist.linear_cross_entropy(a, b, c))
    eager = largest_allocation(linear_cross_entropy_composition)
    logits_bytes = n * C * 4
    assert eager >= logits_bytes
    assert ours < logits_bytes / 2


# ---- bad input ----

def test_bad_input():
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    t = torch.tensor([0, 1, 2])
    before = (x.clone(), w.clone())
    with pytest.raises(IndexError, match="target 5 is out of bounds"):
        fastmnist.linear_cross_entropy(x, w, torch.tensor([0, 5, 1]))
    with pytest.raises(RuntimeError, match="Long or Byte"):
        fastmnist.linear_cross_entropy(x, w, t.int())
    with pytest.raises(ValueError, match="batch_size"):
        fastmnist.linear_cross_entropy(x, w, torch.tensor([0, 1]))
    with pytest.raises(RuntimeError, match="all 5 classes or no classes"):
        fastmnist.linear_cross_entropy(x, w, t, weight=torch.ones(4))
    with pytest.raises(RuntimeError, match="Expected target size"):
        fastmnist.linear_cross_entropy(x, w, torch.rand(3, 6))
    with pytest.raises(RuntimeError, match="ignore_index cannot be specified"):
        fastmnist.linear_cross_entropy(x, w, torch.rand(3, 5), ignore_index=-100)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        fastmnist.linear_cross_entropy(x, w, t, label_smoothing=2.0)
    with pytest.raises(RuntimeError, match="in_features"):
        fastmnist.linear_cross_entropy(x, torch.randn(5, 3), t)
    with pytest.raises(RuntimeError, match="linear_bias shape"):
        fastmnist.linear_cross_entropy(x, w, t, torch.randn(4))
    with pytest.raises(RuntimeError, match="dimensionality 1 or 2"):
        fastmnist.linear_cross_entropy(torch.randn(2, 3, 4), w, t)
    with pytest.raises(RuntimeError, match="requires batched input"):
        fastmnist.linear_cross_entropy(torch.randn(4), torch.randn(5, 2, 4), torch.tensor(1))
    assert torch.equal(x, before[0]) and torch.equal(w, before[1])


# ---- registration ----

def test_opcheck():
    gen = torch.Generator().manual_seed(8)
    for reduction, weighted, ignore, smoothing, prob in GRID[::5]:
        x, w, b, target, cw = make_inputs(5, 4, 6, (), weighted, ignore, prob, True, torch.float32, gen)
        for t in (x, w, b):
            t.requires_grad_()
        code = REDUCTIONS.index(reduction)
        args = (x, w, b, target, cw, 6, -5 if ignore else -100, code, smoothing, [True, True, True])
        torch.library.opcheck(torch.ops.fastmnist.linear_cross_entropy.default, args)
    lse = torch.ops.fastmnist.linear_cross_entropy(*args)[1]
    grad = torch.randn(5) if code == 0 else torch.randn(())
    torch.library.opcheck(torch.ops.fastmnist.linear_cross_entropy_backward.default,
                          (grad, x.detach(), w.detach(), b.detach(), target, cw, lse, *args[5:9], [True, True, True]))


@pytest.mark.parametrize("backend,reduction", [("aot_eager", "none"), ("aot_eager", "mean"), ("inductor", "mean")])
def test_compile_fullgraph(backend, reduction):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(9)
    x, w, b, target, _ = make_inputs(8, 6, 10, (), False, False, False, True, torch.float32, gen)
    leaves = [t.requires_grad_() for t in (x, w, b)]
    compiled = torch.compile(lambda a, c, d: fastmnist.linear_cross_entropy(a, c, target, d, reduction=reduction),
                             fullgraph=True, backend=backend)
    loss = compiled(*leaves)
    grads = torch.autograd.grad(loss.sum(), leaves)
    expected = reference(x, w, target, b, reduction=reduction)
    assert_close(loss, expected)
    for g, g_ref in zip(grads, torch.autograd.grad(expected.sum(), leaves)):
        assert_close(g, g_ref)


@settings(derandomize=True, max_examples=30, deadline=None)
@given(
    n=st.one_of(st.none(), st.integers(0, 9)),
    k=st.integers(1, 12),
    C=st.integers(1, 30),
    reduction=st.sampled_from(REDUCTIONS),
    weighted=st.booleans(),
    ignore=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.1, 1.0]),
    prob=st.booleans(),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_against_eager(n, k, C, reduction, weighted, ignore, smoothing, prob, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    ignore = ignore and not prob
    x, w, b, target, cw = make_inputs(n, k, C, (), weighted, ignore, prob, bias, torch.float32, gen)
    check_against_eager(x, w, b, target, options(reduction, ignore, smoothing, cw), atol=2e-5)


@pytest.mark.parametrize("reduction", [0, 1])
def test_backward_ops_reject_a_grad_loss_of_the_wrong_shape(reduction):
    """Both backward ops check grad_loss against the loss's shape (one shared check, cross_entropy_args.h)."""
    logits, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    x, w = torch.randn(3, 5), torch.randn(4, 5)
    _, lse = torch.ops.fastmnist.softmax_cross_entropy(logits, target, None, -100, reduction, 0.0)
    wrong = torch.ones(2) if reduction == 0 else torch.ones(3)
    expected = r"must have shape \(3,\) for reduction none" if reduction == 0 else "must be a scalar for a reduced loss"
    with pytest.raises(RuntimeError, match="softmax_cross_entropy_backward: grad_loss " + expected):
        torch.ops.fastmnist.softmax_cross_entropy_backward(wrong, logits, target, None, lse, -100, reduction, 0.0,
                                                           [True, False])
    with pytest.raises(RuntimeError, match="linear_cross_entropy_backward: grad_loss " + expected):
        torch.ops.fastmnist.linear_cross_entropy_backward(wrong, x, w, None, target, None, lse, 4, -100, reduction,
                                                          0.0, [True, True, False])
