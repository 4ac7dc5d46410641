"""sigmoid_bce against F.binary_cross_entropy_with_logits: every option, shapes, extreme values, bad input."""

import itertools

import pytest
import torch
from helpers import assert_close, check_loss_against_reference, cpu_path, noncontiguous
from hypothesis import given, settings
from hypothesis import strategies as st

import fastmnist
from fastmnist import _lib
from fastmnist.reference import sigmoid_bce_reference as reference

pytestmark = pytest.mark.skipif(not _lib.LOADED, reason="fastmnist extension not built")

REDUCTIONS = ("none", "mean", "sum")
# weight / pos_weight: absent, per class (last dim), or of the input's full shape
GRID = list(itertools.product(REDUCTIONS, (None, "class", "full"), (None, "class", "full")))


def make_inputs(shape, weight_kind, pos_kind, dtype, gen, scale=4.0):
    x = torch.randn(shape, generator=gen, dtype=dtype) * scale
    t = torch.rand(shape, generator=gen, dtype=dtype)
    last = shape[-1:] if len(shape) else ()

    def extra(kind, lo, hi):
        if kind is None:
            return None
        s = last if kind == "class" else shape
        return torch.rand(s, generator=gen, dtype=dtype) * (hi - lo) + lo

    return x, t, extra(weight_kind, 0.1, 1.0), extra(pos_kind, 0.2, 3.0)


def check_against_eager(x, t, opts, grad_noncontiguous=False, **tol):
    check_loss_against_reference(fastmnist.sigmoid_bce, reference, (x, t), (0, 1), opts, grad_noncontiguous, **tol)


@pytest.mark.parametrize("reduction,weight_kind,pos_kind", GRID)
def test_gradcheck(reduction, weight_kind, pos_kind):
    gen = torch.Generator().manual_seed(1)
    x, t, w, pw = make_inputs((3, 5), weight_kind, pos_kind, torch.float64, gen)
    x.requires_grad_()
    t.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: fastmnist.sigmoid_bce(a, b, weight=w, pos_weight=pw, reduction=reduction), (x, t))


# Without per-class weights the kernel sees rows of 256 elements: (30, 10) is one and a part, (1030, 9) several
# parallel tasks
SHAPES = [(7, 10), (1, 10), (5, 1), (4, 2), (3, 1000), (10,), (), (2, 3, 5), (0, 4), (30, 10), (1030, 9)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_against_eager_float32(shape):
    gen = torch.Generator().manual_seed(sum(shape) + len(shape))
    for reduction, weight_kind, pos_kind in GRID:
        x, t, w, pw = make_inputs(shape, weight_kind, pos_kind, torch.float32, gen)
        check_against_eager(x, t, dict(weight=w, pos_weight=pw, reduction=reduction))


def test_broadcast_weights_and_noncontiguous():
    gen = torch.Generator().manual_seed(2)
    x, t, _, _ = make_inputs((6, 4, 9), None, None, torch.float32, gen)
    for w in (torch.rand(4, 1, generator=gen), torch.rand(1, 9, generator=gen), torch.rand((), generator=gen)):
        check_against_eager(x, t, dict(weight=w, pos_weight=torch.rand(9, generator=gen) + 0.5, reduction="sum"))
    for reduction in REDUCTIONS:
        check_against_eager(noncontiguous(x), noncontiguous(t), dict(reduction=reduction), grad_noncontiguous=True)


def test_one_hot_targets_of_the_sigmoid_model():
    """The tutorial's sigmoid output layer trained with BCE on one-hot targets."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 10, generator=gen)
    t = torch.nn.functional.one_hot(torch.randint(0, 10, (64,), generator=gen), 10).float()
    check_against_eager(x, t, dict(reduction="mean"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits(dtype):
    gen = torch.Generator().manual_seed(4)
    x = torch.tensor([[1e4, -1e4, 100.0, -100.0, 30.0, -30.0, 0.0, 1e-6, -1e-6, 88.0, -88.0, 700.0]], dtype=dtype)
    t = torch.rand(x.shape, generator=gen, dtype=dtype)
    for reduction in REDUCTIONS:
        for pw in (None, torch.rand(12, generator=gen, dtype=dtype) * 3):
            check_against_eager(x, t, dict(reduction=reduction, pos_weight=pw))
    check_against_eager(x, torch.round(t), dict(reduction="none"))


@pytest.mark.parametrize("path", ["portable", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_logits_propagate_as_in_eager(path, dtype):
    """A NaN logit gives NaN in its loss term and its gradient (and the reduced loss), as eager's: the shared exp
    keeps a NaN, where clamping it into its range would give a number."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(5, 19, generator=gen, dtype=dtype) * 4
    x[0, 3] = x[2, 18] = x[4, 8] = float("nan")
    t = torch.rand(x.shape, generator=gen, dtype=dtype)
    with cpu_path(path):
        for reduction in REDUCTIONS:
            for pw in (None, torch.rand(19, generator=gen, dtype=dtype) * 3):
                check_against_eager(x, t, dict(reduction=reduction, pos_weight=pw))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logit_gradient_in_the_tails(dtype):
    # sigmoid(x) - t where sigmoid(x) is tiny (relative accuracy, no 1 - 1 cancellation), 1, or exactly 0 / 1
    # at -inf / +inf; only the logits need a gradient, as in training
    x = torch.tensor([[-float("inf"), float("inf"), -1e4, 1e4, -80.0, -30.0, -15.0, 15.0, 30.0, 0.0]], dtype=dtype)
    t = torch.zeros_like(x)
    for reduction in REDUCTIONS:
        x1 = x.clone().requires_grad_()
        x2 = x.clone().requires_grad_()
        out = fastmnist.sigmoid_bce(x1, t, reduction=reduction)
        ref = reference(x2, t, reduction=reduction)
        grad = torch.ones_like(ref)
        got, = torch.autograd.grad(out, x1, grad)
        want, = torch.autograd.grad(ref, x2, grad)
        assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 1e-13, atol=0)


