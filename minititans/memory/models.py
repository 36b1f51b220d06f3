r"""The memory $\mathcal{M}$ itself: a linear map or a deep MLP (Titans Section 3.1).

With $L_\mathcal{M} = 1$ the memory is a matrix, $\mathcal{M}(k) = k W$ (a row vector times
$W \in \mathbb{R}^{d_{in} \times d_{out}}$). With $L_\mathcal{M} \ge 2$ it is an MLP without
biases, $\mathcal{M}(x) = \sigma(\cdots\sigma(x W_1)\cdots) W_L$, hidden width
``expansion * d_in``. The optional residual form of the NeurIPS version is
$\mathcal{M}(x) = x + \mathrm{LN}(\mathcal{M}_{mlp}(x))$, with a LayerNorm that has no learnable
gain (so every parameter of the memory is a weight matrix that the inner loop trains).

The parameters are a :class:`MemoryParams`: a tuple of weight matrices that also remembers the
activation and the residual flag, so ``memory_forward(params, x)`` needs nothing else.
"""

from __future__ import annotations

import importlib

import autograd.numpy as anp
import numpy as np
from autograd.builtins import SequenceBox, SequenceVSpace
from autograd.extend import VSpace
from autograd.tracer import getval

from .._checks import check_array, check_choice, check_float_dtype, check_int, check_rng
from ..activations import ACTIVATIONS

LN_EPS = 1e-5  # LayerNorm epsilon of the residual memory form


class MemoryParams(tuple):
    """The weights ``(W_1, ..., W_L)`` of a memory, plus how to run them.

    A plain tuple of arrays to NumPy and autograd (a gradient of a loss with respect to a
    ``MemoryParams`` is again a ``MemoryParams``), with two read-only attributes:
    ``activation`` ("silu" or "gelu", used between layers) and ``residual_norm``.
    """

    def __new__(cls, weights, activation: str = "gelu", residual_norm: bool = False):
        self = super().__new__(cls, weights)
        self._activation = activation
        self._residual_norm = bool(residual_norm)
        return self

    @property
    def activation(self) -> str:
        return self._activation

    @property
    def residual_norm(self) -> bool:
        return self._residual_norm

    @property
    def depth(self) -> int:
        return len(self)

    @property
    def d_in(self) -> int:
        return getval(self[0]).shape[-2]

    @property
    def d_out(self) -> int:
        return getval(self[-1]).shape[-1]

    def like(self, weights) -> MemoryParams:
        """New weights with the same activation and residual flag."""
        return MemoryParams(weights, self._activation, self._residual_norm)

    def __repr__(self):
        shapes = ", ".join(str(getval(w).shape) for w in self)
        return (f"MemoryParams(depth={len(self)}, shapes=[{shapes}], "
                f"activation={self._activation!r}, residual_norm={self._residual_norm})")

    def __reduce__(self):
        return (MemoryParams, (tuple(self), self._activation, self._residual_norm))


class MemoryParamsVSpace(SequenceVSpace):
    """Autograd's vector space of a MemoryParams: a tuple space that keeps the metadata."""

    def __init__(self, value):
        self.meta = (value.activation, value.residual_norm)
        super().__init__(value)

    def _map(self, f, *args):
        return MemoryParams(map(f, self.shape, *args), *self.meta)

    def _subval(self, xs, idx, x):
        items = list(xs)
        items[idx] = x
        return MemoryParams(items, *self.meta)


SequenceBox.register(MemoryParams)
VSpace.register(MemoryParams, MemoryParamsVSpace)


def _flatten_memory_params(value):
    """``autograd.misc.flatten``'s ravel, taught that a MemoryParams is a sequence.

    autograd's flatten recurses into values whose type is exactly ``list``, ``tuple`` or
    ``dict`` and ravels anything else, which fails on a tuple subclass. Only MemoryParams
    values take the new branch (their weights are flattened in order, and the unflattened
    value is a MemoryParams again, through :class:`MemoryParamsVSpace`); every other value
    goes to autograd's own function, unchanged. docs/design-decisions.md says why.
    """
    if isinstance(getval(value), MemoryParams):
        return _autograd_flatten._concatenate(map(_flatten_memory_params, value))
    return _autograd_ravel(value)


# the module, not the function of the same name that ``autograd.misc`` exports
_autograd_flatten = importlib.import_module("autograd.misc.flatten")
_autograd_ravel = _autograd_flatten._flatten
_autograd_flatten._flatten = _flatten_memory_params  # its recursion now comes back here


def spec_of(params) -> MemoryParams:
    """The MemoryParams behind ``params`` (looks through an autograd box)."""
    value = getval(params)
    if not isinstance(value, MemoryParams):
        raise TypeError(
            f"params must be a MemoryParams (from init_memory), got {type(value).__name__}"
        )
    return value


