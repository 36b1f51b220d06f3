"""Parameter trees: nested dicts, lists and tuples (including ``MemoryParams``) of float arrays.

:func:`tree_map` rebuilds a tree with a function applied to every leaf; :func:`ravel` turns
a tree into one flat vector and back (what the optimiser and the checkpoints work on).
The leaves are visited in a fixed order (dict keys sorted), so a flat vector means the same
thing for every tree of the same structure.
"""

from __future__ import annotations

import autograd.numpy as anp
import numpy as np

from ..memory import MemoryParams


def tree_map(f, tree):
    """``tree`` with every leaf ``x`` replaced by ``f(x)`` (structure and metadata kept)."""
    if isinstance(tree, dict):
        return {k: tree_map(f, tree[k]) for k in sorted(tree)}
    if isinstance(tree, MemoryParams):
        return tree.like(tree_map(f, w) for w in tree)
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(f, x) for x in tree)
    return f(tree)


def tree_leaves(tree) -> list:
    """The leaves in the fixed order of :func:`tree_map`."""
    out = []
    tree_map(out.append, tree)
    return out


def as_float_arrays(tree):
    """Every leaf as a float64 NumPy array (Python floats become 0-d arrays)."""
    return tree_map(lambda x: np.asarray(x, dtype=np.float64), tree)


def ravel(tree):
    """``(flat, unravel)``: all leaves in one vector ``(P,)``, and its inverse.

    ``unravel(flat)`` is built from slices and reshapes, so autograd differentiates through
    it: the gradient of ``loss(unravel(flat))`` is a flat vector in the same order.
    """
    leaves = [np.asarray(x, dtype=np.float64) for x in tree_leaves(tree)]
    shapes = [x.shape for x in leaves]
    sizes = [x.size for x in leaves]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    flat = np.concatenate([x.ravel() for x in leaves]) if leaves else np.zeros(0)

    def unravel(vec):
        pieces = iter(anp.reshape(vec[offsets[i]:offsets[i + 1]], shapes[i])
                      for i in range(len(shapes)))
        return tree_map(lambda _: next(pieces), tree)

    return flat, unravel
