"""Python side of the fastmnist custom ops: argument handling, fake (shape) kernels and autograd.

Each submodule registers its ops' fake kernels and autograd formulas with torch.library, only when the compiled
library loaded (registering them for ops that do not exist would fail at import).
"""

from .linear_act import linear_act

__all__ = ["linear_act"]