@pytest.mark.parametrize("path", ["portable", "avx2"])
def test_cpu_paths(path):
    with cpu_path(path):
        gen = torch.Generator().manual_seed(5)
        for reduction, weight_kind, pos_kind in GRID[::4]:
            x, t, w, pw = make_inputs((5, 19), weight_kind, pos_kind, torch.float32, gen)
            check_against_eager(x, t, dict(weight=w, pos_weight=pw, reduction=reduction))


def test_module_matches_nn():
    gen = torch.Generator().manual_seed(6)
    w, pw = torch.rand(10, generator=gen), torch.rand(10, generator=gen) * 2
    ours = fastmnist.nn.SigmoidBCELoss(weight=w, pos_weight=pw, reduction="sum")
    ref = torch.nn.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x, t = torch.randn(8, 10, generator=gen), torch.rand(8, 10, generator=gen)
    assert_close(ours(x, t), ref(x, t))
    assert_close(fastmnist.nn.SigmoidBCELoss()(x, t), torch.nn.BCEWithLogitsLoss()(x, t))


def test_bad_input():
    x = torch.randn(3, 4)
    before = x.clone()
    with pytest.raises(ValueError, match="must be the same as input size"):
        fastmnist.sigmoid_bce(x, torch.rand(3, 5))
    with pytest.raises(RuntimeError, match="does not broadcast"):
        fastmnist.sigmoid_bce(x, torch.rand(3, 4), weight=torch.rand(5))
    with pytest.raises(RuntimeError, match="does not broadcast"):
        fastmnist.sigmoid_bce(x, torch.rand(3, 4), pos_weight=torch.rand(2, 4))
    with pytest.raises(RuntimeError, match="floating-point"):
        fastmnist.sigmoid_bce(x, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        fastmnist.sigmoid_bce(x, torch.rand(3, 4), reduction="avg")
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        fastmnist.sigmoid_bce(x, torch.rand(3, 4), weight=torch.ones(4, requires_grad=True))
    with pytest.raises(RuntimeError, match="pos_weight must have shape"):
        torch.ops.fastmnist.sigmoid_bce(x, torch.rand(3, 4), None, torch.rand(3), 1)
    assert torch.equal(x, before)


def test_opcheck():
    gen = torch.Generator().manual_seed(7)
    for reduction, weight_kind, pos_kind in GRID[::2]:
        x, t, w, pw = make_inputs((4, 6), weight_kind, pos_kind, torch.float32, gen)
        w = None if w is None else w.expand(4, 6).contiguous() if weight_kind == "full" else w
        x.requires_grad_()
        t.requires_grad_()
        code = REDUCTIONS.index(reduction)
        torch.library.opcheck(torch.ops.fastmnist.sigmoid_bce.default, (x, t, w, pw, code))
    grad = torch.randn(4, 6)
    torch.library.opcheck(torch.ops.fastmnist.sigmoid_bce_backward.default,
                          (grad, x.detach(), t.detach(), w, pw, 0, [True, True]))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(backend):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(8)
    compiled = torch.compile(lambda a, b, pw: fastmnist.sigmoid_bce(a, b, pos_weight=pw), fullgraph=True,
                             backend=backend)
    x = torch.randn(8, 10, generator=gen, requires_grad=True)
    t = torch.rand(8, 10, generator=gen)
    pw = torch.rand(10, generator=gen) + 0.5
    loss = compiled(x, t, pw)
    (grad,) = torch.autograd.grad(loss, x)
    ref = reference(x, t, pos_weight=pw)
    assert_close(loss, ref)
    assert_close(grad, torch.autograd.grad(ref, x)[0])


@settings(derandomize=True, max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 12), min_size=0, max_size=3).map(tuple),
    reduction=st.sampled_from(REDUCTIONS),
    weight_kind=st.sampled_from([None, "class", "full"]),
    pos_kind=st.sampled_from([None, "class", "full"]),
    scale=st.sampled_from([1e-3, 1.0, 50.0, 1e4]),
    binary=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_against_eager(shape, reduction, weight_kind, pos_kind, scale, binary, seed):
    gen = torch.Generator().manual_seed(seed)
    x, t, w, pw = make_inputs(shape, weight_kind, pos_kind, torch.float32, gen, scale)
    if binary:
        t = torch.round(t)
    check_against_eager(x, t, dict(weight=w, pos_weight=pw, reduction=reduction),
                        atol=1e-5 * max(1.0, scale), rtol=1e-4)
