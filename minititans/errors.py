"""The package's own exception: a memory whose weights stopped being finite.

It lives at the bottom of the package (nothing here imports anything of minititans), so the
reference path, the numba kernels and the recurrent functions of linear attention all raise
the same class. ``minititans.MemoryDivergenceError`` and
``minititans.memory.MemoryDivergenceError`` are this class.
"""

from __future__ import annotations


class MemoryDivergenceError(FloatingPointError):
    """The memory's weights became NaN or inf; ``token`` is the index of the first bad token."""

    def __init__(self, token: int, detail: str = ""):
        self.token = token
        super().__init__(
            f"memory weights became non-finite at token {token}{detail}; lower theta, raise "
            "alpha, normalise the keys, or pass max_grad_norm to clip the surprise"
        )
