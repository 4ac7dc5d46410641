"""Python side of the fastmnist custom ops: argument handling and fake (shape) kernels.

Each submodule registers its ops' fake kernels with torch.library, only when the compiled library loaded
(registering them for ops that do not exist would fail at import). Autograd is registered in C++
(csrc/*_autograd.cpp): at the tutorial models' sizes a Python autograd formula costs more than the op.
"""

from .conv_act_pool import conv_act_pool
from .cross_entropy import linear_cross_entropy, softmax_cross_entropy
from .linear_act import linear_act
from .sigmoid_bce import sigmoid_bce

__all__ = ["conv_act_pool", "linear_act", "linear_cross_entropy", "sigmoid_bce", "softmax_cross_entropy"]
