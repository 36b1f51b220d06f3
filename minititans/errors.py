"""The package's own exception: a recurrence whose state or output stopped being finite.

It lives at the bottom of the package (nothing here imports anything of minititans), so the
reference path, the numba kernels and the recurrent functions of linear attention all raise
the same class. ``minititans.MemoryDivergenceError`` and
``minititans.memory.MemoryDivergenceError`` are this class.
"""

from __future__ import annotations

MEMORY_HINT = ("lower theta, raise alpha, normalise the keys, or pass max_grad_norm to clip "
               "the surprise")


class MemoryDivergenceError(FloatingPointError):
    """A recurrence stopped being finite; ``token`` is the index of the first bad token.

    Every recurrent function (``memory_scan``, ``memory_step``, the delta rules, linear
    attention) raises it, on either backend, naming the first token whose state or output is
    NaN or inf, or, for learned weights (the memory and the delta rules), the first token whose
    weights leave the bound of :func:`minititans._checks.weight_bound`; with
    ``on_nonfinite="warn"`` it is a ``RuntimeWarning`` with the same message. ``what`` says
    what went bad, ``reason`` how, ``hint`` what to change.
    """

    def __init__(self, token: int, detail: str = "", *, what: str = "memory weights",
                 hint: str = MEMORY_HINT, reason: str = "became non-finite"):
        self.token = token
        super().__init__(f"{what} {reason} at token {token}{detail}; {hint}")
