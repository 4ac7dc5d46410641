"""fastmnist: fused C++/CUDA kernels for small vision models, as PyTorch custom ops.

Ops (``fastmnist.linear_act`` ...) live in ``fastmnist.ops``; drop-in modules in ``fastmnist.nn``.
"""

from . import _lib, nn, ops
from .ops import linear_act, linear_cross_entropy, sigmoid_bce, softmax_cross_entropy

__version__ = "0.1.0"
__all__ = ["linear_act", "linear_cross_entropy", "nn", "ops", "sigmoid_bce", "softmax_cross_entropy"]
