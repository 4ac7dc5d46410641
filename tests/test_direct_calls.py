"""The direct entry points in fastmnist._C (csrc/python_module.cpp): the same op through the same dispatcher as
torch.ops.fastmnist, so identical results, gradients, errors and dispatch-mode behaviour; NotImplemented (and the
wrapper's torch.ops path) for anything that is not a plain tensor or Python scalar."""

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastmnist
from fastmnist import _C

pytestmark = pytest.mark.skipif(not fastmnist._lib.LOADED, reason="fastmnist._C is not built")


def _conv_args(grad):
    x = torch.randn(3, 2, 9, 8, dtype=torch.float64)
    w = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=grad)
    return (x, w, torch.randn(4, dtype=torch.float64, requires_grad=grad), 1, "sigmoid", grad)


def _calls(grad):
    """(op name, arguments) for every direct entry point, with float64 leaves that require grad when `grad`."""
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)

    target = torch.randint(0, 7, (5,))
    return [
        ("linear_act", (leaf(5, 6), leaf(7, 6), leaf(7), "leaky_relu", 0.2)),
        ("softmax_cross_entropy", (leaf(5, 7), target, torch.rand(7, dtype=torch.float64), -100, 1, 0.1)),
        ("linear_cross_entropy", (leaf(5, 6), leaf(7, 6), leaf(7), target, None, 7, 3, 2, 0.0,
                                  [grad, grad, grad])),
        ("sigmoid_bce", (leaf(5, 7), torch.rand(5, 7, dtype=torch.float64), None, torch.rand(7, dtype=torch.float64),
                         1)),
        ("conv_act_pool", _conv_args(grad)),
    ]


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("index", range(5))
def test_same_results_and_gradients_as_torch_ops(index):
    name, args = _calls(grad=True)[index]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = []
    for call in (getattr(_C, name), getattr(torch.ops.fastmnist, name).default):
        out = _outputs(call(*args))[0]
        assert out.grad_fn is not None
        grads.append((out.detach(), *torch.autograd.grad(out.sum(), leaves)))
    for direct, via_ops in zip(*grads):
        torch.testing.assert_close(direct, via_ops, rtol=0, atol=0)


@pytest.mark.parametrize("index", range(5))
def test_not_implemented_for_what_it_does_not_take(index):
    name, args = _calls(grad=False)[index]
    direct = getattr(_C, name)
    assert direct(*args) is not NotImplemented

    class Subclass(torch.Tensor):
        pass

    first = args[0].as_subclass(Subclass)
    assert direct(first, *args[1:]) is NotImplemented
    scalar_at = next(i for i, a in enumerate(args) if isinstance(a, (int, float)) and not isinstance(a, bool))
    odd = list(args)
    odd[scalar_at] = True  # a bool is neither an int nor a float argument here
    assert direct(*odd) is NotImplemented
    with TorchFunctionMode():
        assert direct(*args) is NotImplemented
    with pytest.raises(TypeError, match="takes 1?[0-9] positional arguments, got 1"):
        direct(args[0])


def test_errors_are_the_same_as_through_torch_ops():
    x, w = torch.randn(2, 4), torch.randn(3, 5)
    messages = []
    for call in (_C.linear_act, torch.ops.fastmnist.linear_act.default):
        with pytest.raises(RuntimeError, match="in_features") as error:
            call(x, w, None, "relu", 0.0)
        messages.append(str(error.value).splitlines()[0])
    assert messages[0] == messages[1]
    with pytest.raises(IndexError, match="target 9 is out of bounds"):
        _C.softmax_cross_entropy(torch.randn(2, 3), torch.tensor([0, 9]), None, -100, 1, 0.0)


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_op():
    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with _RecordOps() as mode:
        out = _C.linear_act(x, w, None, "tanh", 0.0)
    assert "fastmnist.linear_act.default" in mode.seen
    torch.testing.assert_close(out, torch.tanh(x @ w.T))


def test_wrappers_fall_back_to_torch_ops_under_a_torch_function_mode():
    class RecordFunctions(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w = torch.randn(2, 4), torch.randn(3, 4)
    with RecordFunctions() as mode:
        out = fastmnist.linear_act(x, w, activation="sigmoid")
    assert "fastmnist.linear_act.default" in mode.seen
    torch.testing.assert_close(out, torch.sigmoid(x @ w.T))
