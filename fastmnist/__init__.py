"""fastmnist: fused C++/CUDA kernels for small vision models, as PyTorch custom ops.

Ops (``fastmnist.linear_act`` ...) live in ``fastmnist.ops``; drop-in modules in ``fastmnist.nn``.
"""

from . import _lib, nn, ops
from .ops import conv_act_pool, linear_act

__version__ = "0.1.0"
__all__ = ["conv_act_pool", "linear_act", "nn", "ops"]
