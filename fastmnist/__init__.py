"""fastmnist: fused C++/CUDA kernels for small vision models, as PyTorch custom ops.

Ops (``fastmnist.linear_act`` ...) live in ``fastmnist.ops``; drop-in modules in ``fastmnist.nn``; the five
tutorial models in ``fastmnist.models``; data loading in ``fastmnist.data``; the fused training step is
``fastmnist.fused_step``.
"""

from . import _lib, nn, ops
from .fused_step import FusionError, fused_step
from .ops import conv_act_pool, linear_act, linear_cross_entropy, sigmoid_bce, softmax_cross_entropy

__version__ = "0.1.0"
__all__ = ["FusionError", "conv_act_pool", "fused_step", "linear_act", "linear_cross_entropy", "nn", "ops",
           "sigmoid_bce", "softmax_cross_entropy"]
