"""Python side of the fastmnist custom ops: argument handling, fake (shape) kernels and autograd.

Each submodule registers its ops' fake kernels and autograd formulas with torch.library, only when the compiled
library loaded (registering them for ops that do not exist would fail at import).
"""

from .conv_act_pool import conv_act_pool
from .cross_entropy import linear_cross_entropy, softmax_cross_entropy
from .linear_act import linear_act
from .sigmoid_bce import sigmoid_bce

__all__ = ["conv_act_pool", "linear_act", "linear_cross_entropy", "sigmoid_bce", "softmax_cross_entropy"]
