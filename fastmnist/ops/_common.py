"""Helpers shared by the op wrappers."""

import numbers

import torch

from .. import _lib

# fastmnist._C's direct entry points, one per forward op (csrc/python_module.cpp)
_DIRECT = {}
if _lib.LOADED:
    from .. import _C

    _DIRECT = {name: getattr(_C, name) for name in
               ("linear_act", "softmax_cross_entropy", "linear_cross_entropy", "sigmoid_bce", "conv_act_pool")}

ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh")


def check_activation(activation):
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")


def check_number(name, value):
    if type(value) is float:  # the common case, without the slower ABC check below
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def check_devices(op, *tensors):
    """Calling an op on CUDA tensors from a build without CUDA gets a clear message, not a dispatcher dump."""
    if not _lib.LOADED:
        _lib.require_library()
    if not _lib.WITH_CUDA:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                raise RuntimeError(
                    f"{op}: got a CUDA tensor, but fastmnist was built without CUDA kernels; rebuild with a CUDA "
                    "torch and nvcc (pip install --no-build-isolation .)"
                )


def call_op(name, *args):
    """``torch.ops.fastmnist.<name>(*args)``, through the op's direct entry point in fastmnist._C when it takes
    these arguments (plain tensors on a device with kernels, plain Python scalars; ~5 us less per call, the same
    dispatcher path and results), else through torch.ops. torch.compile always sees the torch.ops call."""
    direct = _DIRECT.get(name)
    if direct is not None and not torch.compiler.is_compiling():
        out = direct(*args)
        if out is not NotImplemented:
            return out
    check_devices(name, *args)
    return getattr(torch.ops.fastmnist, name).default(*args)