def check_params(params, *, name: str = "params", finite: bool = True) -> MemoryParams:
    """Check that ``params`` is a usable memory: its weights chain and are float arrays.

    A hand-built or loaded :class:`MemoryParams` may not fit together (a layer whose fan-in
    is not the previous fan-out, a 1-D or integer weight, an unknown activation, a residual
    form that is not square). Both backends would fail deep inside, or, for the numba
    kernel, silently compute with the wrong shapes; this says which weight is wrong.
    """
    spec = spec_of(params)
    if len(spec) == 0:
        raise ValueError(f"{name} must hold at least one weight matrix, got none")
    check_choice(f"{name}.activation", spec.activation, tuple(ACTIVATIONS))
    prev = None
    for i, w in enumerate(spec):
        W = check_array(f"{name}[{i}]", w, ndim=2, finite=finite)
        if prev is not None and W.shape[0] != prev:
            raise ValueError(f"{name}[{i}] must have {prev} rows (the previous layer's width), "
                             f"got shape {W.shape}")
        prev = W.shape[1]
    if spec.residual_norm and spec.d_in != spec.d_out:
        raise ValueError(f"{name} with residual_norm=True needs d_in == d_out, got "
                         f"d_in={spec.d_in}, d_out={spec.d_out}")
    return spec


def init_memory(rng, d_in: int, d_out: int, depth: int = 2, expansion: int = 4,
                activation: str = "gelu", residual_norm: bool = False, *,
                init: str = "normal", dtype=anp.float64) -> MemoryParams:
    r"""Initial weights $\mathcal{M}_0$ of a memory.

    Args:
        rng: a ``np.random.Generator``.
        d_in, d_out: key and value widths.
        depth: $L_\mathcal{M}$; 1 gives a single matrix ``(W,)`` of shape ``(d_in, d_out)``.
        expansion: hidden width is ``expansion * d_in`` (the NeurIPS version uses 4).
        activation: "gelu" (exact, erf-based) or "silu", applied between layers.
        residual_norm: use $\mathcal{M}(x) = x + \mathrm{LN}(\mathrm{MLP}(x))$; needs
            ``d_in == d_out``.
        init: "normal" draws every matrix from $\mathcal{N}(0, 1/\text{fan-in})$;
            "zero_out" does the same but zeroes the last matrix, so
            $\mathcal{M}_0(k) = 0$ (for depth 1 this is $W_0 = 0$, as in the delta rule).
        dtype: float64 (default) or float32.

    Returns:
        MemoryParams with shapes ``[(d_in, h), (h, h), ..., (h, d_out)]``.
    """
    check_rng(rng)
    d_in = check_int("d_in", d_in, minimum=1)
    d_out = check_int("d_out", d_out, minimum=1)
    depth = check_int("depth", depth, minimum=1)
    expansion = check_int("expansion", expansion, minimum=1)
    check_choice("activation", activation, tuple(ACTIVATIONS))
    check_choice("init", init, ("normal", "zero_out"))
    dtype = check_float_dtype(dtype)
    if not isinstance(residual_norm, (bool, np.bool_)):
        raise TypeError(f"residual_norm must be True or False, got {residual_norm!r}")
    if residual_norm and d_in != d_out:
        raise ValueError(f"residual_norm=True needs d_in == d_out, got d_in={d_in}, d_out={d_out}")
    hidden = expansion * d_in
    widths = [d_in] + [hidden] * (depth - 1) + [d_out]
    weights = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        if init == "zero_out" and i == depth - 1:
            W = np.zeros((a, b))
        else:
            W = rng.standard_normal((a, b)) / np.sqrt(a)
        weights.append(W.astype(dtype))
    return MemoryParams(weights, activation, residual_norm)


def layer_norm_plain(h):
    r"""LayerNorm over the last axis, no gain or bias: $(h - \mu) / \sqrt{\sigma^2 + \epsilon}$."""
    mu = anp.mean(h, axis=-1, keepdims=True)
    var = anp.mean((h - mu) ** 2, axis=-1, keepdims=True)
    return (h - mu) / anp.sqrt(var + LN_EPS)


def _run(params, x, matmul):
    spec = spec_of(params)
    act = ACTIVATIONS[spec.activation]
    depth = len(spec)
    h = x
    for i in range(depth):
        h = matmul(h, params[i])  # (..., width_{i+1})
        if i < depth - 1:
            h = act(h)
    if spec.residual_norm:
        h = x + layer_norm_plain(h)
    return h


def memory_forward(params, x):
    r"""Read the memory: $y = \mathcal{M}(x)$ (Titans Eq. 15 when $x = q$).

    Args:
        params: MemoryParams from :func:`init_memory` (or a memory state's params).
        x: ``(..., d_in)`` keys or queries, one token per row.

    Returns:
        ``(..., d_out)``.
    """
    spec = check_params(params, finite=False)
    check_array("x", x, last_dim=spec.d_in)
    return _run(params, x, lambda h, W: h @ W)


def forward_batched(params_b, x):
    """Read B memories at once: weights ``(B, fan_in, fan_out)``, ``x`` ``(B, n, d_in)``.

    Row ``x[s, i]`` is read by memory ``s``: the same numbers as ``memory_forward`` of
    sequence ``s``'s weights on ``x[s]`` (a model's batch, one memory per sequence).
    """
    return _run(params_b, x, anp.matmul)


def forward_per_token(params_b, x):
    """Read a memory whose weights differ per token.

    Weights have shapes ``(b, fan_in, fan_out)``, ``x`` is ``(b, d_in)``.

    Used by the chunked scan, where token i of a chunk is read with its own $\\mathcal{M}_i$,
    and to take per-token gradients (every token gets its own copy of the weights).
    """
    return _run(params_b, x, lambda h, W: anp.matmul(h[:, None, :], W)[:, 0, :])
