"""Python side of the fastmnist custom ops: argument handling, fake (shape) kernels and autograd.

Each submodule registers its ops' fake kernels and autograd formulas with torch.library, only when the compiled
library loaded (registering them for ops that do not exist would fail at import).
"""

from .conv_act_pool import conv_act_pool
from .linear_act import linear_act

__all__ = ["conv_act_pool", "linear_act"]
